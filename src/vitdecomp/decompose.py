"""The decomposition engine: one forward pass with hooks, then a frozen-statistics linear readout.

How it works. With the non-linear quantities of the normal forward pass frozen (attention
probabilities, every norm's mean and standard deviation), the map from a stage's residual stream
``[B, N, D_s]`` to the representation ``[B, D_out]`` is linear. A :class:`Readout` stores that map in a
factored form that is cheap to apply: per-token weights ``[B, S]`` (norm scales, pooling), a slot index
per token (which input slot of a downstream patch merging it lands in) and one matrix per slot
``[K, D_out, D_s]`` (centring, norm gains, merging/projection weights). Every residual branch's
output — an attention head's output-projection slice, an MLP — is read out through it where it is
added. A norm's beta and every bias are constants of their own. Nothing of size
``[components, tokens, dim]`` is built unless per-token contributions are asked for.

Adapters (``vitdecomp.models``) describe where a family's parts are as a :class:`Plan` of stages,
blocks and branches; this module does the rest for every family.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vitdecomp.components import ComponentLabel, Decomposition, TokenContributions
from vitdecomp.errors import UnsupportedModuleError, VitDecompError

# ---------------------------------------------------------------------------------------------
# norms with frozen statistics


@dataclass
class NormRule:
    """A LayerNorm / RMSNorm over the last dim: ``y = gamma * C(x) / sigma(x) + beta``."""

    centered: bool
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    @classmethod
    def of(cls, norm: nn.Module, path: str) -> NormRule:
        """The rule for a norm module, or an :class:`UnsupportedModuleError` naming it."""
        if isinstance(norm, nn.LayerNorm):
            return cls(True, norm.weight, norm.bias, norm.eps)
        rms = getattr(nn, "RMSNorm", None)
        if rms is not None and isinstance(norm, rms):
            eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps
            return cls(False, norm.weight, None, eps)
        raise UnsupportedModuleError(path, norm, "no frozen-statistics rule for this normalisation")

    def inv_sigma(self, x: Tensor) -> Tensor:
        """``1 / sigma`` of ``x [..., D]`` with the norm's own eps and the biased variance ``[...]``."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        var = x.var(-1, unbiased=False) if self.centered else x.pow(2).mean(-1)
        return torch.rsqrt(var + self.eps)

    def matrix(self, dim: int, like: Tensor) -> Tensor:
        """``diag(gamma) @ C`` with ``C = I - 11^T / D`` (identity for RMSNorm): ``[D, D]``."""
        return self.left(torch.eye(dim, dtype=like.dtype, device=like.device))

    def left(self, m: Tensor) -> Tensor:
        """``diag(gamma) @ C @ m`` for ``m [..., D, X]`` without forming ``C``."""
        if self.centered:
            m = m - m.mean(-2, keepdim=True)
        return self.weight.to(m)[:, None] * m if self.weight is not None else m

    def right(self, w: Tensor) -> Tensor:
        """``w @ diag(gamma) @ C`` for ``w [..., D]`` without forming ``C``."""
        if self.weight is not None:
            w = w * self.weight.to(w)
        return w - w.mean(-1, keepdim=True) if self.centered else w


# ---------------------------------------------------------------------------------------------
# the readout


@dataclass
class Readout:
    """Linear map from a stage's stream ``[B, N, D_s]`` to the representation ``[B, D_out]``.

    weight    [B, S]   per-token weights for the stream positions ``positions`` (all N if None)
    slot      [S]      which of the ``K`` matrices each position goes through (all 0 if None)
    mats      [K, D_out, D_s]
    """

    weight: Tensor
    mats: Tensor
    positions: Tensor | None = None
    slot: Tensor | None = None

    @property
    def num_slots(self) -> int:
        return self.mats.shape[0]

    @functools.cached_property
    def flat(self) -> Tensor:
        """``mats`` laid out once as ``[K*D_s, D_out]`` so each readout is a single matmul."""
        k, o, d = self.mats.shape
        return self.mats.permute(0, 2, 1).reshape(k * d, o)

    def apply_pooled(self, pooled: Tensor) -> Tensor:
        """``[..., K, D_s] -> [..., D_out]``: the slot matrices applied to slot-pooled vectors."""
        return pooled.reshape(*pooled.shape[:-2], -1).to(self.flat) @ self.flat

    def pool(self, x: Tensor) -> Tensor:
        """``[B, S, E] -> [B, K, E]``: the weighted sum of tokens per slot."""
        x = x.to(self.weight.dtype)
        if self.slot is None:
            return torch.einsum("bs,bse->be", self.weight, x)[:, None]
        out = x.new_zeros(x.shape[0], self.num_slots, x.shape[2])
        return out.index_add_(1, self.slot, self.weight[..., None] * x)

    def slot_weights(self) -> Tensor:
        """``[B, K]``: total token weight per slot (what a constant field is multiplied by)."""
        if self.slot is None:
            return self.weight.sum(1, keepdim=True)
        out = self.weight.new_zeros(self.weight.shape[0], self.num_slots)
        return out.index_add_(1, self.slot, self.weight)

    def field(self, x: Tensor) -> Tensor:
        """Read out a field ``[B, S, D_s]`` (already at ``positions``) -> ``[B, D_out]``."""
        return self.apply_pooled(self.pool(x))

    def const(self, vec: Tensor) -> Tensor:
        """Read out the same vector ``[D_s]`` added at every position -> ``[B, D_out]``."""
        return self.apply_pooled(self.slot_weights()[:, :, None] * vec.to(self.mats))


