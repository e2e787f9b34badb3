"""CompAlign: one linear map per component from the model's space into CLIP's image space.

Each component ``i`` gets ``W_i: D -> d_clip`` (plus one shared bias ``b``), trained so that the
mapped sum matches CLIP's image embedding of the same image (METHOD.md §2)::

    L = mean_x [1 - cos(sum_i W_i c_i(x) + b, z_CLIP(x))] + lam / (n * d_clip) * sum_i ||W_i^T W_i - I||_F^2

``n`` is the number of maps. The published setting (Adam, lr 3e-4, "lambda = 1/768" with
d_clip = 768) is the ``1/(n * d_clip)`` normalisation with ``lam = 1``: the default here.
Training reads mini-batches from any :class:`~vitdecomp.store.Rows` (a store, its rows in memory,
or arrays; never re-running a model), holds out a fraction of the images and keeps the maps with
the best held-out cosine (early stopping). All maps are applied at once by one ``einsum``. Modes: ``"compalign"`` (per-
component maps), ``"shared"`` (one map for every component: the paper's baseline) and
``"identity"`` (CLIP-family subjects, whose contributions already live in CLIP space).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitdecomp.defaults import ALIGN_BATCH_SIZE, ALIGN_STEPS, DEFAULT_LAMBDA, VAL_FRACTION
from vitdecomp.errors import MismatchError
from vitdecomp.store import Rows, RowSource, RowSplit, StoreKey, as_rows, key_difference

MODES = ("compalign", "shared", "identity")
#: Key fields an aligner must agree on with the data it is applied to (the image set may differ).
MODEL_FIELDS = ("model", "clip", "start_layer", "labels", "preprocess")
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


@torch.no_grad()
def _evaluate(aligner: Aligner, rows: Rows, idx: np.ndarray, batch_size: int) -> float:
    """Mean cosine of the aligned whole to the reader's embedding over rows ``idx`` (ascending);
    chunked rows are read a chunk at a time (each chunk once), mapped ``batch_size`` at a time."""
    total, count = 0.0, 0
    block = max(batch_size, rows.chunk_rows) if rows.chunk_rows < len(rows) else batch_size
    for start in range(0, len(idx), block):
        data = rows.batch(idx[start : start + block])
        for s in range(0, len(data["clip"]), batch_size):
            z = data["clip"][s : s + batch_size].to(aligner.device)
            c = data["contributions"][s : s + batch_size]
            total += F.cosine_similarity(aligner.apply_sum(c), z, dim=-1).sum().item()
            count += len(z)
    return total / max(count, 1)


def evaluate(aligner: Aligner, source: RowSource, batch_size: int = 256) -> dict[str, float]:
    """Mean cosine between the aligned whole and the reader's image embedding over all rows."""
    rows = as_rows(source)
    return {"cosine": _evaluate(aligner, rows, np.arange(len(rows)), batch_size), "n": len(rows)}


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train_aligner` optimises (the objective is set by ``mode`` and ``lam``).

    Adam with ``lr``, mini-batches of ``batch_size`` rows, at most ``max_steps`` steps; a seeded
    ``val_fraction`` of the rows is held out and its cosine measured every ``eval_every`` steps
    (default: once per epoch, at most 100 steps); training stops after ``patience`` evaluations
    without an improvement of ``min_delta``.
    """

    lr: float = DEFAULT_LR
    batch_size: int = ALIGN_BATCH_SIZE
    max_steps: int = ALIGN_STEPS
    eval_every: int | None = None
    patience: int = 5
    min_delta: float = 1e-4
    val_fraction: float = VAL_FRACTION
    seed: int = 0
    window_bytes: int = 256 << 20


@dataclass
class _Maps:
    """The trained parameters: ``weight [n_maps, d_clip, D]`` and ``bias [d_clip]``."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def isometries(cls, n_maps: int, d_clip: int, d_in: int, seed: int, device: torch.device) -> _Maps:
        """Every map starts as the same (seeded) isometry, where the penalty is at its floor."""
        torch.manual_seed(seed)
        init = torch.empty(d_clip, d_in)
        torch.nn.init.orthogonal_(init)
        weight = init.expand(n_maps, d_clip, d_in).clone().to(device).requires_grad_(True)
        return cls(weight, torch.zeros(d_clip, device=device, requires_grad=True))

    def predict(self, c: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "shared":
            return c.sum(1) @ self.weight[0].T + self.bias
        return torch.einsum("bcd,ced->be", c, self.weight) + self.bias

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight.detach().clone(), self.bias.detach().clone()


@dataclass
class _Fit:
    """The course of one training: the best maps so far and when they were found."""

    best: tuple[torch.Tensor, torch.Tensor]
    val_cosine: float
    best_step: int = 0
    steps: int = 0
    stopped: str = "max_steps"
    last_train_cosine: float = float("nan")
    bad: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def record(self, step: int, val: float, maps: _Maps, cfg: TrainConfig) -> bool:
        """Note a held-out cosine; True when training should stop early."""
        self.history.append((step, val))
        if val > self.val_cosine + cfg.min_delta:
            self.val_cosine, self.best_step, self.bad = val, step, 0
            self.best = maps.snapshot()
            return False
        self.bad += 1
        if self.bad >= cfg.patience:
            self.stopped = "early_stopped"
            return True
        return False


def _labels_of(rows: Rows, labels: Sequence[str] | None) -> list[str]:
    labels = rows.labels if labels is None else list(labels)
    if labels is None:
        raise ValueError("give the component labels when training from arrays")
    if "clip" not in rows.shapes:
        raise ValueError("training needs the reader's image embeddings: give (contributions, clip)")
    if rows.shapes["contributions"][0] != len(labels):
        raise MismatchError(f"{rows.shapes['contributions'][0]} components in the data but {len(labels)} labels")
    if len(rows) < 2:
        raise ValueError("need at least 2 images to train an aligner")
    return list(labels)


def train_aligner(
    source: RowSource,
    labels: Sequence[str] | None = None,
    *,
    mode: str = "compalign",
    lam: float = DEFAULT_LAMBDA,
    config: TrainConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **options: Any,
) -> Aligner:
    """Train CompAlign maps (or the shared-map baseline) from rows with the reader's embeddings.

    ``source``: a :class:`~vitdecomp.store.Rows` (a store: mini-batches are read from its chunks)
    or arrays ``(contributions [N, C, D], clip [N, d_clip])``; ``labels`` default to the rows'.
    ``config`` (a :class:`TrainConfig`; ``options`` override its fields, e.g. ``max_steps=500``)
    sets the optimiser, the held-out split and early stopping; the best maps are returned. Rows
    that take more than ``cfg.window_bytes`` as float32 are streamed (see :class:`~vitdecomp.store.RowSplit`): memory
    holds one window of chunks, on ``device`` (default: CUDA when there is one).
    ``lam`` multiplies the ``1/(n * d_clip)``-normalised orthogonality penalty (``lam = 0``: the
    ablation without it).
    """
    if mode not in ("compalign", "shared"):
        raise ValueError(f"mode must be 'compalign' or 'shared' (use identity_aligner for CLIP), not {mode!r}")
    cfg = replace(config or TrainConfig(), **options)
    rows = as_rows(source)
    labels = _labels_of(rows, labels)
    (c_count, d_in), d_clip = rows.shapes["contributions"], rows.shapes["clip"][0]
    split = RowSplit.of(rows, cfg.val_fraction, cfg.seed, cfg.window_bytes)
    eval_every = cfg.eval_every or min(math.ceil(len(split.train) / cfg.batch_size), 100)
    maps = _Maps.isometries(c_count if mode == "compalign" else 1, d_clip, d_in, cfg.seed, resolve_device(device))
    fit = _fit(rows, maps, split, labels, mode, lam, replace(cfg, eval_every=eval_every), progress)
    w, b = fit.best
    metrics = {
        "val_cosine": fit.val_cosine,
        "best_step": fit.best_step,
        "steps": fit.steps,
        "stopped": fit.stopped,
        "last_train_cosine": fit.last_train_cosine,
        "orthogonality": (orthogonality_penalty(w) / d_clip).mean().item(),
        "n_train": len(split.train),
        "n_val": len(split.val),
        "history": fit.history,
    }
    config_dict = {"lr": cfg.lr, "batch_size": cfg.batch_size, "max_steps": cfg.max_steps, "eval_every": eval_every}
    config_dict |= {"patience": cfg.patience, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    key = rows.key.to_dict() if rows.key is not None else None
    return Aligner(w, b, labels, mode=mode, lam=lam, key=key, metrics=metrics, config=config_dict)


def _fit(
    rows: Rows,
    maps: _Maps,
    split: RowSplit,
    labels: list[str],
    mode: str,
    lam: float,
    cfg: TrainConfig,
    progress: bool,
) -> _Fit:
    """Adam on ``1 - cos`` (+ the penalty) until ``cfg.max_steps`` or early stopping (held-out cosine
    every ``cfg.eval_every`` steps)."""
    eval_every = int(cfg.eval_every or 1)

    def held_out() -> float:
        current = Aligner(maps.weight.detach(), maps.bias.detach(), labels, mode=mode, lam=lam)
        return _evaluate(current, rows, split.val, cfg.batch_size)

    opt = torch.optim.Adam([maps.weight, maps.bias], lr=cfg.lr)
    reg = lam / (maps.weight.shape[0] * maps.weight.shape[1])
    fit = _Fit(maps.snapshot(), held_out())
    fit.history.append((0, fit.val_cosine))
    batches = split.minibatches(rows, cfg.batch_size)
    bar = tqdm(total=cfg.max_steps, desc=f"align ({mode}, lam={lam:g})", unit="step", disable=not progress)
    while fit.steps < cfg.max_steps:
        b = next(batches)
        c, z = b["contributions"].to(maps.bias.device), b["clip"].to(maps.bias.device)
        cos = F.cosine_similarity(maps.predict(c, mode), z, dim=-1)
        loss = (1 - cos).mean()
        if reg:
            loss = loss + reg * orthogonality_penalty(maps.weight).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fit.steps += 1
        fit.last_train_cosine = cos.mean().item()
        bar.update(1)
        if fit.steps % eval_every == 0 or fit.steps == cfg.max_steps:
            val = held_out()
            bar.set_postfix(val_cos=f"{val:.4f}", train_cos=f"{fit.last_train_cosine:.4f}")
            if fit.record(fit.steps, val, maps, cfg):
                bar.total = fit.steps  # the bar ends where early stopping ends the work
                bar.set_description(f"align ({mode}, lam={lam:g}, early-stopped)")
                break
    bar.close()
    return fit


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


@torch.no_grad()
def aligned_component(
    source: RowSource,
    aligner: Aligner,
    index: int,
    batch_size: int = 1024,
    stop: int | None = None,
) -> torch.Tensor:
    """One component's aligned contribution over the first ``stop`` images (all by default)
    ``[n, d_clip]`` (float32, aligner's device); only column ``index`` of the rows is read."""
    x = as_rows(source).component(index, stop)
    w = None if aligner.weight is None else aligner.weight[0 if aligner.mode == "shared" else index]
    out = []
    for s in range(0, x.shape[0], batch_size):
        part = x[s : s + batch_size].to(aligner.device, torch.float32)
        out.append(part if w is None else part @ w.T)
    if not out:
        return torch.zeros(0, aligner.out_dim, device=aligner.device)
    return torch.cat(out)


@torch.no_grad()
def aligned_stack(source: RowSource, aligner: Aligner, batch_size: int = 256) -> torch.Tensor:
    """The whole aligned stack ``[N, C, d_clip]`` in memory (small data only; else stream batches)."""
    parts = [aligner.apply(b["contributions"]) for b in as_rows(source).iter_batches(batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, aligner.n_components, aligner.out_dim)


def train_ablation(
    source: RowSource,
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


#: Ridge weight of :func:`whole_map`, relative to the mean variance of a representation dimension.
WHOLE_MAP_RIDGE = 1e-2


@torch.no_grad()
def whole_map(
    source: RowSource, aligner: Aligner | None, ridge: float = WHOLE_MAP_RIDGE, batch_size: int = 512
) -> torch.Tensor:
    """``M [d_clip, D]``: the aligner's map of the whole representation, as one linear map. CompAlign
    maps each part with its own ``W_i``, so the whole has no single map; ``M`` is the ridge
    least-squares map from the representation ``r`` to the aligned whole ``sum_i W_i c_i`` over the
    rows, both centred (ridge ``ridge x`` the mean variance of a dimension of ``r``, which keeps
    directions the images never take from being read through noise). A shared map is its ``W``;
    ``None`` or an identity aligner (a CLIP subject read in its own space) gives the identity.
    Streamed: two ``[D, D]`` / ``[D, d_clip]`` sums."""
    rows = as_rows(source)
    d = rows.shapes["contributions"][1]
    if aligner is None or aligner.weight is None:
        return torch.eye(d)
    if aligner.mode == "shared":
        return aligner.weight[0].float().cpu()
    xx, xa = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, aligner.out_dim, dtype=torch.float64)
    sx, sa, n = torch.zeros(d, dtype=torch.float64), torch.zeros(aligner.out_dim, dtype=torch.float64), 0
    for b in rows.iter_batches(batch_size, ("contributions",)):
        c = b["contributions"]
        x, a = c.sum(1).double(), aligner.apply(c).sum(1).double().cpu()
        xx, xa, sx, sa, n = xx + x.T @ x, xa + x.T @ a, sx + x.sum(0), sa + a.sum(0), n + len(x)
    n = max(n, 1)
    xx, xa = xx - torch.outer(sx, sx) / n, xa - torch.outer(sx, sa) / n
    lam = ridge * float(xx.trace()) / d
    return torch.linalg.solve(xx + lam * torch.eye(d, dtype=xx.dtype), xa).T.float()
