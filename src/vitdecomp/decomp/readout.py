"""Readout linear algebra: norms with frozen statistics, and the factored map from a stream to the representation.

With every norm's statistics and every attention probability frozen at their values from the pass,
the map from a stream ``[B, N, D_s]`` to the representation ``[B, D_out]`` is linear. A
:class:`ReadoutMap` stores it factored: per-token weights (norm scales, pooling), either one slot per
token (``slot [S]``: which downstream patch-merging input a token lands in) or dense per-slot weights
``[B, S, K]`` (an attention pool: one slot per pool head), and one matrix per slot ``[K, D_out, D_s]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitdecomp.errors import UnsupportedModuleError

#: Norms of other libraries, by exact class ``(module, name)`` (the library is not imported here):
#: ``(centred numerator, statistic)``. timm's ``RmsNorm`` is ``x / rms(x)``; its ``SimpleNorm`` divides the
#: uncentred ``x`` by the *unbiased* standard deviation. Both have a gain and no bias.
OTHER_NORMS: dict[tuple[str, str], tuple[bool, str]] = {
    ("timm.layers.norm", "RmsNorm"): (False, "rms"),
    ("timm.layers.norm", "SimpleNorm"): (False, "var_unbiased"),
}


@dataclass
class NormRule:
    """A LayerNorm / RMSNorm over the last dim: ``y = gamma * C(x) / sigma(x) + beta``.

    ``centered``: ``C`` subtracts the mean (LayerNorm) or is the identity (RMS norms). ``stat``: what
    ``sigma^2`` is — ``"var"`` (biased variance, LayerNorm), ``"rms"`` (mean square), ``"var_unbiased"``.
    Bookkeeping with frozen statistics: a LayerNorm centres *each component* on its own (``C`` is
    linear) and its beta is a component of its own; an RMS norm has no centring, so a component passes
    through only scaled (``gamma / sigma`` of the full stream), and no beta unless the norm has a bias.
    """

    centered: bool
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    stat: str = "var"

    @classmethod
    def of(cls, norm: nn.Module, path: str = "") -> NormRule:
        """The rule for a norm module, or an :class:`UnsupportedModuleError` naming it."""
        if isinstance(norm, nn.LayerNorm):
            return cls(True, norm.weight, norm.bias, norm.eps)
        if isinstance(norm, nn.RMSNorm):
            eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps
            return cls(False, norm.weight, None, eps, "rms")
        other = OTHER_NORMS.get((type(norm).__module__, type(norm).__qualname__))
        if other is not None and len(norm.normalized_shape) == 1:
            return cls(other[0], norm.weight, getattr(norm, "bias", None), norm.eps, other[1])
        raise UnsupportedModuleError(path, norm, "no frozen-statistics rule for this normalisation")

    def inv_sigma(self, x: Tensor) -> Tensor:
        """``1 / sigma`` of ``x [..., D]`` with the norm's own eps and statistic ``[...]``."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.stat == "var":  # the kernel nn.LayerNorm runs: the model's own statistics, ~5x faster than var()
            return torch.native_layer_norm(x, x.shape[-1:], None, None, self.eps)[2][..., 0]
        var = x.pow(2).mean(-1) if self.stat == "rms" else x.var(-1, unbiased=True)
        return torch.rsqrt(var + self.eps)

    def left(self, m: Tensor) -> Tensor:
        """``diag(gamma) @ C @ m`` for ``m [..., D, X]`` without forming ``C = I - 11^T / D``."""
        if self.centered:
            m = m - m.mean(-2, keepdim=True)
        return self.weight.to(m)[:, None] * m if self.weight is not None else m

    def right(self, w: Tensor) -> Tensor:
        """``w @ diag(gamma) @ C`` for ``w [..., D]`` without forming ``C``."""
        if self.weight is not None:
            w = w * self.weight.to(w)
        return w - w.mean(-1, keepdim=True) if self.centered else w

    def apply_vec(self, v: Tensor) -> Tensor:
        """``diag(gamma) @ C @ v`` for a vector ``v [D]``."""
        return self.left(v[:, None])[:, 0]