def pool_weights(x: Tensor, positions: Tensor | None, skip: int = 0) -> Tensor:
    """Pooling weights ``[B, S]`` for a stream ``x [B, N, D]`` at ``positions``: ``1`` for a selected
    token, else an average over tokens ``skip:`` (prefix tokens excluded)."""
    b, n = x.shape[:2]
    dt = torch.promote_types(x.dtype, torch.float32)
    if positions is not None:
        return torch.ones(b, len(positions), dtype=dt, device=x.device)
    weight = torch.zeros(b, n, dtype=dt, device=x.device)
    weight[:, skip:] = 1.0 / (n - skip)
    return weight


def check_plan_args(representation: str | None, allowed: Sequence[str], start_layer: int, depth: int) -> str:
    """The representation to use (``None`` = the first allowed); errors for bad arguments."""
    representation = representation or allowed[0]
    if representation not in allowed:
        raise ValueError(f"representation must be one of {tuple(allowed)}, not {representation!r}")
    if not 0 <= start_layer <= depth:
        raise ValueError(f"start_layer must be in [0, {depth}], got {start_layer}")
    return representation


class ReadoutBuilder:
    """Builds the final readout from the last stream outward, collecting constant components."""

    def __init__(self, weight: Tensor, dim: int, positions: Tensor | None = None) -> None:
        self.weight = weight  # [B, S]
        self.positions = positions
        self.mats = torch.eye(dim, dtype=weight.dtype, device=weight.device)[None]  # [1, D, D]
        self.consts: list[tuple[ComponentLabel, Tensor]] = []  # (label, [B, D_out])

    def token_norm(self, x: Tensor, norm: NormRule, label: ComponentLabel) -> None:
        """A per-token norm applied to the stream before pooling (first op); ``x [B, S, D]`` its input."""
        if len(self.consts) or self.mats.shape[1] != x.shape[-1]:
            raise VitDecompError("a per-token norm must come first in the readout")
        pooled_ones = self.weight.sum(1)  # beta is added at every token, then pooled
        self.weight = self.weight * norm.inv_sigma(x).to(self.weight)
        self.mats = norm.matrix(x.shape[-1], self.mats)[None]
        if norm.bias is not None:
            self.consts.append((label, pooled_ones[:, None] * norm.bias.to(self.mats)[None]))

    def vector_norm(self, x: Tensor, norm: NormRule, label: ComponentLabel) -> None:
        """A norm applied to the pooled vector ``x [B, D]`` (its input)."""
        s = norm.inv_sigma(x).to(self.weight)  # [B]
        self.weight = self.weight * s[:, None]
        self.mats = norm.left(self.mats)
        self.consts = [(lab, s[:, None] * norm.left(c.T).T) for lab, c in self.consts]
        if norm.bias is not None:
            self.consts.append((label, norm.bias.to(self.mats).expand(x.shape[0], -1)))

    def linear(self, weight: Tensor, bias: Tensor | None, label: ComponentLabel) -> None:
        """A linear map ``y = x @ weight.T + bias`` (``weight [D_out, D_in]``)."""
        weight = weight.to(self.mats)
        self.mats = torch.einsum("od,kdi->koi", weight, self.mats)
        self.consts = [(lab, c @ weight.T) for lab, c in self.consts]
        if bias is not None:
            self.consts.append((label, bias.to(self.mats).expand(self.weight.shape[0], -1)))

    def build(self) -> tuple[Readout, list[tuple[ComponentLabel, Tensor]]]:
        return Readout(self.weight, self.mats, self.positions), self.consts


# ---------------------------------------------------------------------------------------------
# capture


class Capture:
    """Hook handles and captured tensors of one forward pass."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.restore: list[Callable[[], None]] = []

    def on_output(self, module: nn.Module, fn: Callable[[Tensor], None]) -> None:
        self.handles.append(module.register_forward_hook(lambda m, a, out: fn(out)))

    def on_input(self, module: nn.Module, fn: Callable[[Tensor], None]) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, a: fn(a[0])))

    def on_call(self, module: nn.Module, fn: Callable[[tuple, dict], None]) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, a, kw: fn(a, kw), with_kwargs=True))

    def set_attr(self, obj: object, name: str, value: object) -> None:
        """Set an attribute for the pass (e.g. ``fused_attn=False``) and restore it afterwards."""
        old = getattr(obj, name)
        object.__setattr__(obj, name, value) if isinstance(obj, nn.Module) else setattr(obj, name, value)
        self.restore.append(lambda: object.__setattr__(obj, name, old))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for undo in reversed(self.restore):
            undo()
        self.handles.clear()
        self.restore.clear()


def take_positions(x: Tensor, positions: Tensor | None, dim: int = 1) -> Tensor:
    """``x`` restricted to stream ``positions`` along ``dim`` (a copy, so the full tensor can be freed)."""
    if positions is None:
        return x
    lo, n = int(positions[0]), len(positions)
    if bool((positions == torch.arange(lo, lo + n, device=positions.device)).all()):
        return x.narrow(dim, lo, n).clone()
    return x.index_select(dim, positions.to(x.device))


def _as_stream(x: Tensor) -> Tensor:
    """``[B, H, W, C]`` or ``[B, N, C]`` -> ``[B, N, C]``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# branches: where a block's additive parts are


