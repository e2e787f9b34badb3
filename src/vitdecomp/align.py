"""CompAlign: one linear map per component from the model's space into CLIP's image space.

Each component ``i`` gets ``W_i: D -> d_clip`` (plus one shared bias ``b``), trained so that the
mapped sum matches CLIP's image embedding of the same image (METHOD.md §2)::

    L = mean_x [1 - cos(sum_i W_i c_i(x) + b, z_CLIP(x))] + lam / (n * d_clip) * sum_i ||W_i^T W_i - I||_F^2

``n`` is the number of maps. The published setting (Adam, lr 3e-4, "lambda = 1/768" with
d_clip = 768) is the ``1/(n * d_clip)`` normalisation with ``lam = 1``: the default here.
Training reads mini-batches from a :class:`~vitdecomp.store.ContributionStore` (never re-running a
model), holds out a fraction of the images and keeps the maps with the best held-out cosine
(early stopping). All maps are applied at once by one ``einsum``. Modes: ``"compalign"`` (per-
component maps), ``"shared"`` (one map for every component: the paper's baseline) and
``"identity"`` (CLIP-family subjects, whose contributions already live in CLIP space).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitdecomp.errors import MismatchError
from vitdecomp.store import ContributionStore, StoreKey, key_difference

MODES = ("compalign", "shared", "identity")
#: Key fields an aligner must agree on with the data it is applied to (the image set may differ).
MODEL_FIELDS = ("model", "clip", "start_layer", "labels", "preprocess")
DEFAULT_LAMBDA = 1.0
DEFAULT_LR = 3e-4


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Aligner:
    """Trained maps into CLIP space.

    ``weight``: ``[C, d_clip, D]`` (compalign), ``[1, d_clip, D]`` (shared) or ``None`` (identity);
    ``bias [d_clip]``; ``labels`` the component names (layout) it was trained for; ``key`` the
    store key dict of its training data; ``metrics`` held-out cosine etc.
    """

    weight: torch.Tensor | None
    bias: torch.Tensor
    labels: list[str]
    mode: str = "compalign"
    lam: float = DEFAULT_LAMBDA
    key: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.mode == "compalign" and (self.weight is None or self.weight.shape[0] != len(self.labels)):
            raise ValueError("a compalign aligner needs weight [C, d_clip, D] with C = len(labels)")
        if self.mode == "shared" and (self.weight is None or self.weight.shape[0] != 1):
            raise ValueError("a shared aligner needs weight [1, d_clip, D]")

    @property
    def n_components(self) -> int:
        return len(self.labels)

    @property
    def out_dim(self) -> int:
        return int(self.bias.shape[0])

    @property
    def in_dim(self) -> int:
        return self.out_dim if self.weight is None else int(self.weight.shape[2])

    @property
    def device(self) -> torch.device:
        return self.bias.device

    def to(self, device: str | torch.device) -> Aligner:
        self.bias = self.bias.to(device)
        if self.weight is not None:
            self.weight = self.weight.to(device)
        return self

    def apply(self, contributions: torch.Tensor) -> torch.Tensor:
        """Map each component: ``[B, C, D] -> [B, C, d_clip]`` (no bias; see :meth:`apply_sum`)."""
        return apply(self, contributions)

    def apply_sum(self, contributions: torch.Tensor) -> torch.Tensor:
        """The aligned whole ``sum_i W_i c_i + b``: ``[B, C, D] -> [B, d_clip]``."""
        return apply(self, contributions).sum(1) + self.bias.to(contributions.device, torch.float32)

    def check(self, key: StoreKey | dict[str, Any] | None = None, labels: Sequence[str] | None = None) -> None:
        """Raise :class:`MismatchError` unless this aligner fits data with ``key`` / ``labels``."""
        if labels is not None and list(labels) != self.labels:
            raise MismatchError(
                f"aligner was trained for {len(self.labels)} components ({self.labels[:3]}...), the data has "
                f"{len(labels)} ({list(labels)[:3]}...): a different model or component layout; retrain it"
            )
        if key is not None and self.key is not None:
            want = key.to_dict() if isinstance(key, StoreKey) else dict(key)
            mine = {k: self.key.get(k) for k in MODEL_FIELDS}
            theirs = {k: want.get(k) for k in MODEL_FIELDS}
            if mine != theirs:
                diff = "; ".join(key_difference(mine, theirs))
                raise MismatchError(f"aligner was trained for a different setting ({diff}); retrain it")


def apply(aligner: Aligner, contributions: torch.Tensor) -> torch.Tensor:
    """All maps at once by one einsum: ``contributions [B, C, D] -> [B, C, d_clip]`` (float32)."""
    x = contributions.to(aligner.device, torch.float32)
    if x.shape[1] != aligner.n_components or x.shape[2] != aligner.in_dim:
        raise MismatchError(
            f"contributions {tuple(x.shape)} do not fit an aligner for {aligner.n_components} components "
            f"x {aligner.in_dim} dims"
        )
    if aligner.weight is None:
        return x
    if aligner.mode == "shared":
        return torch.einsum("bcd,ed->bce", x, aligner.weight[0])
    return torch.einsum("bcd,ced->bce", x, aligner.weight)


def identity_aligner(labels: Sequence[str], dim: int, key: StoreKey | dict[str, Any] | None = None) -> Aligner:
    """The map for CLIP-family subjects whose contributions are already CLIP image-space vectors."""
    return Aligner(
        weight=None,
        bias=torch.zeros(dim),
        labels=list(labels),
        mode="identity",
        lam=0.0,
        key=key.to_dict() if isinstance(key, StoreKey) else key,
    )


def orthogonality_penalty(weight: torch.Tensor) -> torch.Tensor:
    """``||W_i^T W_i - I||_F^2`` per map ``[n]`` for ``weight [n, d_clip, D]``.

    Uses ``||W^T W||_F^2 = ||W W^T||_F^2`` with the smaller Gram matrix.
    """
    _, e, d = weight.shape
    gram = weight @ weight.mT if e <= d else weight.mT @ weight
    return gram.square().sum((1, 2)) - 2 * weight.square().sum((1, 2)) + d


class _Rows:
    """Uniform row access to a store or to in-memory ``(contributions, clip)`` arrays."""

    def __init__(self, source: ContributionStore | tuple[Any, Any]) -> None:
        self.store = source if isinstance(source, ContributionStore) else None
        if self.store is None:
            c, z = source
            self.c = c if isinstance(c, torch.Tensor) else torch.from_numpy(np.asarray(c))
            self.z = z if isinstance(z, torch.Tensor) else torch.from_numpy(np.asarray(z))
            if self.c.shape[0] != self.z.shape[0]:
                raise ValueError(f"{self.c.shape[0]} contribution rows but {self.z.shape[0]} CLIP rows")
            self.n = int(self.c.shape[0])
            self.shape = tuple(self.c.shape[1:])
            self.clip_dim = int(self.z.shape[1])
        else:
            self.n = self.store.committed
            self.shape = self.store.shapes["contributions"]
            self.clip_dim = self.store.shapes["clip"][0]

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.store is not None:
            b = self.store.batch(idx)
            return b["contributions"], b["clip"]
        t = torch.as_tensor(idx)
        return self.c[t].float(), self.z[t].float()


@torch.no_grad()
def _evaluate(aligner: Aligner, rows: _Rows, idx: np.ndarray, batch_size: int) -> float:
    total, count = 0.0, 0
    for s in range(0, len(idx), batch_size):
        c, z = rows.get(idx[s : s + batch_size])
        z = z.to(aligner.device)
        total += F.cosine_similarity(aligner.apply_sum(c), z, dim=-1).sum().item()
        count += len(z)
    return total / max(count, 1)


def evaluate(aligner: Aligner, source: ContributionStore | tuple[Any, Any], batch_size: int = 256) -> dict[str, float]:
    """Mean cosine between the aligned whole and the CLIP embedding over all rows of ``source``."""
    rows = _Rows(source)
    return {"cosine": _evaluate(aligner, rows, np.arange(rows.n), batch_size), "n": rows.n}


def train_aligner(
    source: ContributionStore | tuple[Any, Any],
    labels: Sequence[str] | None = None,
    *,
    mode: str = "compalign",
    lam: float = DEFAULT_LAMBDA,
    lr: float = DEFAULT_LR,
    batch_size: int = 256,
    max_steps: int = 5000,
    eval_every: int | None = None,
    patience: int = 5,
    min_delta: float = 1e-4,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Aligner:
    """Train CompAlign maps (or the shared-map baseline) from a store or ``(contributions, clip)``.

    ``source``: a :class:`ContributionStore` (mini-batches are read from its memmaps) or arrays
    ``contributions [N, C, D]`` and ``clip [N, d_clip]``. A seeded ``val_fraction`` of the rows is
    held out; every ``eval_every`` steps (default: once per epoch, at most 100 steps) the held-out
    cosine is measured; training stops after ``patience`` evaluations without an improvement of
    ``min_delta`` or at ``max_steps``, and the best maps are returned. ``lam`` multiplies the
    ``1/(n * d_clip)``-normalised orthogonality penalty (``lam = 0``: the ablation without it).
    """
    if mode not in ("compalign", "shared"):
        raise ValueError(f"mode must be 'compalign' or 'shared' (use identity_aligner for CLIP), not {mode!r}")
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    rows = _Rows(source)
    if labels is None:
        if rows.store is None:
            raise ValueError("give the component labels when training from arrays")
        labels = rows.store.labels
    labels = list(labels)
    c_count, d_in = rows.shape
    d_clip = rows.clip_dim
    if c_count != len(labels):
        raise MismatchError(f"{c_count} components in the data but {len(labels)} labels")
    if rows.n < 2:
        raise ValueError("need at least 2 images to train an aligner")

    gen = np.random.default_rng(seed)
    perm = gen.permutation(rows.n)
    n_val = min(max(1, round(val_fraction * rows.n)), rows.n - 1)
    val_idx, train_idx = np.sort(perm[:n_val]), perm[n_val:]
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    eval_every = eval_every or min(steps_per_epoch, 100)

    torch.manual_seed(seed)
    n_maps = c_count if mode == "compalign" else 1
    init = torch.empty(d_clip, d_in)
    torch.nn.init.orthogonal_(init)  # every map starts as the same isometry (penalty at its floor)
    weight = init.expand(n_maps, d_clip, d_in).clone().to(dev).requires_grad_(True)
    bias = torch.zeros(d_clip, device=dev, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    reg = lam / (n_maps * d_clip)

    def current() -> Aligner:
        return Aligner(weight.detach(), bias.detach(), labels, mode=mode, lam=lam)

    best = {"val_cosine": _evaluate(current(), rows, val_idx, batch_size), "step": 0}
    best_state = (weight.detach().clone(), bias.detach().clone())
    bad, step, stop = 0, 0, "max_steps"
    history: list[tuple[int, float]] = [(0, best["val_cosine"])]
    bar = tqdm(total=max_steps, desc=f"align ({mode}, lam={lam:g})", unit="step", disable=not progress)
    order = np.array([], dtype=np.int64)
    train_cos = float("nan")
    while step < max_steps:
        if len(order) == 0:
            order = gen.permutation(train_idx)
        idx, order = order[:batch_size], order[batch_size:]
        c, z = rows.get(idx)
        c, z = c.to(dev), z.to(dev)
        if mode == "shared":
            pred = c.sum(1) @ weight[0].T + bias
        else:
            pred = torch.einsum("bcd,ced->be", c, weight) + bias
        cos = F.cosine_similarity(pred, z, dim=-1)
        loss = (1 - cos).mean()
        if reg:
            loss = loss + reg * orthogonality_penalty(weight).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        train_cos = cos.mean().item()
        bar.update(1)
        if step % eval_every == 0 or step == max_steps:
            val = _evaluate(current(), rows, val_idx, batch_size)
            history.append((step, val))
            bar.set_postfix(val_cos=f"{val:.4f}", train_cos=f"{train_cos:.4f}")
            if val > best["val_cosine"] + min_delta:
                best, bad = {"val_cosine": val, "step": step}, 0
                best_state = (weight.detach().clone(), bias.detach().clone())
            else:
                bad += 1
                if bad >= patience:
                    stop = "early_stopped"
                    break
    bar.close()
    w, b = best_state
    pen = orthogonality_penalty(w) / d_clip
    aligner = Aligner(
        w,
        b,
        labels,
        mode=mode,
        lam=lam,
        key=rows.store.key.to_dict() if rows.store is not None else None,
        metrics={
            "val_cosine": best["val_cosine"],
            "best_step": best["step"],
            "steps": step,
            "stopped": stop,
            "last_train_cosine": train_cos,
            "orthogonality": pen.mean().item(),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "history": history,
        },
        config={
            "lr": lr,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "eval_every": eval_every,
            "patience": patience,
            "val_fraction": val_fraction,
            "seed": seed,
        },
    )
    return aligner


def save_aligner(aligner: Aligner, path: str | Path) -> Path:
    """Write ``path/aligner.safetensors`` (weight, bias) and ``path/aligner.json`` (key, lam, metrics)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"bias": aligner.bias.detach().float().cpu().contiguous()}
    if aligner.weight is not None:
        tensors["weight"] = aligner.weight.detach().float().cpu().contiguous()
    save_file(tensors, str(path / "aligner.safetensors"))
    meta = {
        "format_version": 1,
        "mode": aligner.mode,
        "lam": aligner.lam,
        "labels": aligner.labels,
        "key": aligner.key,
        "in_dim": aligner.in_dim,
        "out_dim": aligner.out_dim,
        "metrics": aligner.metrics,
        "config": aligner.config,
    }
    (path / "aligner.json").write_text(json.dumps(meta, indent=1))
    return path


