"""The passes of ``vitdecomp features`` over an analysis' store, chunk by chunk (memory does not grow
with the images, except the latents kept sparse: ``N x L0`` pairs).

:func:`measure_latents` (every image): each image's latents (:class:`SparseCodes`), each latent's
exact split over the parts and its completeness error, how often and how strongly it fires, its
top images, and on the held-out images the SAE's figures (explained variance, L0).
:func:`read_held_out` (the held-out images, once the latents are named): how much of each latent's
activation its name's text direction explains (the confidence), and whether the model's own reading
survives the representation being replaced by the SAE's reconstruction.

A part's **share** of latent ``j`` is its covariance share of the pre-activation over the images,
``share_i = Cov(p_ij, a_j) / Var(a_j)`` with ``p_ij`` the part's term of the exact split: the shares
sum to 1 over the parts (constant parts get 0), a part that carries the latent's variation is
positive, one that works against it negative.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vitdecomp.sae import SparseAutoencoder, split_blocks
from vitdecomp.store import Rows

PARTS = ("contributions", "representation")


@dataclass
class SparseCodes:
    """The latents of ``N`` images, the nonzero ones only (compressed rows): image ``n``'s are
    ``index[indptr[n]:indptr[n+1]]`` (latent ids) with ``value[...]``; ``n_latents`` columns."""

    indptr: np.ndarray
    index: np.ndarray
    value: np.ndarray
    n_latents: int

    @classmethod
    def of(cls, blocks: list[Tensor], n_latents: int) -> SparseCodes:
        """From dense blocks ``[b, L]`` of consecutive images."""
        counts, index, value = [np.zeros(1, np.int64)], [], []
        for z in blocks:
            nz = z.nonzero()
            counts.append(np.bincount(nz[:, 0].numpy(), minlength=len(z)).astype(np.int64))
            index.append(nz[:, 1].numpy().astype(np.int32))
            value.append(z[nz[:, 0], nz[:, 1]].numpy().astype(np.float32))
        cat = lambda xs, t: np.concatenate(xs) if xs else np.zeros(0, t)  # noqa: E731
        return cls(np.cumsum(cat(counts, np.int64)), cat(index, np.int32), cat(value, np.float32), n_latents)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def dense(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Images ``start:stop`` as ``[n, L]`` float32."""
        stop = len(self) if stop is None else min(stop, len(self))
        out = np.zeros((max(0, stop - start), self.n_latents), np.float32)
        lo, hi = self.indptr[start], self.indptr[stop]
        rows = np.repeat(np.arange(stop - start), np.diff(self.indptr[start : stop + 1]))
        out[rows, self.index[lo:hi]] = self.value[lo:hi]
        return out

    def write_npy(self, f: IO[bytes], block: int = 4096) -> None:
        """Write the dense ``[N, L]`` float32 array as a ``.npy`` file, ``block`` images at a time."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (len(self), self.n_latents)})
        for start in range(0, len(self), block):
            f.write(self.dense(start, start + block).tobytes())


@dataclass
class LatentMeasures:
    """What :func:`measure_latents` found: the ``codes``; ``shares [C, L]`` (see the module text);
    per latent ``frequency [L]`` (share of images it fires on) and ``mean_activation [L]`` (when on);
    ``top_rows [L, n]`` / ``top_values [L, n]``, its strongest images (value 0: fewer fire);
    the split's completeness error (``max_error``, ``mean_error``: ``||sum of parts + constant - a||
    / ||a||`` per image); on the held-out images ``explained_variance`` and ``l0``; ``n_held_out``."""

    codes: SparseCodes
    shares: np.ndarray
    frequency: np.ndarray
    mean_activation: np.ndarray
    top_rows: np.ndarray
    top_values: np.ndarray
    max_error: float
    mean_error: float
    explained_variance: float
    l0: float
    n_held_out: int


@dataclass
class _Sums:
    """Running sums of one pass (float64)."""

    n_parts: int
    n_latents: int
    dim: int
    top: int
    p: Tensor = field(init=False)
    pa: Tensor = field(init=False)

    def __post_init__(self) -> None:
        c, lat = self.n_parts, self.n_latents
        self.p, self.pa = torch.zeros(c, lat, dtype=torch.float64), torch.zeros(c, lat, dtype=torch.float64)
        self.a, self.aa = torch.zeros(lat, dtype=torch.float64), torch.zeros(lat, dtype=torch.float64)
        self.on, self.z = torch.zeros(lat, dtype=torch.float64), torch.zeros(lat, dtype=torch.float64)
        self.err_max, self.err_sum, self.n = 0.0, 0.0, 0
        self.sse, self.rs, self.rr, self.l0, self.n_held = 0.0, torch.zeros(self.dim, dtype=torch.float64), 0.0, 0.0, 0
        self.best_v, self.best_i = torch.empty(0, lat), torch.empty(0, lat, dtype=torch.long)

    def add_top(self, z: Tensor, start: int) -> None:
        """Merge a batch into the running top images of every latent."""
        rows = torch.arange(start, start + len(z))[:, None].expand_as(z)
        v, i = torch.cat([self.best_v, z]), torch.cat([self.best_i, rows])
        self.best_v, keep = v.topk(min(self.top, len(v)), dim=0)
        self.best_i = i.gather(0, keep)

    def add_held_out(self, r: Tensor, r_hat: Tensor, z: Tensor) -> None:
        r = r.double()
        self.sse += float((r - r_hat.double()).square().sum())
        self.rs, self.rr = self.rs + r.sum(0), self.rr + float(r.square().sum())
        self.l0 += float((z > 0).sum())
        self.n_held += len(r)


def _split_batch(sae: SparseAutoencoder, c: Tensor, r: Tensor, a: Tensor, s: _Sums) -> Tensor:
    """Add a batch's exact split to the sums; returns the per-image relative completeness error."""
    total = torch.zeros_like(a)
    for sl in split_blocks(len(c), c.shape[1], a.shape[1]):
        p = sae.split(c, r, sl)  # [b, C, l]
        s.p[:, sl] += p.sum(0).double()
        s.pa[:, sl] += torch.einsum("bcl,bl->cl", p.double(), a[:, sl].double())
        total[:, sl] = p.sum(1)
    ad = a.double()
    return ((total.double() + sae.constant(r).double() - ad).norm(dim=1) / ad.norm(dim=1).clamp_min(1e-30)).float()