class Branch:
    """A residual branch of a block; subclasses capture its output during the forward pass."""

    labels: list[ComponentLabel]
    path: str

    def attach(self, cap: Capture, positions: Tensor | None, tokens: bool) -> None:
        raise NotImplementedError

    def contributions(self, ro: Readout) -> Tensor:
        """``[B, len(labels), D_out]``."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop captured tensors."""


class FieldBranch(Branch):
    """A branch whose whole output is one component (MLP, conv block, init).

    ``where="output"`` captures the module's output, ``"input"`` its first input; ``to_stream``
    turns it into ``[B, N, D]`` stream order.
    """

    def __init__(
        self,
        module: nn.Module,
        label: ComponentLabel,
        path: str,
        where: str = "output",
        to_stream: Callable[[Tensor], Tensor] = _as_stream,
    ) -> None:
        self.module, self.labels, self.path, self.where, self.to_stream = module, [label], path, where, to_stream
        self.value: Tensor | None = None

    def attach(self, cap: Capture, positions: Tensor | None, tokens: bool) -> None:
        def keep(t: Tensor) -> None:
            s = self.to_stream(t)
            self.value = take_positions(s, positions)

        (cap.on_output if self.where == "output" else cap.on_input)(self.module, keep)

    def contributions(self, ro: Readout) -> Tensor:
        if self.value is None:
            raise VitDecompError(f"module '{self.path}' was not called in the forward pass")
        return ro.field(self.value)[:, None]

    def release(self) -> None:
        self.value = None


class AttentionBranch(Branch):
    """Multi-head attention whose output is ``sum_h W_O[:, h] z_h + b_O`` (times a layer scale).

    Subclasses fill ``self.z [B, S, H*dh]`` (stream order, readout positions) and, for tokens,
    implement :meth:`token_parts`.
    """

    def __init__(
        self,
        path: str,
        proj_weight: Tensor,
        proj_bias: Tensor | None,
        num_heads: int,
        base: dict,
        heads: bool = True,
        layer_scale: Tensor | None = None,
    ) -> None:
        self.path = path
        self.proj_weight, self.proj_bias, self.num_heads = proj_weight, proj_bias, num_heads
        self.layer_scale = layer_scale
        self.heads = heads
        if heads:
            self.labels = [ComponentLabel("attn_head", head=h, **base) for h in range(num_heads)]
            if proj_bias is not None:
                self.labels.append(ComponentLabel("attn_bias", **base))
        else:
            self.labels = [ComponentLabel("attn", **base)]
        self.head_labels = [ComponentLabel("attn_head", head=h, **base) for h in range(num_heads)]
        self.z: Tensor | None = None
        self.want_tokens = False

    def out_weight(self, like: Tensor) -> Tensor:
        """``[D_s, H, dh]``: the output projection with the layer scale folded in."""
        w = self.proj_weight.to(like)
        if self.layer_scale is not None:
            w = self.layer_scale.to(like)[:, None] * w
        return w.view(w.shape[0], self.num_heads, -1)

    def out_bias(self, like: Tensor) -> Tensor | None:
        if self.proj_bias is None:
            return None
        b = self.proj_bias.to(like)
        return b * self.layer_scale.to(like) if self.layer_scale is not None else b

    def contributions(self, ro: Readout) -> Tensor:
        if self.z is None:
            raise VitDecompError(f"attention '{self.path}' was not called in the forward pass")
        w = self.out_weight(ro.mats)  # [D, H, e]
        pz = ro.pool(self.z).view(self.z.shape[0], ro.num_slots, self.num_heads, -1)  # [B, K, H, e]
        u = torch.einsum("dhe,bkhe->bkhd", w, pz)
        bias = self.out_bias(ro.mats)
        if not self.heads:
            out = ro.apply_pooled(u.sum(2))
            if bias is not None:
                out = out + ro.const(bias)
            return out[:, None]
        parts = [ro.apply_pooled(u.transpose(1, 2))]
        if bias is not None:
            parts.append(ro.const(bias)[:, None])
        return torch.cat(parts, 1)

    def token_parts_size(self) -> int:
        """Number of source tokens ``N`` (after the pass)."""
        return self.v.shape[2]

    def token_parts(self, ro: Readout) -> tuple[Tensor, Tensor]:
        """``(abar [B, H, K, N], v [B, H, N, dh])`` with ``abar[b,h,k,j] = sum_q w_q A[q,j]`` over
        readout positions ``q`` in slot ``k``; keys ``j`` in stream order."""
        raise NotImplementedError(f"per-token contributions are not available for '{self.path}'")

    def token_contributions(self, ro: Readout, out: Tensor) -> None:
        """Write ``[B, H, N, D_out]`` into ``out``; summing over ``N`` gives each head's contribution."""
        abar, v = self.token_parts(ro)
        w = self.out_weight(ro.mats)
        v = v.to(w)
        for k in range(ro.num_slots):
            mw = torch.einsum("od,dhe->hoe", ro.mats[k], w)  # [H, D_out, e]
            part = torch.einsum("hoe,bhne->bhno", mw, v).mul_(abar[:, :, k, :, None])
            if k == 0:
                out.copy_(part)
            else:
                out.add_(part)

    def release(self) -> None:
        self.z = None


