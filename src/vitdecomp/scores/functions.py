"""The math of the built-in scores (their records are in :mod:`vitdecomp.scores.registry`): which
components matter for a feature, the paper's scoring function and basis-free variants.

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

``"flow"`` (:func:`vitdecomp.scores.flow.flow_share`, the default)
    Where the feature flows, signed: every image labelled by the reader's zero-shot reading, each
    part's mean contribution per value in the subject's own space, and its share of the whole's
    between-value variation (see :mod:`vitdecomp.scores.flow`).

Degenerate descriptions (near-duplicates) are dropped from the span by an SVD rank cut for the
basis-free scores; the paper's QR keeps them (as published).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vitdecomp.probes import Probe, fit_probes
from vitdecomp.progress import postfix_writer
from vitdecomp.scores.flow import ValueSums, flow_share
from vitdecomp.scores.flow import flow_resampled as _flow_resampled

#: The zero-shot logit scale of the ablation score: a soft reading (CLIP itself uses 100), chosen on the
#: development seed among 1, 3, 10, 30, 100 (docs/validation.md).
ABLATION_SCALE = 3.0


#: The L2 penalty of the text-taught probe of ``text_probe`` (as the truths' probes).
PROBE_L2 = 1e-3


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


def directions(text_emb: torch.Tensor, kind: str) -> torch.Tensor:
    """The directions a kind of score projects on (:data:`vitdecomp.scores.registry.KINDS`): the QR
    basis (``qr``), an orthonormal basis of the span (``span``), or the unit description embeddings
    themselves (``text``) ``[d_clip, r]``."""
    if kind == "text":
        return torch.nn.functional.normalize(text_emb.double(), dim=-1).T
    return feature_basis(text_emb, "paper" if kind == "qr" else "invariant")


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
    ``[N, C]`` rises divided by that sum; :func:`text_probe_rises`: the rises themselves).
    """
    rise = text_probe_rises(parts, logits, labels)  # [N, C]
    rise = rise / rise.mean(0).abs().sum().clamp_min(1e-30)
    return rise if per_image else rise.mean(0)


def text_probe_rises(
    parts: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor | None = None
) -> torch.Tensor:
    """``[N, C]``: each image's rise of the probe's cross-entropy when each part is mean-ablated
    (:func:`score_text_probe` before its normalisation); ``mean [C, K]``: the parts' mean over the
    images (default: over these ``N``; a batch of a longer stream is given the stream's)."""
    logits, parts = logits.double(), parts.double()
    mean = parts.mean(0) if mean is None else mean.double()
    shifted = logits[:, None] + mean[None] - parts  # [N, C, K]
    y = labels.long()

    def ce(z: torch.Tensor) -> torch.Tensor:  # [..., K] -> [...]
        idx = y.reshape(-1, *([1] * (z.dim() - 2)), 1).expand(*z.shape[:-1], 1)
        return -torch.log_softmax(z, -1).gather(-1, idx)[..., 0]

    return ce(shifted) - ce(logits)[:, None]


def probe_readout(contributions: torch.Tensor, probe: Probe) -> torch.Tensor:
    """Each component's share of a probe's logits: ``contributions [N, C, D]`` -> ``[N, C, K]``
    (``(c_i / sd) @ W``; the logits of the sum are the sum of the shares + a constant)."""
    return (contributions.float() / probe.sd[0]) @ probe.weight[0]


def probe_logits(probe: Probe, whole: torch.Tensor) -> torch.Tensor:
    """``whole [N, D]`` -> ``[N, K]``."""
    return probe.logits(whole[None].float())[0]


