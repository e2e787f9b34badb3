"""Train a TopK sparse autoencoder on an analysis' representations, streamed from its store.

The training itself is the ``overcomplete`` library's (``TopKSAE`` with a linear encoder, its
``train_sae`` loop, the AuxK loss ``top_k_auxiliary_loss`` of Gao et al. 2024 that keeps latents
alive, its ``CosineScheduler``); this module feeds it and exports the result as a
:class:`~vitdecomp.sae.model.SparseAutoencoder`. The dictionary starts at the representations of
random training images and the encoder at its transpose (overcomplete's ``untied`` copy), which kept
every latent alive on the built-in world where a random start left 10 % dead:

1. one streamed pass over the training rows' representations (the ``representation`` array only,
   chunk by chunk) gives their mean, their per-dimension RMS and how many principal directions hold
   99 % of their variance (``r99``);
2. the SAE reads ``(r - mean) / rms``; unless given, ``latents = 2 r99`` (a multiple of 8, in
   ``[16, 16 D]``) and ``k = r99 / 2`` (in ``[4, 32]``): a representation whose images vary along
   17 directions (the built-in world: 21 attribute values) gets 40 latents and k = 8;
3. ``steps`` Adam steps on mini-batches drawn within shuffled windows of chunks
   (:class:`~vitdecomp.store.RowSplit`), a held-out ``val_fraction`` of the chunks never seen.

Memory holds one window (``window_bytes``) of representations, whatever the number of images.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vitdecomp.errors import UsageError
from vitdecomp.sae.model import SparseAutoencoder
from vitdecomp.store import Rows, RowSplit

REP = ("representation",)


@dataclass(frozen=True)
class SaeTrainConfig:
    """How :func:`train_sae` trains: ``latents`` and ``k`` (``None``: from the data, see the module
    text), ``steps`` Adam steps of ``batch_size`` rows at learning rate ``lr`` (cosine schedule, 5 %
    warm-up), the AuxK weight ``aux_penalty``, the held-out ``val_fraction`` of the rows (whole
    chunks of a store), ``seed``, and the bytes of representations held at once."""

    latents: int | None = None
    k: int | None = None
    steps: int = 2000
    batch_size: int = 256
    lr: float = 3e-3
    aux_penalty: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0
    window_bytes: int = 64 << 20


@dataclass
class Moments:
    """Of the training representations: ``mean [D]``, the RMS of a centred dimension, the count and
    ``r99``, the number of principal directions that hold 99 % of the variance."""

    mean: Tensor
    rms: float
    n: int
    r99: int


@dataclass
class TrainedSae:
    """An SAE :func:`train_sae` made, the rows it held out (``split.val``), the moments it read and
    its training figures (``seconds``, ``steps``, ``latents``, ``k``)."""

    sae: SparseAutoencoder
    split: RowSplit
    moments: Moments
    figures: dict[str, Any]


@contextlib.contextmanager
def _matplotlib_compat() -> Iterator[None]:
    """overcomplete 0.3.0 builds colormaps at import with ``matplotlib.cm.get_cmap``, removed in
    matplotlib 3.9: lend it the registry's own getter for the import only."""
    import matplotlib
    import matplotlib.cm as cm

    lent = not hasattr(cm, "get_cmap")
    if lent:
        cm.get_cmap = matplotlib.colormaps.get_cmap  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if lent:
            del cm.get_cmap


@functools.cache
def overcomplete_sae() -> Any:
    """The ``overcomplete.sae`` module (imported once; ``pip install 'vitdecomp[sae]'``)."""
    try:
        with _matplotlib_compat():
            import overcomplete.sae as sae
    except ImportError:
        raise UsageError("training an SAE needs overcomplete: pip install 'vitdecomp[sae]'") from None
    return sae


@torch.no_grad()
def moments(rows: Rows, index: np.ndarray, batch_size: int = 4096) -> Moments:
    """:class:`Moments` of the representations of rows ``index`` (ascending), streamed."""
    d = rows.shapes["representation"][0]
    s, ss, n = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0
    for start in range(0, len(index), batch_size):
        r = rows.batch(index[start : start + batch_size], REP)["representation"].double()
        s, ss, n = s + r.sum(0), ss + r.T @ r, n + len(r)
    mean = s / max(n, 1)
    cov = ss / max(n, 1) - torch.outer(mean, mean)
    eig = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
    share = eig.cumsum(0) / eig.sum().clamp_min(1e-300)
    r99 = int((share < 0.99).sum()) + 1
    return Moments(mean.float(), float(math.sqrt(max(float(eig.sum()), 1e-30) / d)), n, r99)


