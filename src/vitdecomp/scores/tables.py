"""Every component's scores for every feature, streaming the rows once: :func:`score_features` (a
:class:`ScoreTable` per score), :func:`project_features` (the projections every asked-for score
reads, :class:`Projections`) and :func:`score` (one feature of an aligned stack in memory).

Which directions a score projects on, whether it is a mean over images and whether it needs the
text-taught probe all come from its record (:mod:`vitdecomp.scores.registry`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitdecomp.align import Aligner
from vitdecomp.scores.flow import FeatureValues
from vitdecomp.scores.functions import Projected, directions, fit_text_probes, probe_logits, probe_readout
from vitdecomp.scores.registry import get_score
from vitdecomp.scores.streamed import stream_scores
from vitdecomp.store import RowBatch, Rows, RowSource, as_rows


def score(aligned: torch.Tensor, text_emb: torch.Tensor, method: str = "invariant") -> torch.Tensor:
    """Scores ``[C]`` of the components of an aligned stack ``[N, C, d_clip]`` for one feature
    given by its description embeddings ``text_emb [K, d_clip]`` (the whole is the stack's sum; a
    probe the score needs reads that sum and the per-value sums are the stack's, the stack being its own
    space and its sum the reading)."""
    record = get_score(method)
    u = aligned.double() @ directions(text_emb, record.kind).to(aligned.device)
    p = Projected(u, u.sum(1), aligned.double().sum(1).norm(dim=-1))
    if record.needs_probe:
        ((fitted, y),) = fit_text_probes(aligned.sum(1), {"": u.sum(1)}).values()
        p.probe = (probe_readout(aligned.cpu(), fitted), probe_logits(fitted, aligned.sum(1).cpu()), y)
    if record.needs_values:
        values = FeatureValues({"": text_emb})
        values.add(aligned, aligned.sum(1))
        p.values = values.values[""]
    return record.compute(p)


def json_float32(v: float) -> float:
    """A float32 value as the shortest decimal that reads back as the same float32 (``0.0012345679``,
    not the 17 digits of its float64): what ``results.json`` writes for float32 tensors, a third of
    the bytes and no precision lost."""
    return float(str(np.float32(v)))


@dataclass
class ScoreTable:
    """Scores of every component for every feature: ``scores [F, C]`` (rows ``features``,
    columns ``labels``), computed with ``method``."""

    scores: torch.Tensor
    features: list[str]
    labels: list[str]
    method: str

    def __getitem__(self, feature: str) -> torch.Tensor:
        return self.scores[self.features.index(feature)]

    def ranking(self, feature: str, top: int | None = None) -> list[tuple[str, float]]:
        """Components ranked for ``feature``, best first: ``[(label, score), ...]``."""
        s = self[feature]
        order = torch.argsort(s, descending=True, stable=True).tolist()
        return [(self.labels[i], float(s[i])) for i in order[:top]]

    def rankings(self, top: int | None = None) -> dict[str, list[tuple[str, float]]]:
        return {f: self.ranking(f, top) for f in self.features}

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{feature: {component label: score}}`` (JSON-ready; each float32 score as the shortest
        decimal that reads back as it, :func:`json_float32`)."""
        return {
            f: {lab: json_float32(v) for lab, v in zip(self.labels, row.tolist(), strict=True)}
            for f, row in zip(self.features, self.scores, strict=True)
        }

    def table(self, top: int = 5) -> str:
        """A plain-text ranked table: one line per feature with its ``top`` components."""
        width = max((len(f) for f in self.features), default=0)
        lines = [f"top components per feature ({self.method} score)"]
        for f in self.features:
            cells = ", ".join(f"{lab} {v:.3f}" for lab, v in self.ranking(f, top))
            lines.append(f"  {f:<{width}}  {cells}")
        return "\n".join(lines)


