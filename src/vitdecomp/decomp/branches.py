"""Branch kinds: how a declared residual branch is captured during the pass and read out after it.

A :class:`FieldPart` is one component (the whole branch output). A :class:`HeadsPart` splits an
attention branch per head at its output projection: with ``z [B, S, H*dh]`` the concatenated head
outputs at the read positions, head ``h`` contributes ``R(W_O[:, h] z_h)``; norms inside or after the
branch (frozen statistics) become a per-position scale of ``z`` and a left factor of ``W_O``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitdecomp.components import ComponentLabel
from vitdecomp.decomp.capture import Capture, grid_of, take_positions, to_stream
from vitdecomp.decomp.plan import Field, Heads
from vitdecomp.decomp.readout import NormRule, ReadoutMap
from vitdecomp.errors import VitDecompError


class FieldPart:
    """A branch whose whole output (the tensor at the declared tap, times its scale) is one component."""

    def __init__(self, spec: Field, label: ComponentLabel) -> None:
        self.spec, self.labels, self.path = spec, [label], spec.path
        self.value: Tensor | None = None

    def attach(self, cap: Capture, positions: Tensor | None, tokens: bool) -> None:
        def keep(s: Tensor) -> None:
            s = take_positions(s, positions)
            self.value = s if self.spec.scale is None else s * self.spec.scale.to(s)

        cap.stream(self.spec.tap, keep)

    def pooled(self, ro: ReadoutMap) -> Tensor:
        """``[B, 1, K, D_s]``: the branch pooled per readout slot (``ro.apply_pooled`` reads it out)."""
        if self.value is None:
            raise VitDecompError(f"module '{self.path}' was not called in the forward pass")
        return ro.pool(self.value)[:, None]

    def contributions(self, ro: ReadoutMap) -> Tensor:
        """``[B, 1, D_out]``."""
        return ro.apply_pooled(self.pooled(ro))

    def release(self) -> None:
        self.value = None


class HeadsPart:
    """Multi-head attention, one component per head (plus its constant terms), or one in all."""

    def __init__(self, spec: Heads, base: dict, heads: bool) -> None:
        self.spec, self.path, self.num_heads, self.heads = spec, spec.path, spec.num_heads, heads
        base = {**base, "sublayer": spec.sublayer} if spec.sublayer else base
        self.inner = NormRule.of(spec.inner_norm, f"{spec.path}.norm") if spec.inner_norm is not None else None
        self.post = NormRule.of(spec.post_norm, f"{spec.path} post-norm") if spec.post_norm is not None else None
        self.head_labels = [ComponentLabel("attn_head", head=h, **base) for h in range(self.num_heads)]
        has_const = spec.proj_bias is not None or any(
            r is not None and r.bias is not None for r in (self.inner, self.post)
        )
        if heads:
            self.labels = self.head_labels + ([ComponentLabel("attn_bias", **base)] if has_const else [])
        else:
            self.labels = [ComponentLabel("attn", **base)]
        self.want_tokens = False
        self.z: Tensor | None = None  # [B, S, H*dh] at the read positions: stream order, or window order
        self.inner_scale: Tensor | None = None  # [B, S] the inner norm's 1/sigma, in z's order
        self.post_scale: Tensor | None = None  # [B, S] the post-norm's 1/sigma, stream order
        self.probs: Tensor | None = None  # [B, H, S, N] or windowed [B, nW, H, w, w]
        self.v: Tensor | None = None  # [B, H, N', dh] in key order: window order, or stream order
        self.index: Tensor | None = None  # [nW, w] window slots -> stream positions
        self.n_tokens = 0

    # -- capture ------------------------------------------------------------------------------

    def _windows_to_stream(self, t: Tensor) -> Tensor:
        """``[B*nW, w, E] -> [B, N, E]`` (padding dropped)."""
        nw, w = self.index.shape
        t = t.reshape(-1, nw * w, t.shape[-1])
        flat = self.index.reshape(-1).to(t.device)
        keep = flat >= 0
        out = t.new_zeros(t.shape[0], self.n_tokens, t.shape[-1])
        out[:, flat[keep]] = t[:, keep]
        return out

    def _z_order(self, ro: ReadoutMap) -> ReadoutMap:
        """``ro`` read in the order ``z`` is kept in (window order for windowed attention)."""
        return ro if self.spec.windows is None else ro.gathered(self.index.reshape(-1))

    def _z_scale(self) -> Tensor | None:
        """``[B, S]``: the per-position scale of ``z`` (inner and post norms), in z's order."""
        post = self.post_scale
        if post is not None and self.spec.windows is not None:
            post = post[:, self.index.reshape(-1).clamp_min(0).to(post.device)]
        if post is None or self.inner_scale is None:
            return post if self.inner_scale is None else self.inner_scale
        return post * self.inner_scale

    def stream_z(self) -> Tensor:
        """``z`` in stream order ``[B, N, H*dh]`` (window padding dropped)."""
        return self.z if self.spec.windows is None else self._windows_to_stream(self.z)

    def attach(self, cap: Capture, positions: Tensor | None, tokens: bool) -> None:
        spec = self.spec
        self.want_tokens = tokens and self.heads
        if spec.windows is not None:
            if positions is not None:
                raise VitDecompError(f"'{self.path}': windowed attention needs the readout at every position")

            def keep_grid(x: Tensor) -> None:
                grid = grid_of(x, spec.windows.grid.layout)
                self.n_tokens, self.index = grid[0] * grid[1], spec.windows.index(grid)

            cap.tap(spec.windows.grid, keep_grid)
        if spec.post_norm is not None:
            cap.norm_stats(
                spec.post_norm, self.post.inv_sigma, lambda s: setattr(self, "post_scale", take_positions(s, positions))
            )
        if spec.replace is not None:
            self._attach_replacement(cap, positions)
            return

        def keep_z(t: Tensor) -> None:
            z = to_stream(t, spec.z.layout)  # windowed: [B*nW, w, E], kept in window order
            if spec.windows is None:
                self.z = take_positions(z, positions)
            else:
                self.z = z.reshape(-1, self.index.numel(), z.shape[-1])
            if self.inner is not None:
                self.inner_scale = self.inner.inv_sigma(self.z)

        cap.tap(spec.z, keep_z)
        if self.want_tokens:
            if spec.probs is None or spec.values is None:
                raise VitDecompError(f"per-token contributions are not available for '{self.path}'")
            if hasattr(spec.module, "fused_attn"):
                cap.set_attr(spec.module, "fused_attn", False)
            for obj, name, value in spec.explicit:
                cap.set_attr(obj, name, value)
            cap.tap(spec.probs, self._keep_probs(positions))
            cap.tap(spec.values.tap, self._keep_values)

    def _keep_probs(self, positions: Tensor | None):
        def keep(a: Tensor) -> None:
            if self.spec.windows is None:
                self.probs = take_positions(a, positions, dim=2)
            else:
                self.probs = a.reshape(-1, self.index.shape[0], *a.shape[1:])

        return keep

    def _keep_values(self, t: Tensor) -> None:
        v = self.spec.values.fn(t).contiguous()  # [B', N', H*dh]; a view into qkv would keep all of qkv alive
        v = v if self.spec.windows is None else v.reshape(-1, self.index.numel(), v.shape[-1])  # window order
        self.v = v.view(v.shape[0], v.shape[1], self.num_heads, -1).transpose(1, 2)

    def _attach_replacement(self, cap: Capture, positions: Tensor | None) -> None:
        module, replace = self.spec.module, self.spec.replace

        def forward(*args, **kwargs):
            out, self.z, self.probs, self.v = replace(args, kwargs, positions, self.want_tokens)
            return out

        cap.set_attr(module, "forward", forward)

    # -- readout ------------------------------------------------------------------------------

    def out_weight(self, like: Tensor) -> Tensor:
        """``[D, H, e]``: the output projection with the norms' gains/centring and the layer scale folded in."""
        w = self.spec.proj_weight.reshape(self.spec.proj_weight.shape[0], -1).to(like)
        if self.inner is not None:
            w = self.inner.right(w)
        if self.post is not None:
            w = self.post.left(w)
        if self.spec.layer_scale is not None:
            w = self.spec.layer_scale.to(like)[:, None] * w
        return w.view(w.shape[0], self.num_heads, -1)

    def const_pooled(self, ro: ReadoutMap) -> Tensor | None:
        """``[B, K, D_s]``: the branch's constant terms (biases and norm betas) pooled per slot, or None."""
        like = ro.like
        c = None if self.spec.proj_bias is None else self.spec.proj_bias.to(like)
        if self.inner is not None and self.inner.bias is not None:
            w = self.spec.proj_weight.reshape(self.spec.proj_weight.shape[0], -1).to(like)
            c = (0 if c is None else c) + w @ self.inner.bias.to(like)
        ls = self.spec.layer_scale
        gain = (lambda v: v) if ls is None else (lambda v: ls.to(like) * v)
        out = None
        if c is not None:
            if self.post is None:
                out = ro.const_pooled(gain(c))
            else:
                out = ro.scaled(self.post_scale).const_pooled(gain(self.post.apply_vec(c)))
        if self.post is not None and self.post.bias is not None:
            beta = ro.const_pooled(gain(self.post.bias.to(like)))
            out = beta if out is None else out + beta
        return out

    def pooled(self, ro: ReadoutMap) -> Tensor:
        """``[B, len(labels), K, D_s]``: every component pooled per readout slot (``ro.apply_pooled``
        reads them out)."""
        if self.z is None:
            raise VitDecompError(f"attention '{self.path}' was not called in the forward pass")
        scale = self._z_scale()  # folded into the pooling weights: z itself is never copied
        z_ro = self._z_order(ro) if scale is None else self._z_order(ro).scaled(scale)
        w = self.out_weight(ro.like)  # [D, H, e]
        pz = z_ro.pool(self.z).view(self.z.shape[0], ro.num_slots, self.num_heads, -1)  # [B, K, H, e]
        const = self.const_pooled(ro)
        if not self.heads:
            u = torch.einsum("dhe,bkhe->bkd", w, pz)
            return (u if const is None else u + const)[:, None]
        u = torch.einsum("dhe,bkhe->bhkd", w, pz)
        return u if const is None else torch.cat([u, const[:, None]], 1)

    def token_parts_size(self) -> int:
        """Number of source tokens ``N`` (after the pass)."""
        return self.v.shape[2] if self.spec.windows is None else self.n_tokens

    def stream_values(self) -> Tensor:
        """``v [B, H, N, dh]`` in stream order (window padding dropped)."""
        if self.spec.windows is None:
            return self.v
        b, h, _, dh = self.v.shape
        return self._windows_to_stream(self.v.transpose(1, 2).reshape(b, -1, h * dh)).view(b, -1, h, dh).transpose(1, 2)

    def key_parts(self, ro: ReadoutMap) -> tuple[Tensor, Tensor | None]:
        """``abar^T [H, B, N', K]``: ``sum_q w_q A[q, j]`` over read positions ``q`` of slot ``k`` (``w_q``
        includes the per-position norm scales), keys ``j`` in the order the attention sees them, and
        their stream positions ``[N']`` (window order; ``None``: already stream order)."""
        qw = self._z_order(ro).query_weights()  # [B, S, K] in z's order
        scale = self._z_scale()
        if scale is not None:
            qw = qw * scale[..., None].to(qw)
        if self.spec.windows is None:
            return torch.einsum("bsk,bhsn->hbnk", qw, self.probs.to(qw)), None
        idx = self._full_windows().to(qw.device)
        qw = qw.view(qw.shape[0], *idx.shape, qw.shape[-1])  # [B, nW, w, K]
        probs = self.probs.to(qw)
        if 4 * qw.shape[-1] <= idx.shape[1]:  # few slots: a [K, w] left factor is faster than a [w, K] right one
            at = torch.matmul(qw.transpose(-1, -2)[:, :, None], probs).transpose(-1, -2)  # [B, nW, H, w_key, K]
        else:
            at = torch.matmul(probs.transpose(-1, -2), qw[:, :, None])
        return at.permute(2, 0, 1, 3, 4).reshape(at.shape[2], at.shape[0], -1, at.shape[-1]), idx.reshape(-1)

    def _full_windows(self) -> Tensor:
        """``[nW, w]`` window slots -> stream positions; windows with padding are refused."""
        if (self.index < 0).any():
            raise VitDecompError(
                f"per-token contributions of '{self.path}' with padded windows are not supported; "
                "use an image size whose token grid is a multiple of the window size"
            )
        return self.index

    def window_query_weights(self, ro: ReadoutMap) -> tuple[Tensor, Tensor]:
        """Windowed attention read through one slot per token: ``(w [B, nW, w], slot [nW, w])``, each
        query's readout weight (the norms' per-position scales included) and slot, in window order."""
        idx = self._full_windows()
        z_ro = self._z_order(ro)
        scale = self._z_scale()
        w = z_ro.weight if scale is None else z_ro.weight * scale.to(z_ro.weight)
        return w.view(w.shape[0], *idx.shape), z_ro.slot.view(idx.shape)

    def token_parts(self, ro: ReadoutMap) -> Tensor:
        """``abar [B, H, K, N]``: :meth:`key_parts` with the keys in stream order."""
        at, idx = self.key_parts(ro)
        abar = at.permute(1, 0, 3, 2)
        if idx is None:
            return abar
        out = abar.new_zeros(*abar.shape[:3], self.n_tokens)
        out[..., idx] = abar
        return out

    def token_contributions(self, ro: ReadoutMap, out: Tensor) -> None:
        """Write ``[B, H, N, D_out]`` into ``out``; summing over ``N`` gives each head's contribution."""
        abar = self.token_parts(ro)
        w = self.out_weight(ro.mats)
        v = self.stream_values().to(w)
        for k in range(ro.num_slots):
            mw = torch.einsum("od,dhe->hoe", ro.mats[k], w)  # [H, D_out, e]
            part = torch.einsum("hoe,bhne->bhno", mw, v).mul_(abar[:, :, k, :, None])
            if k == 0:
                out.copy_(part)
            else:
                out.add_(part)

    def release(self) -> None:
        self.z = self.inner_scale = self.post_scale = self.probs = self.v = None


Part = FieldPart | HeadsPart