@torch.no_grad()
def measure_latents(
    rows: Rows, sae: SparseAutoencoder, held_out: np.ndarray, top: int = 8, batch_size: int = 256, progress: bool = True
) -> LatentMeasures:
    """One pass over every row of ``rows`` (``held_out``: bool ``[N]``, the images the SAE was not
    trained on); see :class:`LatentMeasures`."""
    s = _Sums(rows.shapes["contributions"][0], sae.n_latents, sae.d_in, top)
    blocks, start = [], 0
    bar = tqdm(total=len(rows), desc="latents", unit="img", leave=False, disable=not progress)
    for b in rows.iter_batches(batch_size, PARTS):
        c, r = b["contributions"], b["representation"]
        a = sae.pre_activation(r)
        z = sae.activate(a)
        err = _split_batch(sae, c, r, a, s)
        s.err_max, s.err_sum, s.n = max(s.err_max, float(err.max())), s.err_sum + float(err.sum()), s.n + len(r)
        s.a, s.aa = s.a + a.double().sum(0), s.aa + a.double().square().sum(0)
        s.on, s.z = s.on + (z > 0).double().sum(0), s.z + z.double().sum(0)
        s.add_top(z, start)
        h = torch.from_numpy(np.asarray(held_out[start : start + len(r)], bool))
        if h.any():
            s.add_held_out(r[h], sae.decode(z[h], r[h]), z[h])
        blocks.append(z)
        start += len(r)
        bar.update(len(r))
    bar.close()
    return _measures(s, SparseCodes.of(blocks, sae.n_latents))


def _measures(s: _Sums, codes: SparseCodes) -> LatentMeasures:
    n = max(s.n, 1)
    var = (s.aa / n - (s.a / n).square()).clamp_min(1e-30)
    shares = (s.pa / n - (s.p / n) * (s.a / n)[None]) / var[None]
    sst = s.rr - float(s.rs.square().sum()) / max(s.n_held, 1)
    return LatentMeasures(
        codes=codes,
        shares=shares.numpy(),
        frequency=(s.on / n).numpy(),
        mean_activation=(s.z / s.on.clamp_min(1)).numpy(),
        top_rows=s.best_i.T.numpy(),
        top_values=s.best_v.T.numpy(),
        max_error=s.err_max,
        mean_error=s.err_sum / n,
        explained_variance=1.0 - s.sse / sst if sst > 0 else float("nan"),
        l0=s.l0 / max(s.n_held, 1),
        n_held_out=s.n_held,
    )


