"""The built-in scores over any number of images in flat memory: each keeps sufficient statistics,
batch by batch, instead of every image's projections (:func:`stream_scores`; a score's record names
its statistics in ``Score.stream``).

=============  ===========================================================  ===========================
score          what is kept (per feature)                                   passes over the rows
=============  ===========================================================  ===========================
``paper``,     centred sums of the projections on the feature's directions  1, exact
``invariant``, ``cov [C, r]``, ``var_u [C, r]``, ``var_t [r]`` merged batch
``share``      by batch (:class:`Moments`, Chan et al.'s pairwise update)
``ablation``   the mean projection ``[C, K]`` (pass 1), then the sum of the  2, exact
               per-image KL divergences under that mean (pass 2)
``text_probe`` a seeded sample of at most :data:`PROBE_SAMPLE` images'      2; exact up to
               wholes ``[S, D]`` and zero-shot readings for the probe's       :data:`PROBE_SAMPLE`
               fit, the sum of the contributions ``[C, D]`` (pass 1), then  images, beyond it the
               the sum of the per-image loss rises ``[C]`` (pass 2)          probe is fitted on a sample
``flow``       the per-value sums ``[K, C, D]`` (:class:`ValueSums`)         1, exact
=============  ===========================================================  ===========================

"Exact" means the same formula as the in-memory functions of :mod:`vitdecomp.scores.functions` on the
same numbers, to floating-point rounding (sums taken in another order; ``text_probe``'s mean of the
parts is read off the mean contribution, float64, where the in-memory path averages float32 parts:
agreement to ~1e-6 relative).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from tqdm.auto import tqdm

from vitdecomp.align import Aligner
from vitdecomp.scores.flow import FeatureValues, flow_share
from vitdecomp.scores.functions import (
    directions,
    fit_text_probes,
    invariant_from_moments,
    paper_from_moments,
    probe_logits,
    score_ablation,
    share_from_moments,
    text_probe_rises,
)
from vitdecomp.scores.registry import KINDS, get_score, resolve
from vitdecomp.store import RowBatch, Rows

#: Most images ``text_probe``'s probe is fitted on: beyond it, a seeded sample of this many images
#: (:data:`PROBE_SEED`; the readouts and the loss rises still read every image). The default analysis
#: (2,000 images) and the 1e4-image benchmark fit on every image.
PROBE_SAMPLE = 10_000
PROBE_SEED = 0
#: Relative spread below which a projection is taken as constant (:meth:`Moments.centred`).
ROUND_OFF = 1e-12


class StreamBatch:
    """One batch of rows as the streamed scores read it: ``contributions [b, C, D]`` (the subject's
    space), the index of its first row ``start``, the aligned whole's norm ``norm [b]``, the embedding
    its zero-shot readings read ``reading [b, d_clip]`` (the reader's own where the rows hold it, else
    the aligned whole) and :meth:`projected`, each ``(kind, feature)``'s projections, computed once."""

    def __init__(self, rows: RowBatch, start: int, aligner: Aligner, bases: Mapping[tuple[str, str], torch.Tensor]):
        self.contributions = rows["contributions"]
        self.start = start
        self.aligned = aligner.apply(self.contributions).double()  # [b, C, d_clip]
        self._bias = aligner.bias.double()
        whole = self.aligned.sum(1) + self._bias
        self.norm = whole.norm(dim=-1)
        clip = rows.get("clip")
        self.reading = whole if clip is None else clip
        self._bases = bases
        self._done: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int(self.contributions.shape[0])

    def projected(self, kind: str, feature: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u [b, C, r], whole [b, r])``: the aligned parts and the aligned whole (parts + the
        aligner's bias) on the directions of ``kind`` for ``feature`` (float64)."""
        key = (kind, feature)
        if key not in self._done:
            basis = self._bases[key]
            u = self.aligned @ basis
            self._done[key] = (u, u.sum(1) + self._bias @ basis)
        return self._done[key]


class StreamedScore(Protocol):
    """A score's sufficient statistics over the rows: ``passes`` over them, :meth:`add` per batch,
    :meth:`end_pass` after each pass (``progress``: work done there shows a bar), :meth:`scores` ``[F, C]``
    (rows: the features in order)."""

    passes: int

    def add(self, step: int, batch: StreamBatch) -> None: ...

    def end_pass(self, step: int, progress: bool = False) -> None: ...

    def scores(self) -> torch.Tensor: ...


class Moments:
    """Centred sums of one feature's projections over the images seen: ``n``, the means ``mu [C, r]``,
    ``mt [r]``, and ``cov = sum (u - mu)(t - mt)``, ``var_u = sum (u - mu)^2`` ``[C, r]``, ``var_t =
    sum (t - mt)^2`` ``[r]``; a batch is centred on its own means and merged (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mu = self.mt = self.cov = self.var_u = self.var_t = torch.zeros(())

    def add(self, u: torch.Tensor, t: torch.Tensor) -> None:
        """``u [b, C, r]``, ``t [b, r]`` (float64)."""
        nb = u.shape[0]
        if nb == 0:
            return
        mu, mt = u.mean(0), t.mean(0)
        uc, tc = u - mu, t - mt
        cov, var_u, var_t = (uc * tc[:, None]).sum(0), uc.square().sum(0), tc.square().sum(0)
        if self.n == 0:
            self.n, self.mu, self.mt, self.cov, self.var_u, self.var_t = nb, mu, mt, cov, var_u, var_t
            return
        n = self.n + nb
        du, dt, f = mu - self.mu, mt - self.mt, self.n * nb / n
        self.cov = self.cov + cov + f * du * dt[None]
        self.var_u = self.var_u + var_u + f * du.square()
        self.var_t = self.var_t + var_t + f * dt.square()
        self.mu, self.mt, self.n = self.mu + du * (nb / n), self.mt + dt * (nb / n), n

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cov [1, C, r], var_u [1, C, r], var_t [1, 1, r])``: the shapes of one bootstrap resample.
        A direction whose spread is round-off (``var_u <= n (ROUND_OFF |mu|)^2``: a part that is the
        same vector on every image, e.g. a bias) has no variation: its sums are 0 (the batches' means
        differ in their last bits, and the correlation of those bits is noise, not a score)."""
        flat = self.var_u <= self.n * (ROUND_OFF * self.mu.abs()).square()
        cov, var_u = self.cov.masked_fill(flat, 0.0), self.var_u.masked_fill(flat, 0.0)
        var_t = self.var_t.masked_fill(self.var_t <= self.n * (ROUND_OFF * self.mt.abs()).square(), 0.0)
        return cov[None], var_u[None], var_t[None, None]


MomentScore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MomentSums:
    """``paper`` / ``invariant`` / ``share``: :class:`Moments` per feature, one pass; the score is
    ``from_moments(cov, var_u, var_t)``, the function the bootstrap's resamples use too."""

    passes = 1

    def __init__(self, kind: str, features: list[str], from_moments: MomentScore) -> None:
        self.kind, self.from_moments = kind, from_moments
        self.moments = {f: Moments() for f in features}

    def add(self, step: int, batch: StreamBatch) -> None:
        for f, m in self.moments.items():
            m.add(*batch.projected(self.kind, f))

    def end_pass(self, step: int, progress: bool = False) -> None:
        pass

    def scores(self) -> torch.Tensor:
        return torch.stack([self.from_moments(*m.centred())[0] for m in self.moments.values()])


class AblationSums:
    """``ablation``: the mean projection on the unit descriptions per feature (pass 1), then the sum
    over images of the KL divergences with the part replaced by that mean (pass 2)."""

    passes = 2

    def __init__(self, features: list[str], n: int) -> None:
        self.n = n
        self.sums: dict[str, torch.Tensor] = dict.fromkeys(features, torch.zeros((), dtype=torch.float64))
        self.kl: dict[str, torch.Tensor] = dict.fromkeys(features, torch.zeros((), dtype=torch.float64))

    def add(self, step: int, batch: StreamBatch) -> None:
        for f in self.sums:
            u, whole = batch.projected("text", f)
            if step == 0:
                self.sums[f] = self.sums[f] + u.sum(0)
            else:
                mean = self.sums[f] / self.n
                self.kl[f] = self.kl[f] + score_ablation(u, whole, batch.norm, per_image=True, mean=mean).sum(0)

    def end_pass(self, step: int, progress: bool = False) -> None:
        pass

    def scores(self) -> torch.Tensor:
        return torch.stack([kl / self.n for kl in self.kl.values()])


def probe_sample(n: int, size: int = PROBE_SAMPLE, seed: int = PROBE_SEED) -> torch.Tensor:
    """The rows ``text_probe``'s probe is fitted on, ascending: every row when ``n <= size``, else a
    seeded uniform sample of ``size`` rows ``[size]``."""
    if n <= size:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values


class TextProbeSums:
    """``text_probe``: pass 1 keeps the sampled images' wholes ``[S, D]`` and zero-shot readings
    (:func:`probe_sample`) and the sum of the contributions ``[C, D]``; the probes are fitted between
    the passes (:func:`~vitdecomp.scores.functions.fit_text_probes`); pass 2 sums every image's loss
    rises ``[C]`` (:func:`~vitdecomp.scores.functions.text_probe_rises`, the parts' mean read off the
    mean contribution: the readout is linear)."""

    passes = 2

    def __init__(self, features: list[str], n: int, sample: int = PROBE_SAMPLE) -> None:
        self.features, self.n = features, n
        self.keep = probe_sample(n, sample)
        self.wholes: list[torch.Tensor] = []
        self.readings: dict[str, list[torch.Tensor]] = {f: [] for f in features}
        self.total = torch.zeros((), dtype=torch.float64)
        self.rises: dict[str, torch.Tensor] = dict.fromkeys(features, torch.zeros((), dtype=torch.float64))
        self.weight = torch.zeros(())  # [D, sum K]: every probe's standardised weights, side by side
        self.mean_parts: dict[str, torch.Tensor] = {}
        self.probes: dict = {}

    def add(self, step: int, batch: StreamBatch) -> None:
        c = batch.contributions
        if step == 0:
            lo, hi = torch.searchsorted(self.keep, torch.tensor([batch.start, batch.start + len(batch)])).tolist()
            rows = self.keep[lo:hi] - batch.start
            self.wholes.append(c[rows].double().sum(1).cpu())
            for f in self.features:
                self.readings[f].append(batch.projected("text", f)[1][rows].cpu())
            self.total = self.total + c.double().sum(0).cpu()
            return
        shares = torch.split(c.float().cpu() @ self.weight, [p.weight.shape[-1] for p, _ in self.probes.values()], 2)
        whole = c.double().sum(1).cpu()
        for f, part in zip(self.probes, shares, strict=True):
            probe, _ = self.probes[f]
            labels = batch.projected("text", f)[1].argmax(1).cpu()
            rise = text_probe_rises(part, probe_logits(probe, whole), labels, mean=self.mean_parts[f])
            self.rises[f] = self.rises[f] + rise.sum(0)

    def end_pass(self, step: int, progress: bool = False) -> None:
        if step != 0:
            return
        readings = {f: torch.cat(r) for f, r in self.readings.items()}
        self.probes = fit_text_probes(torch.cat(self.wholes), readings, progress=progress)
        self.wholes, self.readings = [], {}
        self.weight = torch.cat([p.weight[0] / p.sd[0, 0][:, None] for p, _ in self.probes.values()], 1)
        mean_c = self.total / self.n  # [C, D]
        for f, (p, _) in self.probes.items():
            self.mean_parts[f] = mean_c @ (p.weight[0] / p.sd[0, 0][:, None]).double()  # [C, K]

    def scores(self) -> torch.Tensor:
        means = [r / self.n for r in self.rises.values()]
        return torch.stack([m / m.abs().sum().clamp_min(1e-30) for m in means])


class FlowSums:
    """``flow``: the per-value sums of the contributions under every image's reading, one pass."""

    passes = 1

    def __init__(self, feature_emb: Mapping[str, torch.Tensor]) -> None:
        self.values = FeatureValues(feature_emb)

    def add(self, step: int, batch: StreamBatch) -> None:
        self.values.add(batch.contributions, batch.reading)

    def end_pass(self, step: int, progress: bool = False) -> None:
        pass

    def scores(self) -> torch.Tensor:
        return torch.stack([flow_share(self.values.values[f]) for f in self.values.texts])


# ------------------------------------------------------------------------------ the records' factories
def paper(feature_emb: Mapping[str, torch.Tensor], n: int) -> StreamedScore:
    return MomentSums("qr", list(feature_emb), paper_from_moments)


def invariant(feature_emb: Mapping[str, torch.Tensor], n: int) -> StreamedScore:
    return MomentSums("span", list(feature_emb), invariant_from_moments)


def share(feature_emb: Mapping[str, torch.Tensor], n: int) -> StreamedScore:
    return MomentSums("span", list(feature_emb), share_from_moments)


def ablation(feature_emb: Mapping[str, torch.Tensor], n: int) -> StreamedScore:
    return AblationSums(list(feature_emb), n)


def text_probe(feature_emb: Mapping[str, torch.Tensor], n: int) -> StreamedScore:
    return TextProbeSums(list(feature_emb), n, PROBE_SAMPLE)


def flow(feature_emb: Mapping[str, torch.Tensor], n: int) -> StreamedScore:
    return FlowSums(feature_emb)


# ------------------------------------------------------------------------------ the driver
@torch.no_grad()
def stream_scores(
    rows: Rows,
    aligner: Aligner,
    feature_emb: Mapping[str, torch.Tensor],
    methods: list[str],
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``{method: scores [F, C]}`` for methods whose record has a ``stream``: as many passes over the
    rows as the most any of them needs (1 or 2), each batch aligned once and projected once per
    ``(kind, feature)`` it is read on; memory: the statistics above, not the images."""
    n = len(rows)
    if n == 0:
        raise ValueError("no images to score")
    if not methods:
        return {}
    streams = {m: resolve(get_score(m).stream)(feature_emb, n) for m in methods}
    bases = {(k, f): directions(e, k).to(aligner.device) for k in KINDS for f, e in feature_emb.items()}
    passes = max(s.passes for s in streams.values())
    with tqdm(total=n * passes, desc="score features", unit="img", disable=not progress) as bar:
        for step in range(passes):
            active = [s for s in streams.values() if s.passes > step]
            start = 0
            for b in rows.iter_batches(batch_size):
                batch = StreamBatch(b, start, aligner, bases)
                for s in active:
                    s.add(step, batch)
                start += len(batch)
                bar.update(len(batch))
            for s in active:
                s.end_pass(step, progress)
    return {m: s.scores() for m, s in streams.items()}
