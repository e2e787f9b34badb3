"""Capture: the hooks and attribute patches of one forward pass, removed on success and on error."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from vitdecomp.decomp.plan import Layout, Tap


def to_stream(x: Tensor, layout: Layout) -> Tensor:
    """A tensor in ``layout`` as stream order ``[B, N, D]``."""
    if layout == "nchw":
        return x.flatten(2).transpose(1, 2)
    if layout == "seq_first":
        return x.transpose(0, 1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def grid_of(x: Tensor, layout: Layout) -> tuple[int, int]:
    """The spatial size ``(H, W)`` of an NHWC (``"tokens"``) or NCHW tensor."""
    return (x.shape[2], x.shape[3]) if layout == "nchw" else (x.shape[1], x.shape[2])


def item_of(out: object, item: int = 0) -> Tensor:
    """Element ``item`` of a tuple / list output (the output itself when it is a tensor)."""
    return out[item] if isinstance(out, (tuple, list)) else out


def take_positions(x: Tensor, positions: Tensor | None, dim: int = 1) -> Tensor:
    """``x`` restricted to stream ``positions`` along ``dim`` (a copy, so the full tensor can be freed)."""
    if positions is None:
        return x
    lo, n = int(positions[0]), len(positions)
    if bool((positions == torch.arange(lo, lo + n, device=positions.device)).all()):
        return x.narrow(dim, lo, n).clone()
    return x.index_select(dim, positions.to(x.device))


class Capture:
    """Hook handles and attribute patches of one forward pass; :meth:`close` undoes all of them."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.restore: list[Callable[[], None]] = []

    def tap(self, tap: Tap, fn: Callable[[Tensor], None]) -> None:
        """Call ``fn`` with the tensor ``tap`` names, as it is seen (layout untouched)."""
        i = tap.item
        if tap.where == "input":
            self.handles.append(tap.module.register_forward_pre_hook(lambda m, a: fn(a[i])))
        else:
            self.handles.append(tap.module.register_forward_hook(lambda m, a, out: fn(item_of(out, i))))

    def stream(self, tap: Tap, fn: Callable[[Tensor], None]) -> None:
        """Call ``fn`` with the tensor ``tap`` names in stream order ``[B, N, D]``."""
        self.tap(tap, lambda x: fn(to_stream(x, tap.layout)))

    def norm_stats(self, norm: nn.Module, inv_sigma: Callable[[Tensor], Tensor], fn: Callable[[Tensor], None]) -> None:
        """Call ``fn`` with ``1/sigma [B, N]`` of the token-layout input ``[B, ..., D]`` of ``norm``. A plain
        ``nn.LayerNorm`` on float32 / float64 hands over the statistics it computes anyway (its forward runs
        the same kernel for the pass, bit for bit, keeping them); otherwise ``inv_sigma(x [B, N, D])``."""

        def own(x: Tensor) -> None:
            fn(inv_sigma(to_stream(x, "tokens")))

        if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
            self.tap(Tap(norm, "input"), own)
            return

        def forward(x: Tensor) -> Tensor:
            args = (norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            if x.dtype not in (torch.float32, torch.float64):
                own(x)
                return nn.functional.layer_norm(x, *args)
            out, _, rstd = torch.native_layer_norm(x, *args)
            fn(rstd.reshape(x.shape[0], -1))
            return out

        self.set_attr(norm, "forward", forward)

    def set_attr(self, obj: object, name: str, value: object) -> None:
        """Set an attribute for the pass (e.g. ``fused_attn=False``, a replaced ``forward``), restored after."""
        had = name in vars(obj)
        old = vars(obj).get(name)
        object.__setattr__(obj, name, value) if isinstance(obj, nn.Module) else setattr(obj, name, value)

        def undo() -> None:
            if had:
                object.__setattr__(obj, name, old)
            else:
                object.__delattr__(obj, name)

        self.restore.append(undo)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for undo in reversed(self.restore):
            undo()
        self.handles.clear()
        self.restore.clear()