class GlobalAttention(AttentionBranch):
    """timm ``Attention`` (and relatives with ``qkv``/``attn_drop``/``proj``): every token attends to all.

    ``z`` is the input of ``proj``; for tokens, fused attention is switched off for the pass and the
    probabilities are read at ``attn_drop``.
    """

    def __init__(self, module: nn.Module, path: str, base: dict, heads: bool, layer_scale: Tensor | None):
        super().__init__(path, module.proj.weight, module.proj.bias, module.num_heads, base, heads, layer_scale)
        self.module = module
        self.probs: Tensor | None = None
        self.v: Tensor | None = None

    def attach(self, cap: Capture, positions: Tensor | None, tokens: bool) -> None:
        m = self.module
        self.want_tokens = tokens

        def keep_z(t: Tensor) -> None:
            self.z = take_positions(t, positions)

        cap.on_input(m.proj, keep_z)
        if tokens:
            cap.set_attr(m, "fused_attn", False)

            def keep_probs(a: Tensor) -> None:
                self.probs = take_positions(a, positions, dim=2)

            def keep_v(qkv: Tensor) -> None:
                b, n, _ = qkv.shape
                self.v = qkv.reshape(b, n, 3, self.num_heads, -1)[:, :, 2].transpose(1, 2).contiguous()

            cap.on_output(m.attn_drop, keep_probs)
            cap.on_output(m.qkv, keep_v)

    def token_parts(self, ro: Readout) -> tuple[Tensor, Tensor]:
        probs = self.probs.to(ro.weight)  # [B, H, S, N]
        if ro.slot is None:
            abar = torch.einsum("bs,bhsn->bhn", ro.weight, probs)[:, :, None]
        else:
            onehot = torch.nn.functional.one_hot(ro.slot, ro.num_slots).to(ro.weight)  # [S, K]
            abar = torch.einsum("bs,sk,bhsn->bhkn", ro.weight, onehot, probs)
        return abar, self.v

    def release(self) -> None:
        super().release()
        self.probs = self.v = None


