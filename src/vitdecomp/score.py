"""Which components matter for a feature: the paper's scoring function and basis-free variants.

A feature ``p`` (e.g. "location") is a list of descriptions (its instantiations: "beach",
"forest", ...). Their CLIP text embeddings ``T_p [K, d_clip]`` span a feature subspace. Over an
image set, each aligned component ``f_i(c_i(x))`` and the aligned whole ``sum_k f_k(c_k(x))`` are
projected on that subspace and centred over images (METHOD.md §3):

``"paper"`` (:func:`score_paper`)
    ``B_p`` = the QR (Gram-Schmidt) basis of the descriptions *in the order given*;
    ``score_i = mean_j corr_x(u_ij, u_j)`` with ``u_i = B_p f_i``, ``u = B_p sum_k f_k``. The
    per-direction correlations depend on which orthonormal basis of the span is used, and QR's basis
    depends on the order (and any re-mixing) of the descriptions: reorder the list and the score
    changes although the feature subspace did not.

``"invariant"`` (:func:`score_invariant`)
    With the orthogonal projector ``P`` onto the span (basis-free),
    ``score_i = <P F_i, P F>_F / (||P F_i||_F ||P F||_F)`` over the centred ``[N, d]`` image
    matrices: the correlation of the component's feature-subspace variation with the whole's, pooled
    over the subspace instead of averaged per basis direction. Traces are invariant under a change of
    orthonormal basis, so reordering, re-mixing or rescaling the descriptions (anything that keeps
    their span) leaves it unchanged; like the paper's score it is scale-free per component.

``"share"`` (:func:`score_share`)
    ``score_i = <P F_i, P F>_F / ||P F||_F^2``: the fraction of the whole's feature-subspace variance
    attributed to component ``i`` (sums to 1 over the components; not scale-free: a component that
    varies little counts little). Basis-free as well.

``"ablation"`` (:func:`score_ablation`)
    What *removing* the component does to the feature's reading, label-free: the feature's
    descriptions read the aligned whole zero-shot (``scale * cos(z, t_k)``, :data:`ABLATION_SCALE`),
    the component's aligned contribution is replaced by its mean over the images, and the score is the
    mean KL divergence between the two distributions over the descriptions. Unlike the correlation
    scores it is magnitude-aware (a part that barely moves the whole along the feature's texts scores
    little) and reads only the directions of the descriptions.

``"text_probe"`` (:func:`score_text_probe`, the default)
    What removing the component does to the feature *as the subject represents it*, label-free: every
    image is labelled by the aligned whole's zero-shot reading (the description it is closest to); a
    linear probe on the subject's own whole representation learns those labels
    (:func:`fit_text_probes`); the component is mean-ablated and the score is the rise of the probe's
    cross-entropy, as a share of the sum over the components. The texts say *what* the feature is, the
    subject's own space says *where* it is read. It is built like the causal truth of
    ``vitdecomp validate`` with the zero-shot readings in place of the true labels; on held-out scenes it
    agrees best with the causal truths in the subject's space (mean and resample ablation) on every zoo
    model (docs/validation.md), so ``vitdecomp analyze`` ranks by it first.

Degenerate descriptions (near-duplicates) are dropped from the span by an SVD rank cut for the
basis-free scores; the paper's QR keeps them (as published).

Confidence (:func:`score_confidence`): a bootstrap percentile interval over images for every
component x feature score, and a null: the same score for ``n_null`` *null features*, the feature's
description embeddings turned by random rotations of CLIP space (same number of descriptions, same
pairwise cosines, same subspace size, random directions); ``p = (1 + #null >= score) / (1 + n_null)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vitdecomp.align import Aligner
from vitdecomp.evaluation.probes import Probe, fit_probes
from vitdecomp.store import RowSource, as_rows
from vitdecomp.world import ATTRIBUTES, CORE_ATTRIBUTES

METHODS = ("paper", "invariant", "share", "ablation", "text_probe")
#: The score ``vitdecomp analyze`` ranks by and shows first.
DEFAULT_METHOD = "text_probe"
#: The zero-shot logit scale of the ablation score: a soft reading (CLIP itself uses 100), chosen on the
#: development seed among 1, 3, 10, 30, 100 (docs/validation.md).
ABLATION_SCALE = 3.0
#: The L2 penalty of the text-taught probe of ``text_probe`` (as the truths' probes).
PROBE_L2 = 1e-3


# ------------------------------------------------------------------------------ features
def builtin_feature_sets() -> list[str]:
    """Names of the feature sets shipped in ``vitdecomp/data/features.json`` (+ ``"world"``)."""
    data = json.loads(resources.files("vitdecomp").joinpath("data", "features.json").read_text())
    return [*sorted(k for k in data if not k.startswith("_")), "world"]


def _world_features() -> dict[str, list[str]]:
    return {name: list(ATTRIBUTES[name]) for name in CORE_ATTRIBUTES}


def load_features(
    spec: str | Path | Mapping[str, Sequence[str]] | Sequence[Any] = "paper",
) -> dict[str, list[str]]:
    """Features as ``{name: [descriptions]}``.

    ``spec``: a dict (validated as is); a built-in set name (``"paper"``, ``"waterbirds"``,
    ``"world"`` = the built-in world's attributes); a JSON file holding ``{name: [descriptions]}``;
    or a list of these, merged in order (a later feature of the same name replaces an earlier one).
    """
    if isinstance(spec, Mapping):
        out: dict[str, list[str]] = {}
        for name, descr in spec.items():
            if isinstance(descr, str) or not isinstance(descr, Sequence):
                raise ValueError(f"feature {name!r}: descriptions must be a list of strings, not {descr!r}")
            descr = [str(d) for d in descr]
            if not descr or any(not d.strip() for d in descr):
                raise ValueError(f"feature {name!r} needs at least one non-empty description")
            out[str(name)] = list(dict.fromkeys(descr))
        return out
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.suffix == ".json" and path.exists():
            return load_features(json.loads(path.read_text()))
        if spec == "world":
            return load_features(_world_features())
        data = json.loads(resources.files("vitdecomp").joinpath("data", "features.json").read_text())
        if str(spec) not in data or str(spec).startswith("_"):
            raise ValueError(f"no feature set {spec!r}: give a dict, a .json file or one of {builtin_feature_sets()}")
        return load_features(data[str(spec)])
    merged: dict[str, list[str]] = {}
    for part in spec:
        merged.update(load_features(part))
    return merged


def embed_features(
    encode: Callable[[list[str]], torch.Tensor], features: Mapping[str, Sequence[str]]
) -> dict[str, torch.Tensor]:
    """Text embeddings per feature ``{name: [K, d_clip]}`` with ``encode`` (e.g. a TextEncoder)."""
    return {name: encode(list(descr)) for name, descr in features.items()}


# ------------------------------------------------------------------------------ bases
def feature_basis(text_emb: torch.Tensor, method: str = "invariant", rtol: float = 1e-5) -> torch.Tensor:
    """An orthonormal basis ``[d_clip, r]`` of the span of ``text_emb [K, d_clip]``.

    ``method="paper"``: QR in the given order (``r = K``, order-dependent, as published); otherwise
    the left singular vectors with singular value above ``rtol * max`` (span only; the basis-free
    scores do not depend on which basis this is).
    """
    t = text_emb.double()
    if method == "paper":
        return torch.linalg.qr(t.T).Q
    u, s, _ = torch.linalg.svd(t.T, full_matrices=False)
    return u[:, s > rtol * s.max().clamp_min(1e-30)]


# ------------------------------------------------------------------------------ scores
def _centre(u: torch.Tensor, total: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    u = u.double()
    total = u.sum(1) if total is None else total.double()
    return u - u.mean(0), total - total.mean(0)


def score_paper(u: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """The published score from projections ``u [N, C, K]`` on the QR basis -> ``[C]``.

    ``total [N, K]`` is the projected aligned whole (default ``u.sum(1)``). Mean over basis
    directions of the Pearson correlation over images (a component with no variation scores 0).
    """
    u, total = _centre(u, total)
    cov = (u * total[:, None]).mean(0)  # [C, K]
    denom = u.square().mean(0).sqrt() * total.square().mean(0).sqrt()[None]
    corr = torch.where(denom > 1e-300, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
    return corr.mean(-1)


def score_invariant(u: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Basis-free correlation ``<P F_i, P F> / (||P F_i|| ||P F||)`` from projections on ANY
    orthonormal basis of the feature span: ``u [N, C, r]``, ``total [N, r]`` -> ``[C]``."""
    u, total = _centre(u, total)
    inner = (u * total[:, None]).sum((0, 2))
    denom = u.square().sum((0, 2)).sqrt() * total.square().sum().sqrt()
    return torch.where(denom > 1e-300, inner / denom.clamp_min(1e-300), torch.zeros_like(inner))


def score_share(u: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Basis-free share of the whole's feature-subspace variance: ``<P F_i, P F> / ||P F||^2`` ``[C]``."""
    u, total = _centre(u, total)
    return (u * total[:, None]).sum((0, 2)) / total.square().sum().clamp_min(1e-300)


def score_text_probe(
    parts: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, per_image: bool = False
) -> torch.Tensor:
    """What removing each component does to a probe the feature's texts taught, label-free ``[C]``.

    ``logits [N, K]``: the text-taught probe (:func:`fit_text_probes`) read on the whole representation;
    ``parts [N, C, K]``: each component's share of those logits (its contribution through the probe's
    standardised weights, so ``logits = sum_i parts_i + const``); ``labels [N]``: each image's zero-shot
    reading, the probe's targets. The component is mean-ablated (``parts_i`` replaced by its mean over
    the images) and the score is the rise of the probe's mean cross-entropy against the labels, as a share
    of the sum of every component's rise (so a feature's scores sum to 1 over the components, and the
    null compares shares rather than how confidently a probe reads a feature; ``per_image``: the
    ``[N, C]`` rises divided by that sum).
    """
    logits, parts = logits.double(), parts.double()
    shifted = logits[:, None] + parts.mean(0, keepdim=True) - parts  # [N, C, K]
    y = labels.long()

    def ce(z: torch.Tensor) -> torch.Tensor:  # [..., K] -> [...]
        idx = y.reshape(-1, *([1] * (z.dim() - 2)), 1).expand(*z.shape[:-1], 1)
        return -torch.log_softmax(z, -1).gather(-1, idx)[..., 0]

    rise = ce(shifted) - ce(logits)[:, None]  # [N, C]
    rise = rise / rise.mean(0).abs().sum().clamp_min(1e-30)
    return rise if per_image else rise.mean(0)


def probe_readout(contributions: torch.Tensor, probe: Probe) -> torch.Tensor:
    """Each component's share of a probe's logits: ``contributions [N, C, D]`` -> ``[N, C, K]``
    (``(c_i / sd) @ W``; the logits of the sum are the sum of the shares + a constant)."""
    return (contributions.float() / probe.sd[0]) @ probe.weight[0]


def _probe_logits(probe: Probe, whole: torch.Tensor) -> torch.Tensor:
    """``whole [N, D]`` -> ``[N, K]``."""
    return probe.logits(whole[None].float())[0]


def fit_text_probes(
    whole: torch.Tensor, readings: Mapping[str, torch.Tensor], l2: float = PROBE_L2
) -> dict[str, tuple[Probe, torch.Tensor]]:
    """For each feature, the probe its texts teach: every image labelled by its zero-shot reading
    (``readings[f] [N, K]``, the aligned whole projected on the feature's unit description embeddings;
    label = the argmax), a multinomial logistic regression on the whole representation in the subject's
    own space (``whole [N, D]``, standardised, L-BFGS: :func:`vitdecomp.evaluation.probes.fit_probes`)
    fitted to those labels; features with the same number of descriptions are fitted together (the
    joint loss is the sum of theirs). Returns ``{feature: (probe, labels [N])}``."""
    x = whole.float().cpu()
    labels = {f: r.argmax(1).cpu() for f, r in readings.items()}
    out = {}
    for k in sorted({r.shape[1] for r in readings.values()}):
        group = [f for f, r in readings.items() if r.shape[1] == k]
        y = torch.stack([labels[f] for f in group])  # [G, N]
        with torch.enable_grad():
            p = fit_probes(x[None].expand(len(group), -1, -1), y, k, l2)
        for g, f in enumerate(group):
            out[f] = (Probe(p.mu[g : g + 1], p.sd[g : g + 1], p.weight[g : g + 1], p.bias[g : g + 1]), labels[f])
    return {f: out[f] for f in readings}


def score_ablation(
    u: torch.Tensor, whole: torch.Tensor, norm: torch.Tensor, scale: float | None = None, per_image: bool = False
) -> torch.Tensor:
    """What removing each component does to the feature's zero-shot reading, label-free ``[C]``.

    ``u [N, C, K]``: each aligned component projected on the feature's *unit* description
    embeddings; ``whole [N, K]``: the aligned whole (parts + bias) projected likewise; ``norm [N]``:
    ``||aligned whole||``. Zero-shot logits ``scale * <t_k, z> / ||z||``; the component is
    mean-ablated (its aligned contribution replaced by its mean over the images, the norm held) and
    the score is the mean over images of ``KL(p(z) || p(z - a_i + mean a_i))`` in nats
    (``per_image``: the ``[N, C]`` KLs before the mean).
    """
    scale = ABLATION_SCALE if scale is None else scale
    inv = 1.0 / norm.double().clamp_min(1e-30)
    logits = scale * whole.double() * inv[:, None]  # [N, K]
    shift = scale * (u.double().mean(0, keepdim=True) - u.double()) * inv[:, None, None]  # [N, C, K]
    logp = torch.log_softmax(logits, -1)[:, None]
    logq = torch.log_softmax(logits[:, None] + shift, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [N, C]
    return kl if per_image else kl.mean(0)


_SCORERS = {
    "paper": score_paper,
    "invariant": score_invariant,
    "share": score_share,
    "ablation": score_ablation,
    "text_probe": score_text_probe,
}
#: The scores that are a mean over images of a per-image effect (bootstrapped by resampling those).
_PER_IMAGE = ("ablation", "text_probe")


def score(aligned: torch.Tensor, text_emb: torch.Tensor, method: str = "invariant") -> torch.Tensor:
    """Scores ``[C]`` of the components of an aligned stack ``[N, C, d_clip]`` for one feature
    given by its description embeddings ``text_emb [K, d_clip]`` (the whole is the stack's sum)."""
    if method not in _SCORERS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    u = aligned.double() @ _basis(text_emb, _KIND[method]).to(aligned.device)
    if method == "ablation":
        return score_ablation(u, u.sum(1), aligned.double().sum(1).norm(dim=-1))
    if method == "text_probe":  # the stack is its own space: the probe reads its sum
        ((probe, y),) = fit_text_probes(aligned.sum(1), {"": u.sum(1)}).values()
        return score_text_probe(probe_readout(aligned.cpu(), probe), _probe_logits(probe, aligned.sum(1).cpu()), y)
    return _SCORERS[method](u)


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
        """``{feature: {component label: score}}`` (JSON-ready)."""
        return {
            f: {lab: float(v) for lab, v in zip(self.labels, row.tolist(), strict=True)}
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


_KIND = {"paper": "paper", "invariant": "span", "share": "span", "ablation": "text", "text_probe": "text"}


def _basis(text_emb: torch.Tensor, kind: str) -> torch.Tensor:
    """The directions a kind of score projects on: QR basis (``paper``), an orthonormal basis of the
    span (``span``), or the unit description embeddings themselves (``text``) ``[d_clip, r]``."""
    if kind == "text":
        return torch.nn.functional.normalize(text_emb.double(), dim=-1).T
    return feature_basis(text_emb, "paper" if kind == "paper" else "invariant")


@dataclass
class Projections:
    """Every image's aligned components and aligned whole projected on the directions of each
    ``(kind, feature)`` (:func:`project_features`): ``parts[(kind, feature)] = (u [N, C, r], whole
    [N, r])`` (``whole`` = the sum of the parts + the aligner's bias, float64), ``norm [N]`` =
    ``||aligned whole||``. Each part is its own contiguous tensor, so scoring one reads only its own.
    ``probes[feature] = (parts [N, C, K], logits [N, K], labels [N])``: the text-taught probe's readout of
    each component and of the whole, and its targets (:func:`score_text_probe`; only when asked for)."""

    parts: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]
    norm: torch.Tensor
    labels: list[str]
    probes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.norm.shape[0]

    def of(self, method: str, feature: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u [N, C, r], whole [N, r])`` for ``method``'s directions of ``feature``, in float64."""
        u, whole = self.parts[(_KIND[method], feature)]
        return u.double(), whole

    def score(self, method: str, feature: str) -> torch.Tensor:
        """Scores ``[C]`` of ``method`` for ``feature``."""
        return self.per_image(method, feature).mean(0) if method in _PER_IMAGE else self._score(method, feature)

    def per_image(self, method: str, feature: str) -> torch.Tensor:
        """``[N, C]`` per-image scores of a method that is a mean over images (:data:`_PER_IMAGE`)."""
        if method == "text_probe":
            return score_text_probe(*self.probes[feature], per_image=True)
        u, whole = self.of(method, feature)
        return score_ablation(u, whole, self.norm, per_image=True)

    def _score(self, method: str, feature: str) -> torch.Tensor:
        u, whole = self.of(method, feature)
        return _SCORERS[method](u, whole)


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
) -> Projections:
    """One streaming pass over rows (or contributions ``[N, C, D]``): each aligned component and the
    aligned whole projected on the directions every method in ``methods`` needs for every feature
    (computed and held in ``dtype``; the whole in float64)."""
    for m in methods:
        if m not in _SCORERS:
            raise ValueError(f"method must be one of {METHODS}, not {m!r}")
    kinds = sorted({_KIND[m] for m in methods})
    bases = {(k, f): _basis(emb, k).to(aligner.device, dtype) for k in kinds for f, emb in feature_emb.items()}
    widths = [b.shape[1] for b in bases.values()]
    basis = torch.cat(list(bases.values()), 1)  # [d_clip, R]: one product per batch, then split
    bias = aligner.bias.double()
    rows = as_rows(source)
    parts: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in bases}
    norms, wholes = [], []
    with tqdm(total=len(rows), desc="score features", unit="img", disable=not progress) as bar:
        for b in rows.iter_batches(batch_size):
            a = aligner.apply(b["contributions"]).to(dtype)
            for key, y in zip(bases, torch.split(a @ basis, widths, dim=2), strict=True):
                parts[key].append(y.contiguous())  # [b, C, r]
            norms.append((a.double().sum(1) + bias).norm(dim=-1))
            if "text_probe" in methods:
                wholes.append(b["contributions"].double().sum(1).cpu())
            bar.update(a.shape[0])
    if not norms:
        raise ValueError("no images to score")
    out = {}
    for key, chunks in parts.items():
        u = torch.cat(chunks)
        out[key] = (u, u.double().sum(1) + bias @ bases[key].double())
    proj = Projections(out, torch.cat(norms), list(aligner.labels))
    if "text_probe" in methods:
        proj.probes = _text_probe_readouts(rows, proj, torch.cat(wholes), list(feature_emb), batch_size)
    return proj


def _text_probe_readouts(
    rows: Any, proj: Projections, whole: torch.Tensor, features: list[str], batch_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fit each feature's text-taught probe on the whole representation ``whole [N, D]`` (labels: the
    zero-shot readings held in ``proj``), then one more pass over the rows for every component's share
    of every probe's logits: ``{feature: (parts [N, C, K], logits [N, K], labels [N])}``."""
    probes = fit_text_probes(whole, {f: proj.parts[("text", f)][1] for f in features})
    weight = torch.cat([p.weight[0] / p.sd[0, 0][:, None] for p, _ in probes.values()], 1)  # [D, sum K]
    widths = [p.weight.shape[-1] for p, _ in probes.values()]
    chunks: dict[str, list[torch.Tensor]] = {f: [] for f in probes}
    for b in rows.iter_batches(batch_size):
        shares = b["contributions"].float().cpu() @ weight  # [b, C, sum K]
        for f, part in zip(probes, torch.split(shares, widths, dim=2), strict=True):
            chunks[f].append(part.contiguous())
    return {f: (torch.cat(chunks[f]), _probe_logits(p, whole), y) for f, (p, y) in probes.items()}


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
    ``feature_emb`` is ``{feature: [K, d_clip]}`` (see :func:`embed_features`). Only the projections
    ``[N, C, r]`` on the feature subspaces are kept in memory. Returns ``{method: ScoreTable}``.
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    proj = project_features(source, aligner, feature_emb, methods, batch_size=batch_size, progress=progress)
    names = list(feature_emb)
    return {
        m: ScoreTable(torch.stack([proj.score(m, f) for f in names]).float().cpu(), names, proj.labels, m)
        for m in methods
    }


# ------------------------------------------------------------------------------ confidence
def random_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix ``[d, d]`` (QR of a Gaussian with the signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None]


def null_features(feature_emb: Mapping[str, torch.Tensor], n_null: int, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """``n_null`` null versions of every feature: its description embeddings turned by a random
    rotation of CLIP space (``T Q^T``), so each null feature has the same number of descriptions,
    the same pairwise cosines and the same subspace size, pointing in random directions."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {f: [] for f in feature_emb}
    d = next(iter(feature_emb.values())).shape[1]
    for _ in range(n_null):
        q = random_rotation(d, g)
        for f, t in feature_emb.items():
            out[f].append((t.double() @ q.T).to(t.dtype))
    return out


@dataclass
class ScoreConfidence:
    """How sure each score of ``method`` is, per feature (rows) and component (columns):

    ``low``/``high [F, C]``: the bootstrap percentile interval at ``level`` (images resampled with
    replacement ``n_boot`` times); ``null_mean``/``null_high [F, C]``: the mean and the largest score
    over ``n_null`` null features (random rotations of the feature's descriptions, see
    :func:`null_features`); ``p_value [F, C]`` = ``(1 + #{null >= score}) / (1 + n_null)``: with
    ``n_null = 19`` a score above every null draw has ``p = 0.05``."""

    method: str
    features: list[str]
    labels: list[str]
    score: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    null_mean: torch.Tensor
    null_high: torch.Tensor
    p_value: torch.Tensor
    n_boot: int
    n_null: int
    level: float

    def significant(self, alpha: float = 0.05) -> torch.Tensor:
        """``[F, C]`` booleans: the score is above its null at ``alpha``."""
        return self.p_value <= alpha + 1e-9

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the settings, then ``{feature: {label: {score, low, high, null_mean, null_high,
        p}}}`` under ``"scores"``."""
        cells = {}
        for i, f in enumerate(self.features):
            cells[f] = {
                lab: {
                    "score": float(self.score[i, j]),
                    "low": float(self.low[i, j]),
                    "high": float(self.high[i, j]),
                    "null_mean": float(self.null_mean[i, j]),
                    "null_high": float(self.null_high[i, j]),
                    "p": round(float(self.p_value[i, j]), 6),
                }
                for j, lab in enumerate(self.labels)
            }
        head = {"method": self.method, "n_boot": self.n_boot, "n_null": self.n_null, "level": self.level}
        return {**head, "null": "random rotations of the feature's description embeddings", "scores": cells}


def _weighted_scores(method: str, u: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The correlation-type scores under image weights ``w [B, N]`` (bootstrap counts) at once:
    ``u [N, C, r]``, ``t [N, r]`` -> ``[B, C]`` (weighted centring and moments)."""
    n, c, r = u.shape
    total = w.sum(1)[:, None]  # [B, 1]
    su = (w @ u.reshape(n, -1)).reshape(-1, c, r)
    st = w @ t  # [B, r]
    sut = (w @ (u * t[:, None]).reshape(n, -1)).reshape(-1, c, r)
    suu = (w @ u.square().reshape(n, -1)).reshape(-1, c, r)
    stt = w @ t.square()
    cov = sut - su * st[:, None] / total[..., None]  # [B, C, r]
    var_u = suu - su.square() / total[..., None]
    var_t = (stt - st.square() / total)[:, None]  # [B, 1, r]
    if method == "paper":
        denom = (var_u * var_t).clamp_min(0).sqrt()
        return torch.where(denom > 1e-300, cov / denom.clamp_min(1e-300), torch.zeros_like(cov)).mean(-1)
    if method == "share":
        return cov.sum(-1) / var_t.sum(-1).clamp_min(1e-300)
    denom = (var_u.sum(-1) * var_t.sum(-1)).clamp_min(0).sqrt()
    inner = cov.sum(-1)
    return torch.where(denom > 1e-300, inner / denom.clamp_min(1e-300), torch.zeros_like(inner))


def _bootstrap(proj: Projections, method: str, features: list[str], n_boot: int, level: float, seed: int):
    """Percentile interval ``(low, high) [F, C]`` over ``n_boot`` resamples of the images, each a
    multinomial count per image. For the per-image scores (``ablation``, ``text_probe``) the mean an
    ablated part is replaced by (and ``text_probe``'s probe and normaliser) is held at its value over all
    images; the per-image effects are resampled."""
    g = torch.Generator().manual_seed(seed)
    n = len(proj)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    w = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))
    draws = []
    for f in features:
        if method in _PER_IMAGE:
            draws.append(w @ proj.per_image(method, f) / n)
        else:
            draws.append(_weighted_scores(method, *proj.of(method, f), w))
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo_hi = torch.quantile(torch.stack(draws, 1), q, dim=0)  # over [B, F, C]
    return lo_hi[0], lo_hi[1]


#: Most bytes the null projections of one pass may take; more null draws take more passes.
NULL_PASS_BYTES = 256 << 20


def _null_scores(
    source: RowSource,
    aligner: Aligner,
    feature_emb: Mapping[str, torch.Tensor],
    methods: list[str],
    n_null: int,
    seed: int,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Each method's scores for the ``n_null`` null features: ``{method: [n_null, F, C]}``, the
    draws projected in groups of at most :data:`NULL_PASS_BYTES` per pass over the rows."""
    names = list(feature_emb)
    nulls = null_features(feature_emb, n_null, seed)
    kinds = {_KIND[m] for m in methods}
    width = sum(t.shape[0] for t in feature_emb.values()) * len(kinds)  # columns per draw (at most)
    n, c = len(as_rows(source)), aligner.n_components
    per_pass = max(1, NULL_PASS_BYTES // max(1, n * c * width * 4))
    out: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for start in range(0, n_null, per_pass):
        draws = range(start, min(start + per_pass, n_null))
        group = {f"{f}\x00{j}": nulls[f][j] for j in draws for f in names}
        proj = project_features(
            source, aligner, group, methods, batch_size=batch_size, dtype=torch.float32, progress=False
        )
        for m in methods:
            out[m] += [torch.stack([proj.score(m, f"{f}\x00{j}") for f in names]) for j in draws]
    return {m: torch.stack(v) for m, v in out.items() if v}


def score_confidence(
    source: RowSource,
    aligner: Aligner,
    feature_emb: Mapping[str, torch.Tensor],
    methods: str | Sequence[str] = ("invariant",),
    *,
    n_boot: int = 100,
    n_null: int = 19,
    level: float = 0.95,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, ScoreConfidence]:
    """Bootstrap intervals over images and a null for every component x feature score of each
    method (:class:`ScoreConfidence`): one pass over the rows for the features themselves (their
    projections held as float32, resampled in memory), then passes for the null features (bounded
    memory, see :func:`_null_scores`)."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    names = list(feature_emb)
    proj = project_features(
        source, aligner, feature_emb, methods, batch_size=batch_size, dtype=torch.float32, progress=progress
    )
    nulls = _null_scores(source, aligner, feature_emb, methods, n_null, seed, batch_size) if n_null else {}
    out = {}
    for m in methods:
        obs = torch.stack([proj.score(m, f) for f in names])  # [F, C]
        null = nulls.get(m, torch.full_like(obs, float("nan"))[None])  # [n_null, F, C]
        low, high = _bootstrap(proj, m, names, n_boot, level, seed)
        p = (1 + (null >= obs[None]).sum(0)) / (1 + n_null)
        stats = (obs, low, high, null.mean(0), null.amax(0))
        out[m] = ScoreConfidence(m, names, proj.labels, *(x.float() for x in stats), p.double(), n_boot, n_null, level)
    return out


# ------------------------------------------------------------------------------ checks
def spearman(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float]) -> float:
    """Spearman rank correlation of two score vectors (average ranks for ties)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64).flatten()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # average ranks within ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(torch.as_tensor(a)), ranks(torch.as_tensor(b))
    if ra.shape != rb.shape:
        raise ValueError(f"score vectors differ in length: {ra.shape} vs {rb.shape}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


@torch.no_grad()
def clip_retrieval_scores(
    source: RowSource,
    aligner: Aligner,
    text_emb: torch.Tensor,
    top_k: int = 20,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """A CLIP-derived importance of each component for one feature ``[C]`` (the paper's check).

    For every description ``s`` of the feature, each component retrieves the ``top_k`` images with
    the largest ``<f_i(c_i(x)), t_s>``; its score is CLIP's own mean cosine ``cos(z_CLIP(x), t_s)``
    over those images, averaged over descriptions. ``source`` must hold the reader's image
    embeddings (rows of a store, or a tuple ``(contributions [N, C, D], clip [N, d_clip])``). This is
    our reading of the paper's "CLIP score" used for its Spearman check against the scoring function.
    """
    t = torch.nn.functional.normalize(text_emb.float(), dim=-1).to(aligner.device)  # [K, d]
    comp_sims, clip_sims = [], []
    for b in as_rows(source).iter_batches(batch_size):
        c, z = b["contributions"], b["clip"]
        comp_sims.append(aligner.apply(c) @ t.T)  # [b, C, K]
        clip_sims.append(torch.nn.functional.normalize(z.float().to(t.device), dim=-1) @ t.T)  # [b, K]
    comp, clip = torch.cat(comp_sims), torch.cat(clip_sims)
    k = min(top_k, comp.shape[0])
    idx = comp.topk(k, dim=0).indices  # [k, C, K]
    picked = clip[idx, torch.arange(clip.shape[1], device=clip.device)]  # [k, C, K]
    return picked.mean((0, 2)).cpu()