@dataclass
class ReadoutMap:
    """Linear map from a stream ``[B, N, D_s]`` to the representation ``[B, D_out]``.

    weight    [B, S] (one slot per token, ``slot [S]`` or all 0) or [B, S, K] (dense slot weights)
    mats      [K, D_out, D_s]
    positions the stream positions read (all N if None)

    :class:`FactoredReadoutMap` keeps ``mats`` as low-rank factors, :class:`ChainedReadoutMap` as a chain.
    """

    weight: Tensor
    mats: Tensor
    positions: Tensor | None = None
    slot: Tensor | None = None

    @property
    def num_slots(self) -> int:
        return self.mats.shape[0]

    @property
    def like(self) -> Tensor:
        """A tensor of the map's dtype and device."""
        return self.mats

    @property
    def dense(self) -> bool:
        return self.weight.ndim == 3

    @functools.cached_property
    def flat(self) -> Tensor:
        """``mats`` laid out once as ``[K*D_s, D_out]`` so each readout is a single matmul."""
        k, o, d = self.mats.shape
        return self.mats.permute(0, 2, 1).reshape(k * d, o)

    def apply_pooled(self, pooled: Tensor) -> Tensor:
        """``[..., K, D_s] -> [..., D_out]``: the slot matrices applied to slot-pooled vectors."""
        return pooled.reshape(*pooled.shape[:-2], -1).to(self.flat) @ self.flat

    def then(self, fn) -> ReadoutMap:
        """The map followed by a linear map of the output, ``fn(m [..., D_out, X]) -> [..., D_new, X]``."""
        return ReadoutMap(self.weight, fn(self.mats), self.positions, self.slot)

    def normed(self, norm: NormRule) -> ReadoutMap:
        """The map preceded by a frozen norm's ``diag(gamma) C`` on every token (its per-token ``1/sigma``
        is a :meth:`scaled`)."""
        return ReadoutMap(self.weight, norm.right(self.mats), self.positions, self.slot)

    def then_norm(self, norm: NormRule) -> ReadoutMap:
        """The map followed by a frozen norm's ``diag(gamma) C`` of the output (its ``1/sigma`` per image
        is a :meth:`scaled`)."""
        return self.then(norm.left)

    def pull_rows(self, u: Tensor) -> Tensor:
        """``[K, k, D_s]``: row vectors ``u [k, D_out]`` pulled back through every slot's matrix,
        ``u M_k`` (directions of the output seen from the stream)."""
        return torch.einsum("jo,kod->kjd", u.to(self.like), self.mats)

    def reweighted(self, weight: Tensor) -> ReadoutMap:
        """The same map with other per-token weights (same shape)."""
        return ReadoutMap(weight, self.mats, self.positions, self.slot)

    def pool(self, x: Tensor) -> Tensor:
        """``[B, S, E] -> [B, K, E]``: the weighted sum of tokens per slot."""
        x = x.to(self.weight.dtype)
        if self.dense:
            return torch.einsum("bsk,bse->bke", self.weight, x)
        if self.slot is None:
            return torch.einsum("bs,bse->be", self.weight, x)[:, None]
        out = x.new_zeros(x.shape[0], self.num_slots, x.shape[2])
        return out.index_add_(1, self.slot, self.weight[..., None] * x)

    def slot_weights(self) -> Tensor:
        """``[B, K]``: total token weight per slot (what a constant field is multiplied by)."""
        if self.dense or self.slot is None:
            return self.weight.sum(1).reshape(self.weight.shape[0], -1)
        out = self.weight.new_zeros(self.weight.shape[0], self.num_slots)
        return out.index_add_(1, self.slot, self.weight)

    def query_weights(self) -> Tensor:
        """``[B, S, K]``: the weight of every read position in every slot."""
        if self.dense:
            return self.weight
        if self.slot is None:
            return self.weight[..., None]
        return self.weight[..., None] * nn.functional.one_hot(self.slot, self.num_slots).to(self.weight)

    def gathered(self, index: Tensor) -> ReadoutMap:
        """The same map read at stream positions ``index [P]`` (``-1``: a padding slot, weight 0), e.g. in
        an attention's window order."""
        index = index.to(self.weight.device)
        valid, safe = index >= 0, index.clamp_min(0)
        weight = self.weight[:, safe] * (valid[:, None] if self.dense else valid).to(self.weight)
        return ReadoutMap(weight, self.mats, None, None if self.slot is None else self.slot[safe])

    def scaled(self, scale: Tensor) -> ReadoutMap:
        """The same map after a per-position scale ``[B, S]`` of the stream."""
        return self.reweighted(self.weight * (scale[..., None] if self.dense else scale).to(self.weight))

    def const_pooled(self, vec: Tensor) -> Tensor:
        """The pooled form ``[B, K, D_s]`` of the same vector ``[D_s]`` added at every position."""
        return self.slot_weights()[:, :, None] * vec.to(self.like)

    def field(self, x: Tensor) -> Tensor:
        """Read out a field ``[B, S, D_s]`` (already at ``positions``) -> ``[B, D_out]``."""
        return self.apply_pooled(self.pool(x))

    def const(self, vec: Tensor) -> Tensor:
        """Read out the same vector ``[D_s]`` added at every position -> ``[B, D_out]``."""
        return self.apply_pooled(self.const_pooled(vec))


