"""timm ``SwinTransformer`` (v1).

Stream per stage: ``[B, H_s, W_s, C_s]`` (NHWC), read as ``[B, H_s*W_s, C_s]`` in row-major order.
Each ``SwinTransformerBlock`` adds ``attn`` (windowed, shifted every other block: the shift and the
window partition are undone by mapping window slots to stream positions with timm's own
``window_partition`` on an index grid) and ``mlp``. Between stages ``PatchMerging`` concatenates 2x2
neighbours, normalises (frozen statistics) and reduces: a linear map whose four input slots each
get their own matrix in the readout. Representations: ``"pre_logits"`` (final norm + average pool,
the default) and ``"logits"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
    window_partition,
)
from torch import Tensor, nn

from vitdecomp.components import ComponentLabel
from vitdecomp.decompose import (
    Block,
    Capture,
    FieldBranch,
    MergeTransition,
    NormRule,
    Plan,
    ReadoutBuilder,
    Stage,
    WindowedAttention,
    check_plan_args,
    pool_weights,
)
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models.vit import patch_stride

REPRESENTATIONS = ("pre_logits", "logits")


def nhwc_grid(x: Tensor) -> tuple[int, int]:
    return (x.shape[1], x.shape[2])


def swin_window_index(block: SwinTransformerBlock):
    """``grid -> [nW, window_area]`` stream positions of each window slot (``-1`` = padding)."""

    def index(grid: tuple[int, int]) -> Tensor:
        h, w = grid
        idx = torch.arange(h * w).view(1, h, w, 1)
        if any(block.shift_size):
            idx = torch.roll(idx, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
        pad_h = (block.window_size[0] - h % block.window_size[0]) % block.window_size[0]
        pad_w = (block.window_size[1] - w % block.window_size[1]) % block.window_size[1]
        idx = F.pad(idx, (0, 0, 0, pad_w, 0, pad_h), value=-1)
        return window_partition(idx, block.window_size).reshape(-1, block.window_area)

    return index


def merge_index(grid: tuple[int, int]) -> Tensor:
    """``[N_out, 4]``: source stream positions of each merged token's four input slots (timm's order)."""
    h, w = grid
    idx = F.pad(torch.arange(h * w).view(1, h, w, 1), (0, 0, 0, w % 2, 0, h % 2), value=-1)
    hp, wp = idx.shape[1], idx.shape[2]
    return idx.reshape(1, hp // 2, 2, wp // 2, 2, 1).permute(0, 1, 3, 4, 2, 5).reshape(-1, 4)


class SwinAdapter:
    family = "timm-swin"
    model_types = (SwinTransformer,)

    def plan(self, model: SwinTransformer, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        head = model.head
        if head.global_pool.pool_type != "avg":
            raise UnsupportedModuleError("head.global_pool", head.global_pool, "only average pooling is linear")
        if representation == "logits" and not isinstance(head.fc, nn.Linear):
            raise UnsupportedModuleError("head.fc", head.fc, "logits need a linear head")
        final_norm = NormRule.of(model.norm, "norm")
        depth = sum(len(s.blocks) for s in model.layers)
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, depth)

        stages: list[Stage] = []
        init: FieldBranch | None = None
        init_stage = len(model.layers) - 1
        layer = 0
        patch0 = patch_stride(model.patch_embed)
        for s, st in enumerate(model.layers):
            spath = f"layers.{s}"
            if type(st) is not SwinTransformerStage:
                raise UnsupportedModuleError(spath, st, "only timm's SwinTransformerStage")
            transition = None
            if isinstance(st.downsample, PatchMerging):
                ds = st.downsample
                transition = MergeTransition(
                    f"{spath}.downsample",
                    ds.norm,
                    ds.reduction,
                    ds,
                    nhwc_grid,
                    merge_index,
                    ComponentLabel("transition_bias", stage=s),
                )
            elif not isinstance(st.downsample, nn.Identity):
                raise UnsupportedModuleError(f"{spath}.downsample", st.downsample, "unknown downsampling")
            blocks = []
            for b, blk in enumerate(st.blocks):
                path = f"{spath}.blocks.{b}"
                if type(blk) is not SwinTransformerBlock:
                    raise UnsupportedModuleError(path, blk, "only timm's SwinTransformerBlock (v1)")
                if type(blk.attn) is not WindowAttention:
                    raise UnsupportedModuleError(f"{path}.attn", blk.attn, "only timm's WindowAttention")
                if layer == start_layer:
                    init = FieldBranch(blk, ComponentLabel("init"), "init", "input")
                    init_stage = s
                if layer >= start_layer:
                    base = {"layer": layer, "stage": s, "block": b}
                    attn = WindowedAttention(
                        blk.attn, f"{path}.attn", base, heads, None, blk, nhwc_grid, swin_window_index(blk)
                    )
                    mlp = FieldBranch(blk.mlp, ComponentLabel("mlp", **base), f"{path}.mlp")
                    blocks.append(Block(path, blk, layer, [attn, mlp], stage=s))
                layer += 1
            scale = 2**s
            stages.append(Stage(s, blocks, transition, patch=(patch0[0] * scale, patch0[1] * scale)))
        if init is None:
            init = FieldBranch(model.norm, ComponentLabel("init"), "init", "input")

        seen: dict[str, Tensor] = {}
        grids: dict[int, tuple[int, int]] = {}

        def attach_readout(cap: Capture) -> None:
            cap.on_input(model.norm, lambda x: seen.__setitem__("stream", x))
            cap.on_output(head.global_pool, lambda x: seen.__setitem__("pre_logits", x.flatten(1)))
            cap.on_output(head, lambda x: seen.__setitem__("logits", x))
            for s, st in enumerate(model.layers):
                cap.on_output(st, lambda x, s=s: grids.__setitem__(s, nhwc_grid(x)))

        def readout():
            x = seen["stream"].reshape(seen["stream"].shape[0], -1, seen["stream"].shape[-1])
            rb = ReadoutBuilder(pool_weights(x, None), x.shape[-1])
            rb.token_norm(x, final_norm, ComponentLabel("norm_bias"))
            if representation == "logits":
                rb.linear(head.fc.weight, head.fc.bias, ComponentLabel("head_bias"))
            ro, consts = rb.build()
            return ro, consts, seen[representation]

        return Plan(
            stages=stages,
            init=init,
            init_stage=init_stage,
            positions=None,
            run=model,
            readout=readout,
            attach_readout=attach_readout,
            family=self.family,
            grid_of_stage=lambda s: grids[s],
            meta={"representation": representation, "start_layer": start_layer, "num_blocks": depth},
        )