def default_size(dim: int, r99: int) -> tuple[int, int]:
    """``(latents, k)`` for a ``dim``-dim representation whose variance lies along ``r99`` directions."""
    latents = min(max(16, 8 * math.ceil(2 * r99 / 8)), 16 * dim)
    return latents, min(32, max(4, r99 // 2))


def _data_init(rows: Rows, split: RowSplit, m: Moments, latents: int, seed: int) -> np.ndarray:
    """``[latents, D]``: normalised representations of random training images (with replacement when
    there are fewer), the dictionary's first rows."""
    gen = np.random.default_rng(seed)
    pick = np.sort(gen.choice(split.train, latents, replace=len(split.train) < latents))
    r = rows.batch(np.unique(pick), REP)["representation"]
    r = r[torch.from_numpy(np.searchsorted(np.unique(pick), pick))]
    return ((r - m.mean) / m.rms).numpy()


class _Batches:
    """``steps`` normalised training batches, for overcomplete's loop (one "epoch" of it), with a
    progress bar."""

    def __init__(self, rows: Rows, split: RowSplit, m: Moments, cfg: SaeTrainConfig, progress: bool) -> None:
        self.rows, self.split, self.m, self.cfg, self.progress = rows, split, m, cfg, progress

    def __iter__(self) -> Iterator[Tensor]:
        bar = tqdm(total=self.cfg.steps, desc="SAE", unit="step", leave=False, disable=not self.progress)
        done = 0
        while done < self.cfg.steps:
            for b in self.split.epoch(self.rows, self.cfg.batch_size):
                yield (b["representation"] - self.m.mean) / self.m.rms
                done += 1
                bar.update(1)
                if done >= self.cfg.steps:
                    break
        bar.close()


def train_sae(rows: Rows, cfg: SaeTrainConfig | None = None, progress: bool = True) -> TrainedSae:
    """A TopK SAE of the representations of ``rows`` (see the module text); CPU, float32."""
    cfg = cfg or SaeTrainConfig()
    if len(rows) < 2:
        raise UsageError(f"training an SAE needs at least 2 images, the analysis has {len(rows)}")
    split = RowSplit.of(rows, cfg.val_fraction, cfg.seed, cfg.window_bytes, REP)
    m = moments(rows, np.sort(split.train))
    dim = rows.shapes["representation"][0]
    auto_latents, auto_k = default_size(dim, m.r99)
    latents, k = cfg.latents or auto_latents, min(cfg.k or auto_k, cfg.latents or auto_latents)
    oc = overcomplete_sae()
    torch.manual_seed(cfg.seed)
    start = _data_init(rows, split, m, latents, cfg.seed)
    model = oc.TopKSAE(dim, latents, top_k=k, encoder_module="linear", dictionary_params={"initializer": start})
    model.untied(bias=True, copy_from_dictionary=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    warm = max(1, cfg.steps // 20)
    sched = oc.CosineScheduler(opt, cfg.lr, cfg.lr / 10, cfg.steps, warmup_iters=warm, start_warmup_value=cfg.lr / 10)
    loss = functools.partial(oc.losses.top_k_auxiliary_loss, penalty=cfg.aux_penalty)
    t0 = time.time()
    oc.train_sae(model, _Batches(rows, split, m, cfg, progress), loss, opt, sched, nb_epochs=1, monitoring=0)
    model.eval()
    sae = SparseAutoencoder(
        model.encoder.weight.detach().clone(),
        model.encoder.bias.detach().clone(),
        model.get_dictionary().detach().clone(),
        torch.zeros(dim),
        activation="topk",
        k=k,
        shift=m.mean,
        gain=1.0 / m.rms,
        info={"trained_on": len(split.train), "held_out": len(split.val), "steps": cfg.steps, "r99": m.r99},
    )
    figures = {"seconds": time.time() - t0, "steps": cfg.steps, "latents": latents, "k": k}
    return TrainedSae(sae, split, m, figures)