def fit_text_probes(
    whole: torch.Tensor, readings: Mapping[str, torch.Tensor], l2: float = PROBE_L2, progress: bool = False
) -> dict[str, tuple[Probe, torch.Tensor]]:
    """For each feature, the probe its texts teach: every image labelled by its zero-shot reading
    (``readings[f] [N, K]``, the aligned whole projected on the feature's unit description embeddings;
    label = the argmax), a multinomial logistic regression on the whole representation in the subject's
    own space (``whole [N, D]``, standardised, L-BFGS: :func:`vitdecomp.probes.fit_probes`)
    fitted to those labels; features with the same number of descriptions are fitted together (the
    joint loss is the sum of theirs). Returns ``{feature: (probe, labels [N])}``; ``progress``: a bar
    that advances by each group's features."""
    x = whole.float().cpu()
    labels = {f: r.argmax(1).cpu() for f, r in readings.items()}
    out = {}
    with tqdm(total=len(readings), desc="text probes", unit="feature", leave=False, disable=not progress) as bar:
        for k in sorted({r.shape[1] for r in readings.values()}):
            group = [f for f, r in readings.items() if r.shape[1] == k]
            y = torch.stack([labels[f] for f in group])  # [G, N]
            with torch.enable_grad():
                p = fit_probes(x[None].expand(len(group), -1, -1), y, k, l2, on_evaluation=_evaluation_writer(bar))
            for g, f in enumerate(group):
                out[f] = (Probe(p.mu[g : g + 1], p.sd[g : g + 1], p.weight[g : g + 1], p.bias[g : g + 1]), labels[f])
            bar.update(len(group))
    return {f: out[f] for f in readings}


def _evaluation_writer(bar: tqdm) -> Callable[[int], None]:
    """A fit's ``on_evaluation`` hook: the bar names the L-BFGS evaluation under way (a long fit is not silent)."""
    say = postfix_writer(bar)
    return lambda i: say(f"L-BFGS evaluation {i}")