@dataclass
class Projections:
    """Every image's aligned components and aligned whole projected on the directions of each
    ``(kind, feature)`` (:func:`project_features`): ``parts[(kind, feature)] = (u [N, C, r], whole
    [N, r])`` (``whole`` = the sum of the parts + the aligner's bias, float64), ``norm [N]`` =
    ``||aligned whole||``. Each part is its own contiguous tensor, so scoring one reads only its own.
    ``probes[feature] = (parts [N, C, K], logits [N, K], labels [N])``: the text-taught probe's readout of
    each component and of the whole, and its targets (only when a score needs it). ``values``: each
    feature's :class:`~vitdecomp.scores.flow.ValueSums` and every image's value (only when a score
    needs them; ``rows`` and ``batch_size`` read the rows again for their bootstrap)."""

    parts: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]
    norm: torch.Tensor
    labels: list[str]
    probes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    values: FeatureValues | None = None
    rows: Rows | None = None
    batch_size: int = 256

    def __len__(self) -> int:
        return self.norm.shape[0]

    def view(self, method: str, feature: str) -> Projected:
        """What ``method``'s function reads for ``feature`` (``u`` in float64)."""
        n, c = len(self), len(self.labels)
        empty = (torch.zeros(n, c, 0), torch.zeros(n, 0, dtype=torch.float64))  # a score that reads none
        u, whole = self.parts.get((get_score(method).kind, feature), empty)
        p = Projected(u.double(), whole, self.norm, self.probes.get(feature))
        if self.values is not None and feature in self.values.values:
            p.values = self.values.values[feature]
            p.value_batches = lambda: self._value_batches(feature)
        return p

    def _value_batches(self, feature: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rows again, ``(contributions [b, C, D], values [b])`` batch by batch."""
        assert self.rows is not None and self.values is not None
        labels, start = self.values.labels(feature), 0
        for b in self.rows.iter_batches(self.batch_size, ("contributions",)):
            c = b["contributions"]
            yield c, labels[start : start + len(c)]
            start += len(c)

    def score(self, method: str, feature: str) -> torch.Tensor:
        """Scores ``[C]`` of ``method`` for ``feature``."""
        return get_score(method).compute(self.view(method, feature))


@torch.no_grad()
def project_features(
    source: RowSource,
    aligner: Aligner,
    feature_emb: Mapping[str, torch.Tensor],
    methods: Sequence[str],
    *,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
    bar: tqdm | None = None,
) -> Projections:
    """One streaming pass over rows (or contributions ``[N, C, D]``): each aligned component and the
    aligned whole projected on the directions every method in ``methods`` needs for every feature
    (computed and held in ``dtype``; the whole in float64); for the scores that need them, each
    feature's per-value sums of the contributions under every image's reading (:func:`reading`).
    ``bar``: a progress bar this pass advances by its images (instead of a bar of its own)."""
    records = [get_score(m) for m in methods]
    needs_probe = any(r.needs_probe for r in records)  # the probe learns the "text" readings
    values = FeatureValues(feature_emb) if any(r.needs_values for r in records) else None
    kinds = sorted({r.kind for r in records if r.projections} | ({"text"} if needs_probe else set()))
    bases = {(k, f): directions(emb, k).to(aligner.device, dtype) for k in kinds for f, emb in feature_emb.items()}
    widths = [b.shape[1] for b in bases.values()]
    basis = torch.cat(list(bases.values()), 1) if bases else None  # [d_clip, R]: one product per batch
    bias = aligner.bias.double()
    rows = as_rows(source)
    parts: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in bases}
    norms, wholes = [], []
    with (
        nullcontext(bar)
        if bar is not None
        else tqdm(total=len(rows), desc="score features", unit="img", disable=not progress) as bar
    ):
        for b in rows.iter_batches(batch_size):
            a = aligner.apply(b["contributions"]).to(dtype)
            if basis is not None:
                for key, y in zip(bases, torch.split(a @ basis, widths, dim=2), strict=True):
                    parts[key].append(y.contiguous())  # [b, C, r]
            whole = a.double().sum(1) + bias  # the aligned whole, once per batch
            norms.append(whole.norm(dim=-1))
            if values is not None:
                values.add(b["contributions"], reading(b, whole))
            if needs_probe:
                wholes.append(b["contributions"].double().sum(1).cpu())
            bar.update(a.shape[0])
    if not norms:
        raise ValueError("no images to score")
    out = {}
    for key, chunks in parts.items():
        u = torch.cat(chunks)
        out[key] = (u, u.double().sum(1) + bias @ bases[key].double())
    proj = Projections(out, torch.cat(norms), list(aligner.labels), values=values, rows=rows, batch_size=batch_size)
    if needs_probe:
        proj.probes = _text_probe_readouts(rows, proj, torch.cat(wholes), list(feature_emb), batch_size, progress)
    return proj


def reading(batch: RowBatch, aligned_whole: torch.Tensor | None = None) -> torch.Tensor:
    """Each image of a batch in the reader's space, the embedding its zero-shot readings read: the
    reader's own image embedding where the rows hold it (``clip``; no aligner involved), else the
    aligned whole ``[b, d_clip]``."""
    clip = batch.get("clip")
    if clip is not None:
        return clip
    if aligned_whole is None:
        raise ValueError("rows without the reader's image embedding need the aligned whole for their reading")
    return aligned_whole


def _text_probe_readouts(
    rows: Any, proj: Projections, whole: torch.Tensor, features: list[str], batch_size: int, progress: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fit each feature's text-taught probe on the whole representation ``whole [N, D]`` (labels: the
    zero-shot readings held in ``proj``), then one more pass over the rows for every component's share
    of every probe's logits: ``{feature: (parts [N, C, K], logits [N, K], labels [N])}``."""
    probes = fit_text_probes(whole, {f: proj.parts[("text", f)][1] for f in features}, progress=progress)
    weight = torch.cat([p.weight[0] / p.sd[0, 0][:, None] for p, _ in probes.values()], 1)  # [D, sum K]
    widths = [p.weight.shape[-1] for p, _ in probes.values()]
    chunks: dict[str, list[torch.Tensor]] = {f: [] for f in probes}
    for b in rows.iter_batches(batch_size):
        shares = b["contributions"].float().cpu() @ weight  # [b, C, sum K]
        for f, part in zip(probes, torch.split(shares, widths, dim=2), strict=True):
            chunks[f].append(part.contiguous())
    return {f: (torch.cat(chunks[f]), probe_logits(p, whole), y) for f, (p, y) in probes.items()}


def score_features(
    source: RowSource,
    aligner: Aligner,
    feature_emb: Mapping[str, torch.Tensor],
    methods: str | Sequence[str] = ("paper", "invariant"),
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, ScoreTable]:
    """Score every component for every feature, streaming rows or contributions ``[N, C, D]``.

    ``aligner`` maps contributions into CLIP space (:class:`vitdecomp.align.Aligner`);
    ``feature_emb`` is ``{feature: [K, d_clip]}`` (see :func:`vitdecomp.scores.embed_features`). The
    scores whose record has a ``stream`` (every built-in one) keep sufficient statistics, memory flat
    in the number of images (:func:`vitdecomp.scores.streamed.stream_scores`, one or two passes for
    all of them together); the others hold the projections ``[N, C, r]`` on the feature subspaces
    (:func:`project_features`). Returns ``{method: ScoreTable}``.
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    names, rows = list(feature_emb), as_rows(source)
    streamed = [m for m in methods if get_score(m).stream is not None]
    found = stream_scores(rows, aligner, feature_emb, streamed, batch_size=batch_size, progress=progress)
    rest = [m for m in methods if m not in found]
    if rest:
        proj = project_features(rows, aligner, feature_emb, rest, batch_size=batch_size, progress=progress)
        found.update({m: torch.stack([proj.score(m, f) for f in names]) for m in rest})
    labels = list(aligner.labels)
    return {m: ScoreTable(found[m].float().cpu(), names, labels, m) for m in methods}