class WindowedAttention(AttentionBranch):
    """Attention inside windows (Swin, MaxViT block/grid): tensors arrive as ``[B*nW, w, ...]``.

    ``window_index(grid) -> [nW, w]`` gives, for the stream grid ``(H, W)`` seen at ``grid_module``'s
    input, the stream position of every window slot (``-1`` for padding), computed with the model's
    own partition ops on an index grid. Window tensors may also arrive as ``[B*nW, wh, ww, E]``.
    Optional layout hooks for other attention modules: ``z_of(proj_input) -> [B*nW, w, E]`` (e.g. from
    NCHW windows) and ``v_of(qkv_output) -> [B*nW, w, H*dh]`` (values, head-major channels); the
    defaults fit timm's ``qkv -> [B*nW, w, 3, H, dh]`` layout.
    """

    def __init__(
        self,
        module: nn.Module,
        path: str,
        base: dict,
        heads: bool,
        layer_scale: Tensor | None,
        grid_module: nn.Module,
        grid_of: Callable[[Tensor], tuple[int, int]],
        window_index: Callable[[tuple[int, int]], Tensor],
        z_of: Callable[[Tensor], Tensor] | None = None,
        v_of: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__(path, module.proj.weight, module.proj.bias, module.num_heads, base, heads, layer_scale)
        self.module, self.grid_module, self.grid_of, self.window_index = module, grid_module, grid_of, window_index
        self.z_of, self.v_of = z_of, v_of
        self.index: Tensor | None = None  # [nW, w]
        self.probs_w: Tensor | None = None  # [B, nW, H, w, w]
        self.v: Tensor | None = None  # [B, H, N, dh] stream order
        self.n_tokens = 0

    def _to_stream(self, t: Tensor) -> Tensor:
        """``[B*nW, w, E] -> [B, N, E]`` (padding dropped)."""
        idx = self.index
        nw, w = idx.shape
        t = t.reshape(-1, nw * w, t.shape[-1])
        flat = idx.reshape(-1).to(t.device)
        keep = flat >= 0
        out = t.new_zeros(t.shape[0], self.n_tokens, t.shape[-1])
        out[:, flat[keep]] = t[:, keep]
        return out

    def attach(self, cap: Capture, positions: Tensor | None, tokens: bool) -> None:
        if positions is not None:
            raise VitDecompError("windowed attention needs the readout at every position")
        m = self.module
        self.want_tokens = tokens

        def keep_grid(x: Tensor) -> None:
            grid = self.grid_of(x)
            self.n_tokens = grid[0] * grid[1]
            self.index = self.window_index(grid)

        cap.on_input(self.grid_module, keep_grid)
        cap.on_input(m.proj, lambda t: setattr(self, "z", self._to_stream(self.z_of(t) if self.z_of else t)))
        if tokens:
            cap.set_attr(m, "fused_attn", False)

            def keep_probs(a: Tensor) -> None:
                nw = self.index.shape[0]
                self.probs_w = a.reshape(-1, nw, *a.shape[1:])

            def keep_v(qkv: Tensor) -> None:
                if self.v_of is not None:
                    v = self.v_of(qkv)
                else:
                    bw, w = qkv.shape[0], qkv.shape[1]
                    v = qkv.reshape(bw, w, 3, self.num_heads, -1)[:, :, 2].reshape(bw, w, -1)
                self.v = self._to_stream(v).view(-1, self.n_tokens, self.num_heads, v.shape[-1] // self.num_heads)
                self.v = self.v.transpose(1, 2)

            cap.on_output(m.attn_drop, keep_probs)
            cap.on_output(m.qkv, keep_v)

    def token_parts(self, ro: Readout) -> tuple[Tensor, Tensor]:
        idx = self.index.to(ro.weight.device)
        if (idx < 0).any():
            raise VitDecompError(
                f"per-token contributions of '{self.path}' with padded windows are not supported; "
                "use an image size whose token grid is a multiple of the window size"
            )
        probs = self.probs_w.to(ro.weight)  # [B, nW, H, w, w]
        wq = ro.weight[:, idx]  # [B, nW, w]
        if ro.slot is None:
            ab = torch.einsum("bnq,bnhqk->bhnk", wq, probs)[:, :, None]  # [B, H, 1, nW, w]
        else:
            onehot = torch.nn.functional.one_hot(ro.slot[idx], ro.num_slots).to(wq)  # [nW, w, K]
            ab = torch.einsum("bnq,nqc,bnhqk->bhcnk", wq, onehot, probs)
        b, h, k = ab.shape[:3]
        abar = ab.new_zeros(b, h, k, self.n_tokens)
        abar[..., idx.reshape(-1)] = ab.reshape(b, h, k, -1)
        return abar, self.v

    def release(self) -> None:
        super().release()
        self.probs_w = self.v = None


class ComputedAttention(AttentionBranch):
    """Attention whose probabilities are recomputed from its captured input (``nn.MultiheadAttention``,
    which never exposes per-head outputs). ``compute(args, kwargs, positions) -> (z, probs, v)``."""

    def __init__(
        self,
        module: nn.Module,
        path: str,
        base: dict,
        heads: bool,
        layer_scale: Tensor | None,
        proj_weight: Tensor,
        proj_bias: Tensor | None,
        num_heads: int,
        compute: Callable[[tuple, dict, Tensor | None, bool], tuple[Tensor, Tensor | None, Tensor | None]],
    ):
        super().__init__(path, proj_weight, proj_bias, num_heads, base, heads, layer_scale)
        self.module, self.compute = module, compute
        self.probs: Tensor | None = None
        self.v: Tensor | None = None

    def attach(self, cap: Capture, positions: Tensor | None, tokens: bool) -> None:
        self.want_tokens = tokens

        def run(args: tuple, kwargs: dict) -> None:
            self.z, self.probs, self.v = self.compute(args, kwargs, positions, tokens)

        cap.on_call(self.module, run)

    token_parts = GlobalAttention.token_parts

    def release(self) -> None:
        super().release()
        self.probs = self.v = None


# ---------------------------------------------------------------------------------------------
# transitions between stages


class Transition:
    """A linear map (with frozen statistics) from one stage's stream to the next one's."""

    path: str
    labels: list[ComponentLabel]

    def attach(self, cap: Capture) -> None:
        raise NotImplementedError

    def pull_back(self, ro: Readout) -> tuple[Readout, list[tuple[ComponentLabel, Tensor]]]:
        """The previous stage's readout, and the constants this transition adds ``(label, [B, D_out])``."""
        raise NotImplementedError


class MergeTransition(Transition):
    """Swin patch merging: ``out[t] = W (norm(concat_k x[j(t,k)]))`` with a frozen norm.

    ``merge_index(grid) -> [N_out, K]`` gives source positions (``-1`` padding) per output token and
    input slot, ``norm_input`` is captured at ``norm``'s input (the concatenated ``[B, N_out, K*C]``).
    """

    def __init__(
        self,
        path: str,
        norm: nn.Module,
        reduction: nn.Linear,
        grid_module: nn.Module,
        grid_of: Callable[[Tensor], tuple[int, int]],
        merge_index: Callable[[tuple[int, int]], Tensor],
        label: ComponentLabel,
    ) -> None:
        self.path, self.norm_module, self.reduction = path, norm, reduction
        self.norm = NormRule.of(norm, f"{path}.norm")
        self.grid_module, self.grid_of, self.merge_index = grid_module, grid_of, merge_index
        self.labels = [label]
        self.inv_sigma: Tensor | None = None
        self.index: Tensor | None = None
        self.n_in = 0

    def attach(self, cap: Capture) -> None:
        def keep_grid(x: Tensor) -> None:
            grid = self.grid_of(x)
            self.n_in = grid[0] * grid[1]
            self.index = self.merge_index(grid)

        cap.on_input(self.grid_module, keep_grid)
        cap.on_input(self.norm_module, lambda u: setattr(self, "inv_sigma", self.norm.inv_sigma(_as_stream(u))))

    def pull_back(self, ro: Readout) -> tuple[Readout, list[tuple[ComponentLabel, Tensor]]]:
        if ro.positions is not None:
            raise VitDecompError("patch merging needs the readout at every position")
        idx = self.index.to(ro.weight.device)  # [N_out, K]
        n_out, k_in = idx.shape
        w_red = self.reduction.weight.to(ro.mats)  # [D_next, K*C]
        dim_cat = w_red.shape[1]
        c = dim_cat // k_in
        m = self.norm.right(w_red)  # [D_next, K*C]
        m = m.view(m.shape[0], k_in, c).transpose(0, 1)  # [K_in, D_next, C]
        mats = torch.einsum("aod,kdc->akoc", ro.mats, m).reshape(-1, ro.mats.shape[1], c)  # [K*K_in, D_out, C]
        wt = ro.weight * self.inv_sigma.to(ro.weight)  # [B, N_out]
        slot_out = ro.slot if ro.slot is not None else torch.zeros(n_out, dtype=torch.long, device=idx.device)
        flat = idx.reshape(-1)
        keep = flat >= 0
        weight = wt.new_zeros(wt.shape[0], self.n_in)
        weight[:, flat[keep]] = wt.repeat_interleave(k_in, 1)[:, keep]
        slot = torch.zeros(self.n_in, dtype=torch.long, device=idx.device)
        slot[flat[keep]] = (slot_out[:, None] * k_in + torch.arange(k_in, device=idx.device)).reshape(-1)[keep]
        consts = []
        beta = self.norm.bias
        const = None
        if beta is not None:
            const = beta.to(ro.mats) @ w_red.T
        if self.reduction.bias is not None:
            const = self.reduction.bias.to(ro.mats) + (0 if const is None else const)
        if const is not None:
            consts.append((self.labels[0], ro.const(const)))
        return Readout(weight, mats, None, slot), consts


class PoolTransition(Transition):
    """Average pooling then a linear/1x1-conv map (MaxViT's downsampling shortcut).

    ``pool_matrix(grid) -> [N_out, N_in]`` (dense, or sparse COO made during the pass) is the pooling as a
    matrix (computed by running the model's own pooling module on one-hot maps); ``weight [D_out, D_in]``,
    ``bias [D_out]``.
    """

    def __init__(
        self,
        path: str,
        grid_module: nn.Module,
        grid_of: Callable[[Tensor], tuple[int, int]],
        pool_matrix: Callable[[tuple[int, int]], Tensor],
        weight: Tensor | None,
        bias: Tensor | None,
        label: ComponentLabel,
    ) -> None:
        self.path, self.grid_module, self.grid_of, self.pool_matrix = path, grid_module, grid_of, pool_matrix
        self.weight, self.bias = weight, bias
        self.labels = [label]
        self.matrix: Tensor | None = None

    def attach(self, cap: Capture) -> None:
        cap.on_input(self.grid_module, lambda x: setattr(self, "matrix", self.pool_matrix(self.grid_of(x))))

    def pull_back(self, ro: Readout) -> tuple[Readout, list[tuple[ComponentLabel, Tensor]]]:
        if ro.positions is not None or ro.slot is not None:
            raise VitDecompError(f"'{self.path}': pooling transition needs a slot-free full readout")
        p = self.matrix.to(ro.weight)  # [N_out, N_in], dense or sparse COO (made inside the pass)
        weight = torch.mm(p.t(), ro.weight.t()).t()
        mats = ro.mats if self.weight is None else torch.einsum("kod,di->koi", ro.mats, self.weight.to(ro.mats))
        consts = [] if self.bias is None else [(self.labels[0], ro.const(self.bias))]
        return Readout(weight, mats), consts


# ---------------------------------------------------------------------------------------------
# the plan an adapter makes


@dataclass
class Block:
    """A block: its branches in order. ``module`` is checked: R(out) - R(in) == sum of branches."""

    path: str
    module: nn.Module
    layer: int
    branches: list[Branch]
    stage: int = 0
    transition: Transition | None = None  # a transition that happens inside this block (MaxViT)
    stream_in: Callable[[Tensor], Tensor] = _as_stream
    stream_out: Callable[[Tensor], Tensor] = _as_stream


@dataclass
class Stage:
    """Blocks sharing one token grid. ``transition`` maps the previous stage's stream into this one."""

    index: int
    blocks: list[Block]
    transition: Transition | None = None
    patch: tuple[int, int] = (1, 1)  # pixels per token (stride) on this stage's grid
    num_prefix_tokens: int = 0
    grid: tuple[int, int] | None = None  # filled during the pass


@dataclass
class Plan:
    """What an adapter says about a model for one decomposition call.

    ``init``: the stream at the start of block ``start_layer`` (or the final stream when
    ``start_layer == num_blocks``), as a field branch on stage ``init_stage``.
    ``readout(positions)``: after the pass, the last stage's readout, its constants, and the model's
    own representation ``[B, D_out]``. ``positions``: stream positions the readout reads (None: all).
    """

    stages: list[Stage]
    init: FieldBranch
    init_stage: int
    positions: Tensor | None
    run: Callable[[Tensor], Tensor]
    readout: Callable[[], tuple[Readout, list[tuple[ComponentLabel, Tensor]], Tensor]]
    attach_readout: Callable[[Capture], None]
    family: str
    grid_of_stage: Callable[[int], tuple[int, int]] | None = None
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the public entry point


def _tokens_wanted(tokens: bool | Iterable[int], layer: int) -> bool:
    if isinstance(tokens, bool):
        return tokens
    return layer in set(tokens)


@contextlib.contextmanager
def _captured(
    plan: Plan, tokens: bool | Iterable[int], target: nn.Module, streams: dict | None = None
) -> Iterator[Capture]:
    """Attach every hook of ``plan`` (and, with ``streams``, each block's input/output stream)."""
    cap = Capture()
    was_training = target.training
    target.eval()
    cap.restore.append(lambda: target.train(was_training))
    try:
        last = len(plan.stages) - 1
        for stage in plan.stages:
            if stage.index < plan.init_stage:
                continue
            if stage.transition is not None and stage.index > plan.init_stage:
                stage.transition.attach(cap)
            positions = plan.positions if stage.index == last else None
            for block in stage.blocks:
                if block.transition is not None and stage.index > plan.init_stage:
                    block.transition.attach(cap)
                for br in block.branches:
                    br.attach(cap, positions, _tokens_wanted(tokens, block.layer) and isinstance(br, AttentionBranch))
                if streams is not None:
                    pos_in = None if block.transition is not None else positions

                    def keep(key, fn, pos):
                        return lambda x: streams.__setitem__(key, take_positions(fn(x), pos))

                    cap.on_input(block.module, keep((block.path, "in"), block.stream_in, pos_in))
                    cap.on_output(block.module, keep((block.path, "out"), block.stream_out, positions))
        init_positions = plan.positions if plan.init_stage == last else None
        plan.init.attach(cap, init_positions, False)
        plan.attach_readout(cap)
        yield cap
    finally:
        cap.close()


def decompose(
    model: nn.Module | object,
    images: Tensor,
    *,
    heads: bool = True,
    tokens: bool | Sequence[int] = False,
    start_layer: int = 0,
    representation: str | None = None,
    check: float | None = None,
) -> Decomposition:
    """Split ``model``'s representation of ``images [B, 3, H, W]`` into additive components.

    ``model``: what :func:`vitdecomp.load_model` returns, or a timm / open_clip model object.
    ``heads``: one component per attention head (else one per attention layer).
    ``tokens``: also split head contributions over source tokens (``True`` or a list of layer indices).
    ``start_layer``: blocks before it are folded into ``init``.
    ``representation``: which output to decompose (adapter-specific; ``None`` = the paper's).
    ``check``: raise if the relative completeness error of any image exceeds it
    (default: 1e-4 for float32, 1e-9 for float64; ``0`` disables).
    """
    from vitdecomp.models.registry import adapter_for

    module = getattr(model, "model", model)
    adapter, target = adapter_for(module)
    plan = adapter.plan(target, start_layer=start_layer, representation=representation, heads=heads)
    param = next(target.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    with torch.inference_mode(), _captured(plan, tokens, target):
        plan.run(images)
    with torch.inference_mode():
        result = _assemble(plan, images.shape[0])
    if check is None:
        check = 1e-9 if result.representation.dtype == torch.float64 else 1e-4
    if check > 0:
        err = result.error.max().item()
        if not err <= check:
            where = _first_failing_block(adapter, target, images, start_layer, representation, heads, check)
            raise VitDecompError(
                f"the parts do not add up: relative error {err:.2e} > {check:.0e} for {adapter.family} "
                f"model {type(target).__name__}{where}. This model has a module the rules do not cover; "
                "please report it."
            )
    return result


def _first_failing_block(adapter, target, images, start_layer, representation, heads, tol) -> str:
    """Re-run with each block's input and output captured; name the first block whose parts do not
    add up to ``R(out) - R(in)`` (``R`` the frozen-statistics readout)."""
    plan = adapter.plan(target, start_layer=start_layer, representation=representation, heads=heads)
    streams: dict = {}
    with torch.inference_mode(), _captured(plan, False, target, streams):
        plan.run(images)
    with torch.inference_mode():
        result = _assemble(plan, images.shape[0], streams)
    for path, residual in result.meta["block_residuals"].items():
        if residual > tol:
            block = dict(target.named_modules())[path]
            return (
                f" (first mismatch: block '{path}' of class {type(block).__name__}, relative residual {residual:.1e})"
            )
    return ""


def _assemble(plan: Plan, batch: int, streams: dict | None = None) -> Decomposition:
    """Read every captured part out; with ``streams`` also each block's residual
    ``|R(out) - R(in) - sum of its parts| / |representation|`` into ``meta["block_residuals"]``."""
    ro, consts, rep = plan.readout()
    residuals: dict[str, float] = {}
    per_stage: dict[int, Readout] = {}
    trans_consts: list[tuple[ComponentLabel, Tensor]] = []
    parts: list[tuple[list[ComponentLabel], Tensor]] = []
    token_stacks: list[TokenContributions] = []
    for stage in reversed(plan.stages):
        if stage.index < plan.init_stage:
            break
        per_stage[stage.index] = ro
        block_parts: list[list[tuple[list[ComponentLabel], Tensor]]] = []
        token_branches = [
            br
            for block in stage.blocks
            for br in block.branches
            if isinstance(br, AttentionBranch) and br.want_tokens and br.heads
        ]
        token_values: Tensor | None = None  # [B, heads of this stage, N, D_out], filled from the end
        end = sum(br.num_heads for br in token_branches)
        for block in reversed(stage.blocks):
            block_ro = ro
            if block.transition is not None and stage.index > plan.init_stage:
                ro, c = block.transition.pull_back(ro)
                trans_consts = c + trans_consts
            here = []
            for br in reversed(block.branches):
                here.insert(0, (br.labels, br.contributions(block_ro)))
                if br in token_branches:
                    if token_values is None:
                        n = br.token_parts_size()
                        token_values = rep.new_empty(batch, end, n, rep.shape[-1])
                    br.token_contributions(block_ro, token_values[:, end - br.num_heads : end])
                    end -= br.num_heads
                br.release()
            block_parts.insert(0, here)
            if streams is not None:
                own = sum(t.sum(1) for _, t in here) + (sum(t for _, t in c) if block.transition else 0)
                gap = block_ro.field(streams[(block.path, "out")]) - ro.field(streams[(block.path, "in")]) - own
                residuals[block.path] = (gap.norm(dim=-1) / rep.norm(dim=-1).clamp_min(1e-30)).max().item()
        parts = [p for bp in block_parts for p in bp] + parts
        if token_values is not None:
            labels = [lab for br in token_branches for lab in br.head_labels]
            grid = plan.grid_of_stage(stage.index) if plan.grid_of_stage else None
            token_stacks.insert(0, _token_stack(token_values, labels, stage, grid))
        if stage.transition is not None and stage.index > plan.init_stage:
            ro, c = stage.transition.pull_back(ro)
            trans_consts = c + trans_consts
    init_ro = per_stage[plan.init_stage]
    parts.insert(0, (plan.init.labels, plan.init.contributions(init_ro)))
    plan.init.release()
    for label, c in trans_consts + consts:
        parts.append(([label], c[:, None]))
    labels = [lab for labs, _ in parts for lab in labs]
    contributions = torch.cat([t.to(rep.dtype) for _, t in parts], 1)
    return Decomposition(
        contributions=contributions,
        labels=labels,
        representation=rep,
        tokens=token_stacks,
        meta={"family": plan.family, **plan.meta, **({"block_residuals": residuals} if streams else {})},
    )


def _token_stack(
    values: Tensor, labels: list[ComponentLabel], stage: Stage, grid: tuple[int, int] | None
) -> TokenContributions:
    n = values.shape[2]
    grid = grid or stage.grid or (1, n - stage.num_prefix_tokens)
    if grid[0] * grid[1] + stage.num_prefix_tokens != n:
        raise VitDecompError(
            f"stage {stage.index}: a {grid[0]}x{grid[1]} token grid plus {stage.num_prefix_tokens} prefix tokens "
            f"does not match the {n} tokens of the stream (wrong patch stride in the adapter)"
        )
    boxes = pixel_boxes(grid, stage.patch, stage.num_prefix_tokens)
    return TokenContributions(values, labels, boxes, grid, stage.num_prefix_tokens)


def pixel_boxes(grid: tuple[int, int], patch: tuple[int, int], num_prefix: int = 0) -> Tensor:
    """``[num_prefix + gh*gw, 4]`` (top, left, bottom, right) in input pixels; ``-1`` for prefix tokens."""
    gh, gw = grid
    r = torch.arange(gh).repeat_interleave(gw)
    c = torch.arange(gw).repeat(gh)
    boxes = torch.stack([r * patch[0], c * patch[1], (r + 1) * patch[0], (c + 1) * patch[1]], 1)
    prefix = torch.full((num_prefix, 4), -1, dtype=boxes.dtype)
    return torch.cat([prefix, boxes], 0)