# ---------------------------------------------------------------------------- the held-out reading
#: Maps an image's whole representation ``[b, D]`` into CLIP space (``M r``, the aligner's whole map).
Reading = Callable[[Tensor], Tensor]


@dataclass
class HeldOutReading:
    """On the held-out images: ``confidence [L]`` (the squared correlation of each latent's activation
    with the projection of the aligned whole on its name's text direction; NaN when it never fires
    there) and ``agreement`` (``{"zero_shot": {feature: share}, "model_head": {attribute: share}}``:
    images whose reading is the same on the SAE's reconstruction as on the representation)."""

    confidence: np.ndarray
    agreement: dict[str, dict[str, float]]


@dataclass
class Readers:
    """What :func:`read_held_out` reads with: ``whole(c [b, C, D], r [b, D]) -> [b, d_clip]`` the
    aligned whole; ``to_clip``: the whole map ``M [d_clip, D]``; ``names [L, d_clip]``: each latent's
    name as a text direction; ``features``: ``{feature: [V, d_clip]}`` value texts; ``heads``: the
    model's own ``{attribute: predict(r [b, D]) -> [b]}``."""

    whole: Callable[[Tensor, Tensor], Tensor]
    to_clip: Tensor
    names: Tensor
    features: Mapping[str, Tensor]
    heads: Mapping[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)


def _agreements(readers: Readers, whole: Tensor, moved: Tensor, r: Tensor, r_hat: Tensor) -> dict[str, dict[str, int]]:
    """Images of a batch whose reading is the same on the reconstruction (``moved``: its aligned
    whole; ``r_hat``: itself) as on the original (``whole``, ``r``)."""
    unit = torch.nn.functional.normalize
    out: dict[str, dict[str, int]] = {"zero_shot": {}, "model_head": {}}
    whole, moved = unit(whole, dim=-1), unit(moved, dim=-1)
    for f, emb in readers.features.items():
        e = unit(emb.float(), dim=-1)
        out["zero_shot"][f] = int(((whole @ e.T).argmax(1) == (moved @ e.T).argmax(1)).sum())
    for attr, predict in readers.heads.items():
        out["model_head"][attr] = int((predict(r) == predict(r_hat)).sum())
    return out


@torch.no_grad()
def read_held_out(
    rows: Rows, sae: SparseAutoencoder, held_out: np.ndarray, readers: Readers, batch_size: int = 256
) -> HeldOutReading:
    """One pass over the held-out rows (``held_out``: bool ``[N]``); see :class:`HeldOutReading`."""
    m = {k: torch.zeros(sae.n_latents, dtype=torch.float64) for k in ("z", "zz", "q", "qq", "zq")}
    same: dict[str, dict[str, float]] = {"zero_shot": {}, "model_head": {}}
    n, index = 0, np.flatnonzero(held_out)
    for s in range(0, len(index), batch_size):
        b = rows.batch(index[s : s + batch_size], PARTS)
        c, r = b["contributions"], b["representation"]
        z = sae.encode(r)
        r_hat = sae.decode(z, r)
        whole = readers.whole(c, r).float()
        q = whole @ readers.names.float().T  # [b, L]
        for k, v in (("z", z), ("zz", z * z), ("q", q), ("qq", q * q), ("zq", z * q)):
            m[k] += v.double().sum(0)
        for kind, counts in _agreements(readers, whole, whole + (r_hat - r) @ readers.to_clip.T, r, r_hat).items():
            for key, v in counts.items():
                same[kind][key] = same[kind].get(key, 0.0) + v
        n += len(r)
    n = max(n, 1)
    cov = m["zq"] / n - m["z"] / n * m["q"] / n
    var_z, var_q = m["zz"] / n - (m["z"] / n) ** 2, m["qq"] / n - (m["q"] / n) ** 2
    conf = torch.where(var_z > 1e-20, cov.square() / (var_z * var_q).clamp_min(1e-30), torch.nan)
    return HeldOutReading(conf.numpy(), {kind: {k: v / n for k, v in d.items()} for kind, d in same.items()})
