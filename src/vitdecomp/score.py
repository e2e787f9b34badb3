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

Degenerate descriptions (near-duplicates) are dropped from the span by an SVD rank cut for the
basis-free scores; the paper's QR keeps them (as published).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vitdecomp.align import Aligner
from vitdecomp.store import RowSource, as_rows
from vitdecomp.world import ATTRIBUTES, CORE_ATTRIBUTES

METHODS = ("paper", "invariant", "share")


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


_SCORERS = {"paper": score_paper, "invariant": score_invariant, "share": score_share}


def score(aligned: torch.Tensor, text_emb: torch.Tensor, method: str = "invariant") -> torch.Tensor:
    """Scores ``[C]`` of the components of an aligned stack ``[N, C, d_clip]`` for one feature
    given by its description embeddings ``text_emb [K, d_clip]`` (the whole is the stack's sum)."""
    if method not in _SCORERS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    basis = feature_basis(text_emb, method).to(aligned.device)
    return _SCORERS[method](aligned.double() @ basis)


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


@torch.no_grad()
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
    for m in methods:
        if m not in _SCORERS:
            raise ValueError(f"method must be one of {METHODS}, not {m!r}")
    names = list(feature_emb)
    kinds = sorted({"paper" if m == "paper" else "span" for m in methods})
    bases, slices, start = [], {}, 0
    for kind in kinds:
        for f in names:
            b = feature_basis(feature_emb[f], "paper" if kind == "paper" else "invariant")
            bases.append(b)
            slices[(kind, f)] = slice(start, start + b.shape[1])
            start += b.shape[1]
    basis = torch.cat(bases, 1).to(aligner.device)  # [d_clip, R]
    rows = as_rows(source)
    parts = []
    with tqdm(total=len(rows), desc="score features", unit="img", disable=not progress) as bar:
        for b in rows.iter_batches(batch_size):
            c = b["contributions"]
            parts.append(aligner.apply(c).double() @ basis)  # [b, C, R]
            bar.update(c.shape[0])
    if not parts:
        raise ValueError("no images to score")
    u = torch.cat(parts)
    total = u.sum(1)
    out = {}
    for m in methods:
        kind = "paper" if m == "paper" else "span"
        per_feature = [_SCORERS[m](u[..., slices[(kind, f)]], total[:, slices[(kind, f)]]) for f in names]
        out[m] = ScoreTable(torch.stack(per_feature).float().cpu(), names, list(aligner.labels), m)
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