def score_ablation(
    u: torch.Tensor,
    whole: torch.Tensor,
    norm: torch.Tensor,
    scale: float | None = None,
    per_image: bool = False,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """What removing each component does to the feature's zero-shot reading, label-free ``[C]``.

    ``u [N, C, K]``: each aligned component projected on the feature's *unit* description
    embeddings; ``whole [N, K]``: the aligned whole (parts + bias) projected likewise; ``norm [N]``:
    ``||aligned whole||``. Zero-shot logits ``scale * <t_k, z> / ||z||``; the component is
    mean-ablated (its aligned contribution replaced by its mean over the images, the norm held) and
    the score is the mean over images of ``KL(p(z) || p(z - a_i + mean a_i))`` in nats
    (``per_image``: the ``[N, C]`` KLs before the mean; ``mean [C, K]``: the mean of ``u`` over the
    images, default over these ``N``: a batch of a longer stream is given the stream's).
    """
    scale = ABLATION_SCALE if scale is None else scale
    inv = 1.0 / norm.double().clamp_min(1e-30)
    logits = scale * whole.double() * inv[:, None]  # [N, K]
    mean = u.double().mean(0) if mean is None else mean.double()
    shift = scale * (mean[None] - u.double()) * inv[:, None, None]  # [N, C, K]
    logp = torch.log_softmax(logits, -1)[:, None]
    logq = torch.log_softmax(logits[:, None] + shift, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [N, C]
    return kl if per_image else kl.mean(0)


def _weighted_moments(u: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Weighted centred moments under image weights ``w [B, N]`` (bootstrap counts), for all resamples
    at once: ``u [N, C, r]``, ``t [N, r]`` -> ``(cov [B, C, r], var_u [B, C, r], var_t [B, 1, r])``."""
    n, c, r = u.shape
    w = w.to(u.dtype)
    total = w.sum(1)[:, None]  # [B, 1]
    su = (w @ u.reshape(n, -1)).reshape(-1, c, r)
    st = w @ t  # [B, r]
    sut = (w @ (u * t[:, None]).reshape(n, -1)).reshape(-1, c, r)
    suu = (w @ u.square().reshape(n, -1)).reshape(-1, c, r)
    stt = w @ t.square()
    cov = sut - su * st[:, None] / total[..., None]  # [B, C, r]
    var_u = suu - su.square() / total[..., None]
    var_t = (stt - st.square() / total)[:, None]  # [B, 1, r]
    return cov, var_u, var_t


# ------------------------------------------------------------------------------ the records' functions
@dataclass
class Projected:
    """What a score reads for one feature (:class:`vitdecomp.scores.Score`): every image's aligned
    components ``u [N, C, r]`` and aligned whole ``whole [N, r]`` projected on the directions of the
    score's kind (float64), ``norm [N]`` = ``||aligned whole||``, and for scores that need them the
    text-taught probe's readout ``probe = (parts [N, C, K], logits [N, K], labels [N])``, the feature's
    per-value sums ``values`` and ``value_batches()``: the rows again, ``(contributions [b, C, D],
    labels [b])`` batch by batch in row order."""

    u: torch.Tensor
    whole: torch.Tensor
    norm: torch.Tensor
    probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    values: ValueSums | None = None
    value_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None


def paper(p: Projected) -> torch.Tensor:
    return score_paper(p.u, p.whole)


def invariant(p: Projected) -> torch.Tensor:
    return score_invariant(p.u, p.whole)


def share(p: Projected) -> torch.Tensor:
    return score_share(p.u, p.whole)


def ablation(p: Projected) -> torch.Tensor:
    """``[N, C]`` per-image KLs (:func:`score_ablation`)."""
    return score_ablation(p.u, p.whole, p.norm, per_image=True)


def text_probe(p: Projected) -> torch.Tensor:
    """``[N, C]`` per-image loss rises (:func:`score_text_probe`)."""
    if p.probe is None:
        raise ValueError("text_probe needs the feature's text-taught probe readout (Projected.probe)")
    return score_text_probe(*p.probe, per_image=True)


def _values(p: Projected) -> ValueSums:
    if p.values is None:
        raise ValueError("flow needs the feature's per-value sums (Projected.values)")
    return p.values


def flow(p: Projected) -> torch.Tensor:
    """``[C]`` (:func:`vitdecomp.scores.flow.flow_share`)."""
    return flow_share(_values(p))


def flow_resampled(p: Projected, w: torch.Tensor) -> torch.Tensor:
    """The flow score under image weights ``w [B, N]``, linearised (a second pass over the rows:
    :func:`vitdecomp.scores.flow.flow_resampled`) -> ``[B, C]``."""
    if p.value_batches is None:
        raise ValueError("flow's bootstrap reads the rows again (Projected.value_batches)")
    return _flow_resampled(_values(p), p.value_batches(), w)


def paper_from_moments(cov: torch.Tensor, var_u: torch.Tensor, var_t: torch.Tensor) -> torch.Tensor:
    """:func:`score_paper` from centred sums (``cov``/``var_u [B, C, r]``, ``var_t [B, 1, r]``:
    :func:`_weighted_moments`, or one pass's :class:`vitdecomp.scores.streamed.Moments`) -> ``[B, C]``."""
    denom = (var_u * var_t).clamp_min(0).sqrt()
    return torch.where(denom > 1e-300, cov / denom.clamp_min(1e-300), torch.zeros_like(cov)).mean(-1)


def share_from_moments(cov: torch.Tensor, var_u: torch.Tensor, var_t: torch.Tensor) -> torch.Tensor:
    """:func:`score_share` from centred sums (as :func:`paper_from_moments`) -> ``[B, C]``."""
    return cov.sum(-1) / var_t.sum(-1).clamp_min(1e-300)


def invariant_from_moments(cov: torch.Tensor, var_u: torch.Tensor, var_t: torch.Tensor) -> torch.Tensor:
    """:func:`score_invariant` from centred sums (as :func:`paper_from_moments`) -> ``[B, C]``."""
    denom = (var_u.sum(-1) * var_t.sum(-1)).clamp_min(0).sqrt()
    inner = cov.sum(-1)
    return torch.where(denom > 1e-300, inner / denom.clamp_min(1e-300), torch.zeros_like(inner))


def paper_resampled(p: Projected, w: torch.Tensor) -> torch.Tensor:
    """:func:`score_paper` under image weights ``w [B, N]`` -> ``[B, C]``."""
    return paper_from_moments(*_weighted_moments(p.u, p.whole, w))


def share_resampled(p: Projected, w: torch.Tensor) -> torch.Tensor:
    """:func:`score_share` under image weights ``w [B, N]`` -> ``[B, C]``."""
    return share_from_moments(*_weighted_moments(p.u, p.whole, w))


def invariant_resampled(p: Projected, w: torch.Tensor) -> torch.Tensor:
    """:func:`score_invariant` under image weights ``w [B, N]`` -> ``[B, C]``."""
    return invariant_from_moments(*_weighted_moments(p.u, p.whole, w))