class ElementwiseReadoutMap(ReadoutMap):
    """A pooling read out through the identity or a frozen norm's ``diag(gamma) C`` (``norm``): one slot
    whose matrix acts on each pooled vector elementwise, in ``O(D)`` instead of a ``D x D`` matmul per
    component (the final norm of a ViT or Swin before its pooling). The dense ``[1, D, D]`` is built only
    when a later linear step composes it or a token split asks for ``mats``."""

    def __init__(self, weight: Tensor, dim: int, positions: Tensor | None = None, norm: NormRule | None = None) -> None:
        self.weight, self.dim, self.positions, self.slot, self.norm = weight, dim, positions, None, norm

    @property
    def num_slots(self) -> int:
        return 1

    @property
    def like(self) -> Tensor:
        return self.weight

    @functools.cached_property
    def mats(self) -> Tensor:  # type: ignore[override]
        eye = torch.eye(self.dim, dtype=self.weight.dtype, device=self.weight.device)
        return (eye if self.norm is None else self.norm.left(eye))[None]

    def apply_pooled(self, pooled: Tensor) -> Tensor:
        v = pooled[..., 0, :].to(self.weight)  # [..., D_s]
        return v if self.norm is None else self.norm.left(v[..., None])[..., 0]

    def pull_rows(self, u: Tensor) -> Tensor:
        u = u.to(self.weight)
        return (u if self.norm is None else self.norm.right(u))[None]

    def normed(self, norm: NormRule) -> ReadoutMap:
        if self.norm is None:
            return ElementwiseReadoutMap(self.weight, self.dim, self.positions, norm)
        return super().normed(norm)

    def then_norm(self, norm: NormRule) -> ReadoutMap:
        if self.norm is None:  # the identity followed by the norm is the norm
            return ElementwiseReadoutMap(self.weight, self.dim, self.positions, norm)
        return super().then_norm(norm)

    def reweighted(self, weight: Tensor) -> ReadoutMap:
        return ElementwiseReadoutMap(weight, self.dim, self.positions, self.norm)

    def gathered(self, index: Tensor) -> ReadoutMap:
        index = index.to(self.weight.device)
        valid, safe = index >= 0, index.clamp_min(0)
        return ElementwiseReadoutMap(self.weight[:, safe] * valid.to(self.weight), self.dim, None, self.norm)