def load_aligner(
    path: str | Path,
    *,
    key: StoreKey | dict[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> Aligner:
    """Read an aligner saved by :func:`save_aligner`; refuse (``MismatchError``) a different
    model / CLIP / start layer / preprocessing (``key``) or component layout (``labels``)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "aligner.json").read_text())
    tensors = load_file(str(path / "aligner.safetensors"))
    aligner = Aligner(
        weight=tensors.get("weight"),
        bias=tensors["bias"],
        labels=list(meta["labels"]),
        mode=meta["mode"],
        lam=meta["lam"],
        key=meta.get("key"),
        metrics=meta.get("metrics", {}),
        config=meta.get("config", {}),
    )
    aligner.check(key=key, labels=labels)
    return aligner.to(resolve_device(device))


def aligner_dir(root: str | Path, key: StoreKey, mode: str = "compalign", lam: float = DEFAULT_LAMBDA) -> Path:
    """A cache folder for the aligner of ``key``'s model setting (the image set is not part of it)."""
    import hashlib
    import re

    fields = {k: key.to_dict()[k] for k in MODEL_FIELDS}
    blob = json.dumps({"key": fields, "mode": mode, "lam": lam}, sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.model)[:48].strip("_") or "aligner"
    return Path(root) / f"{slug}-{mode}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


@torch.no_grad()
def aligned_component(
    source: ContributionStore | torch.Tensor | np.ndarray,
    aligner: Aligner,
    index: int,
    batch_size: int = 1024,
) -> torch.Tensor:
    """One component's aligned contribution over all images ``[N, d_clip]`` (float32, aligner's device).

    ``source`` is a store or a contributions array ``[N, C, D]``; only column ``index`` is read.
    """
    arr = source.contributions if isinstance(source, ContributionStore) else source
    n = arr.shape[0]
    out = []
    w = None if aligner.weight is None else aligner.weight[0 if aligner.mode == "shared" else index]
    for s in range(0, n, batch_size):
        part = arr[s : s + batch_size, index]
        x = torch.as_tensor(np.array(part, dtype=np.float32) if not isinstance(part, torch.Tensor) else part)
        x = x.to(aligner.device, torch.float32)
        out.append(x if w is None else x @ w.T)
    if not out:
        return torch.zeros(0, aligner.out_dim, device=aligner.device)
    return torch.cat(out)


@torch.no_grad()
def aligned_stack(source: ContributionStore | torch.Tensor, aligner: Aligner, batch_size: int = 256) -> torch.Tensor:
    """The whole aligned stack ``[N, C, d_clip]`` in memory (small stores only; else stream batches)."""
    if isinstance(source, ContributionStore):
        parts = [aligner.apply(b["contributions"]) for b in source.iter_batches(batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, aligner.n_components, aligner.out_dim)
    return torch.cat([aligner.apply(source[s : s + batch_size]) for s in range(0, len(source), batch_size)])


def train_ablation(
    source: ContributionStore | tuple[Any, Any],
    labels: Sequence[str] | None = None,
    *,
    lam: float = DEFAULT_LAMBDA,
    **kwargs: Any,
) -> dict[str, Aligner]:
    """The paper's alignment ablation on one data set: ``{"shared": one map for all components,
    "lambda=0": CompAlign without the orthogonality penalty, "compalign": CompAlign with lam}``.

    Same seed, split and optimiser settings (``kwargs`` go to :func:`train_aligner`) for all three;
    each result's ``metrics["val_cosine"]`` is its held-out cosine.
    """
    return {
        "shared": train_aligner(source, labels, mode="shared", lam=lam, **kwargs),
        "lambda=0": train_aligner(source, labels, mode="compalign", lam=0.0, **kwargs),
        "compalign": train_aligner(source, labels, mode="compalign", lam=lam, **kwargs),
    }
