"""A sparse autoencoder (SAE) on a model's representation, and the exact split of each latent's
pre-activation over the representation's parts.

The encoder reads the representation ``r [N, D]`` through an input normalisation ``x = g(r) (r -
s(r))`` (a gain ``g`` and a shift ``s``: fixed ones, or per-image statistics as saev / Prisma /
sae-lens SAEs use them), optionally minus the decoder bias, then one linear map::

    a(r) = W_enc (g(r) (r - s(r)) - b_pre) + b_enc           pre-activations [N, L]
    z    = act(a)                                              TopK, ReLU or a threshold (JumpReLU)
    r^   = (z W_dec + b_dec) / g(r) + s(r)                     the reconstruction [N, D]

With the per-image statistics frozen at their values on the whole representation (as the
decomposition freezes every norm's statistics), ``a`` is linear in ``r``; so for ``r = sum_i c_i``
(vitdecomp's parts) it splits exactly (:meth:`SparseAutoencoder.split`)::

    a_j(r) = sum_i g(r) W_enc[j] . P c_i  +  (b_enc[j] - W_enc[j] . (g(r) m + b_pre))

with ``P`` the identity, or the centring over features for ``layer_norm``, and ``m`` the fixed shift.
The first terms are the parts' shares of latent ``j``; the last is a constant of the SAE (and of the
image's frozen gain). Loaders for the published layouts are in :mod:`vitdecomp.sae.formats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vitdecomp.errors import UsageError

#: Per-image input normalisations: none (a fixed shift and gain), ``layer_norm`` (centre over
#: features, divide by the unbiased std + eps: Prisma, sae-lens), ``norm_rescale`` (scale to norm
#: ``sqrt(D)``: Prisma's and sae-lens' ``constant_norm_rescale``).
INPUT_NORMS = ("none", "layer_norm", "norm_rescale")
#: Activations: ``topk`` (the ``k`` largest pre-activations, negatives zeroed), ``relu``,
#: ``threshold`` (JumpReLU: ``a`` where ``a > theta``; BatchTopK at inference).
ACTIVATIONS = ("topk", "relu", "threshold")
#: Elements of the largest ``[N, C, L]`` block :meth:`SparseAutoencoder.split` builds at once.
SPLIT_ELEMENTS = 1 << 25


@dataclass
class SparseAutoencoder:
    """An SAE over a ``D``-dim representation with ``L`` latents (float32 tensors, rows = latents).

    ``w_enc [L, D]``, ``b_enc [L]``, ``w_dec [L, D]``, ``b_dec [D]``; ``activation`` and its ``k`` /
    ``threshold`` (``[L]`` or a scalar); the input normalisation: ``input_norm`` (per image),
    ``shift [D]`` and ``gain`` (fixed; ``input_norm="none"`` only), ``subtract_b_dec`` (encode
    ``x - b_dec``), ``eps``; ``source`` where it came from (``"vitdecomp"``, ``"saev"``, ``"prisma"``,
    ``"sae-lens"``) and ``info`` what its file says (hook point, training figures, ...).
    """

    w_enc: Tensor
    b_enc: Tensor
    w_dec: Tensor
    b_dec: Tensor
    activation: str = "topk"
    k: int | None = None
    threshold: Tensor | None = None
    input_norm: str = "none"
    shift: Tensor | None = None
    gain: float = 1.0
    subtract_b_dec: bool = False
    eps: float = 1e-5
    source: str = "vitdecomp"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, d = self.w_enc.shape
        if self.w_dec.shape != (n, d) or self.b_enc.shape != (n,) or self.b_dec.shape != (d,):
            raise UsageError(
                f"SAE tensors do not fit together: W_enc {tuple(self.w_enc.shape)} (latents x inputs), W_dec "
                f"{tuple(self.w_dec.shape)}, b_enc {tuple(self.b_enc.shape)}, b_dec {tuple(self.b_dec.shape)}"
            )
        if self.activation not in ACTIVATIONS or self.input_norm not in INPUT_NORMS:
            raise UsageError(f"SAE activation {self.activation!r} / input norm {self.input_norm!r} not supported")
        if self.activation == "topk" and not (self.k and self.k > 0):
            raise UsageError("a TopK SAE needs k > 0")
        if self.activation == "threshold" and self.threshold is None:
            raise UsageError("a JumpReLU / BatchTopK SAE needs its threshold")
        if self.shift is not None and self.input_norm != "none":
            raise UsageError("a fixed shift goes with input_norm 'none' only")

    @property
    def n_latents(self) -> int:
        return int(self.w_enc.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.w_enc.shape[1])

    def to(self, device: str | torch.device) -> SparseAutoencoder:
        for name in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold", "shift"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    # ------------------------------------------------------------------ the input normalisation
    def gains(self, r: Tensor) -> Tensor:
        """``g(r) [N]``: the input gain of each image (fixed, or its frozen statistic)."""
        r = r.float()
        if self.input_norm == "layer_norm":
            return 1.0 / (r.std(-1) + self.eps)
        if self.input_norm == "norm_rescale":
            return math.sqrt(self.d_in) / r.norm(dim=-1).clamp_min(1e-30)
        return r.new_full((r.shape[0],), self.gain)

    def _centre(self, x: Tensor) -> Tensor:
        """``P x`` over the last dimension (the centring over features of ``layer_norm``)."""
        return x - x.mean(-1, keepdim=True) if self.input_norm == "layer_norm" else x

    def _fixed_shift(self) -> Tensor:
        return self.shift.float() if self.shift is not None else self.b_dec.new_zeros(self.d_in)

    def _b_pre(self) -> Tensor:
        return self.b_dec.float() if self.subtract_b_dec else self.b_dec.new_zeros(self.d_in)

    # ------------------------------------------------------------------ encode / decode
    def pre_activation(self, r: Tensor) -> Tensor:
        """``a [N, L]``: the pre-activations of representations ``r [N, D]``."""
        r = r.float()
        x = self.gains(r)[:, None] * (self._centre(r) - self._fixed_shift()) - self._b_pre()
        return x @ self.w_enc.float().T + self.b_enc.float()

    def activate(self, a: Tensor) -> Tensor:
        """``z [N, L]``: the latents of pre-activations ``a``."""
        if self.activation == "relu":
            return torch.relu(a)
        if self.activation == "threshold":
            theta = torch.as_tensor(self.threshold, dtype=a.dtype, device=a.device)
            return torch.where(a > theta.clamp_min(0), a, torch.zeros_like(a))
        top = torch.topk(a, min(int(self.k or 1), a.shape[-1]), dim=-1)
        return torch.zeros_like(a).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, r: Tensor) -> Tensor:
        """``z [N, L]``: the latents of representations ``r [N, D]``."""
        return self.activate(self.pre_activation(r))

    def decode(self, z: Tensor, r: Tensor) -> Tensor:
        """``r^ [N, D]``: the reconstruction from latents ``z``, in the representation space (the
        normalisation undone with the statistics of ``r``, the representations encoded)."""
        x = z.float() @ self.w_dec.float() + self.b_dec.float()
        r = r.float()
        if self.input_norm == "layer_norm":  # as Prisma / sae-lens undo it: times the std (no eps), plus the mean
            return x * r.std(-1, keepdim=True) + r.mean(-1, keepdim=True)
        return x / self.gains(r)[:, None] + self._fixed_shift()

    # ------------------------------------------------------------------ the exact split
    def directions(self) -> Tensor:
        """``[L, D]``: each latent's encoder row as a direction of the representation space (the
        centring folded in): ``a_j = g(r) directions[j] . r + const``."""
        return self._centre(self.w_enc.float())

    def decoder_directions(self) -> Tensor:
        """``[L, D]``: each latent's decoder row as a direction of the representation space (what the
        latent adds to the reconstruction, up to the image's positive gain; the centring folded in)."""
        return self._centre(self.w_dec.float())

    def constant(self, r: Tensor) -> Tensor:
        """``[N, L]``: the part of each pre-activation no part of the representation carries."""
        shift = self.gains(r.float())[:, None] * self._fixed_shift() + self._b_pre()
        return self.b_enc.float() - shift @ self.w_enc.float().T

    def split(self, contributions: Tensor, r: Tensor | None = None, latents: slice | None = None) -> Tensor:
        """``[N, C, L']``: the share of each part ``contributions [N, C, D]`` in the pre-activation of
        each latent (``latents``: a slice of them; default all), with the image's statistics frozen
        at those of ``r`` (default: the parts' sum). ``split(c).sum(1) + constant(r) == pre_activation(r)``."""
        c = contributions.float()
        g = self.gains(c.sum(1) if r is None else r)
        w = self.directions()[latents if latents is not None else slice(None)]
        return g[:, None, None] * torch.einsum("ncd,ld->ncl", c, w)


def split_blocks(n_images: int, n_parts: int, n_latents: int, elements: int = SPLIT_ELEMENTS) -> list[slice]:
    """Slices of the latents such that one ``[n_images, n_parts, block]`` split holds at most
    ``elements`` numbers."""
    step = max(1, elements // max(1, n_images * n_parts))
    return [slice(s, min(s + step, n_latents)) for s in range(0, n_latents, step)]