class FactoredReadoutMap(ReadoutMap):
    """A readout map whose slot matrices stay low-rank factors (an attention pool: ``mats_k = post_k @
    pre_k`` with ``pre [K, r, D_s]``, ``post [D_out, K*r]``): pooled vectors are read through the factors in
    ``K*r*(D_s + D_out)`` instead of ``K*D_s*D_out``, and the full ``[K, D_out, D_s]`` is built only when
    something asks for ``mats`` (token splits)."""

    def __init__(self, weight: Tensor, factors: tuple[Tensor, Tensor], positions: Tensor | None = None) -> None:
        self.weight, self.factors, self.positions, self.slot = weight, factors, positions, None

    @property
    def num_slots(self) -> int:
        return self.factors[0].shape[0]

    @property
    def like(self) -> Tensor:
        return self.factors[0]

    @functools.cached_property
    def mats(self) -> Tensor:  # type: ignore[override]
        pre, post = self.factors
        k, r, _ = pre.shape
        return torch.einsum("okr,krd->kod", post.view(post.shape[0], k, r), pre)

    def apply_pooled(self, pooled: Tensor) -> Tensor:
        pre, post = self.factors
        inner = torch.einsum("...kd,krd->...kr", pooled.to(pre), pre)
        return inner.reshape(*inner.shape[:-2], -1) @ post.T

    def pull_rows(self, u: Tensor) -> Tensor:
        pre, post = self.factors
        k, r, _ = pre.shape
        return torch.einsum("jkr,krd->kjd", (u.to(post) @ post).view(-1, k, r), pre)

    def then(self, fn) -> ReadoutMap:
        return FactoredReadoutMap(self.weight, (self.factors[0], fn(self.factors[1])), self.positions)

    def normed(self, norm: NormRule) -> ReadoutMap:
        return FactoredReadoutMap(self.weight, (norm.right(self.factors[0]), self.factors[1]), self.positions)

    def reweighted(self, weight: Tensor) -> ReadoutMap:
        return FactoredReadoutMap(weight, self.factors, self.positions)

    def gathered(self, index: Tensor) -> ReadoutMap:
        index = index.to(self.weight.device)
        valid, safe = index >= 0, index.clamp_min(0)
        weight = self.weight[:, safe] * (valid[:, None] if self.dense else valid).to(self.weight)
        return FactoredReadoutMap(weight, self.factors)


class ChainedReadoutMap(ReadoutMap):
    """A readout map pulled back through a patch merging, kept as a chain instead of multiplied out.

    Slot ``k_out * K_in + k_in`` reads ``parent`` slot ``k_out`` through ``local[k_in] [D_next, C]``;
    pooled vectors are read out as ``parent.apply_pooled(local applied per input slot)``, so the merged
    matrices ``[K_out*K_in, D_out, C]`` are built only when something asks for ``mats`` (token splits).
    """

    def __init__(self, parent: ReadoutMap, local: Tensor, weight: Tensor, slot: Tensor) -> None:
        self.parent, self.local, self.weight, self.slot = parent, local, weight, slot
        self.positions = None

    @property
    def num_slots(self) -> int:
        return self.parent.num_slots * self.local.shape[0]

    @property
    def like(self) -> Tensor:
        return self.local

    @functools.cached_property
    def mats(self) -> Tensor:  # type: ignore[override]
        """``[K_out*K_in, D_out, C]``, built on first use."""
        c = self.local.shape[-1]
        return torch.einsum("aod,kdc->akoc", self.parent.mats, self.local).reshape(-1, self.parent.mats.shape[1], c)

    @functools.cached_property
    def local_flat(self) -> Tensor:
        """``local`` laid out once as ``[K_in*C, D_next]`` (each read is then one matmul, no copy of it)."""
        k_in, d_next, c = self.local.shape
        return self.local.permute(0, 2, 1).reshape(k_in * c, d_next)

    def apply_pooled(self, pooled: Tensor) -> Tensor:
        k_in, _, c = self.local.shape
        p = pooled.reshape(*pooled.shape[:-2], -1, k_in * c).to(self.local)
        return self.parent.apply_pooled(p @ self.local_flat)  # [..., K_out, D_next]

    def const_pooled(self, vec: Tensor) -> Tensor:
        return self.slot_weights()[:, :, None] * vec.to(self.local)

    def pull_rows(self, u: Tensor) -> Tensor:
        up = self.parent.pull_rows(u)  # [K_out, k, D_next], then each input slot's local map
        return torch.einsum("ajd,kdc->akjc", up, self.local.to(up)).reshape(-1, up.shape[1], self.local.shape[-1])

    def gathered(self, index: Tensor) -> ReadoutMap:
        index = index.to(self.weight.device)
        valid, safe = index >= 0, index.clamp_min(0)
        return ChainedReadoutMap(self.parent, self.local, self.weight[:, safe] * valid.to(self.weight), self.slot[safe])

    def scaled(self, scale: Tensor) -> ReadoutMap:
        return self.reweighted(self.weight * scale.to(self.weight))

    def reweighted(self, weight: Tensor) -> ReadoutMap:
        return ChainedReadoutMap(self.parent, self.local, weight, self.slot)

    def normed(self, norm: NormRule) -> ReadoutMap:
        return ChainedReadoutMap(self.parent, norm.right(self.local), self.weight, self.slot)
