"""timm ``SwinTransformer`` (v1) and ``SwinTransformerV2``.

Stream per stage: ``[B, H_s, W_s, C_s]`` (NHWC), read as ``[B, H_s*W_s, C_s]`` in row-major order.
Each block adds windowed attention (shifted every other block: the shift and the window partition are
undone by mapping window slots to stream positions with timm's own ``window_partition`` on an index
grid) and an MLP. Between stages ``PatchMerging`` concatenates 2x2 neighbours, normalises and reduces
(v1: norm then reduction; V2: reduction then norm), a linear map with frozen statistics whose four
input slots each get their own readout matrix; its constants are ``transition_bias``.

V2 blocks are residual post-norm: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``. With ``norm1``'s
statistics frozen the branch is still linear per head (``norm1``'s gain and centring fold into the
output projection, ``1/sigma`` per token into the head outputs, its beta into ``attn_bias``); the MLP
component is read at ``norm2``'s output. Scaled cosine attention and the continuous position bias
only shape the (frozen) probabilities.

Representations: ``"pre_logits"`` (final norm + average pool, the default) and ``"logits"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models import swin_transformer as v1
from timm.models import swin_transformer_v2 as v2
from timm.models import swin_transformer_v2_cr as cr
from torch import Tensor, nn

from vitdecomp.decomp.plan import (
    Block,
    Field,
    Layout,
    Linear,
    Merge,
    Plan,
    Pool,
    Readout,
    Stage,
    StreamNorm,
    Tap,
    TokenNorm,
    Windows,
)
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import check_plan_args, is_norm, patch_stride, qkv_attention

REPRESENTATIONS = ("pre_logits", "logits")


def swin_window_index(block: nn.Module):
    """``grid -> [nW, window_area]`` stream positions of each window slot (``-1`` = padding)."""

    def index(grid: tuple[int, int]) -> Tensor:
        h, w = grid
        idx = torch.arange(h * w).view(1, h, w, 1)
        if any(block.shift_size):
            idx = torch.roll(idx, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
        pad_h = (block.window_size[0] - h % block.window_size[0]) % block.window_size[0]
        pad_w = (block.window_size[1] - w % block.window_size[1]) % block.window_size[1]
        idx = F.pad(idx, (0, 0, 0, pad_w, 0, pad_h), value=-1)
        return v1.window_partition(idx, block.window_size).reshape(-1, block.window_size[0] * block.window_size[1])

    return index


def merge_index(grid: tuple[int, int]) -> Tensor:
    """``[N_out, 4]``: source stream positions of each merged token's four input slots (timm's order)."""
    h, w = grid
    idx = F.pad(torch.arange(h * w).view(1, h, w, 1), (0, 0, 0, w % 2, 0, h % 2), value=-1)
    hp, wp = idx.shape[1], idx.shape[2]
    return idx.reshape(1, hp // 2, 2, wp // 2, 2, 1).permute(0, 1, 3, 4, 2, 5).reshape(-1, 4)


@dataclass(frozen=True)
class _Kind:
    """What differs between the Swin versions: the classes, where the stages are and how they are laid out."""

    stage: type
    block: type
    attn: type
    merge: type
    norm_after: bool  # patch merging: the norm after the reduction (V2) or before it
    post_norm: bool  # residual post-norm blocks: x + norm1(attn(x)), x + norm2(mlp(x))
    stages: str = "layers"  # the model's attribute holding the stages
    stage_layout: Layout = "tokens"  # a stage's output: NHWC, or NCHW (V2-CR)


_KINDS = {
    "v1": _Kind(v1.SwinTransformerStage, v1.SwinTransformerBlock, v1.WindowAttention, v1.PatchMerging, False, False),
    "v2": _Kind(v2.SwinTransformerV2Stage, v2.SwinTransformerV2Block, v2.WindowAttention, v2.PatchMerging, True, True),
    "v2cr": _Kind(
        cr.SwinTransformerV2CrStage,
        cr.SwinTransformerV2CrBlock,
        cr.WindowMultiHeadAttention,
        cr.PatchMerging,
        False,
        True,
        "stages",
        "nchw",
    ),
}


class SwinAdapter:
    family = "timm-swin"
    version = "v1"

    def plan(self, model: nn.Module, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        head = model.head
        if head.global_pool.pool_type != "avg":
            raise UnsupportedModuleError("head.global_pool", head.global_pool, "only average pooling is linear")
        depth = sum(len(s.blocks) for s in getattr(model, _KINDS[self.version].stages))
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, depth)
        stream, steps = self.final_stream(model)
        steps = [*steps, Pool()]
        if representation == "logits":
            if not isinstance(head.fc, nn.Linear):
                raise UnsupportedModuleError("head.fc", head.fc, "logits need a linear head")
            steps.append(Linear(head.fc.weight, head.fc.bias))
        output = Tap(head) if representation == "logits" else Tap(head.global_pool)
        readout = Readout(stream, steps, output, output_fn=lambda t: t.flatten(1))
        stages, init, init_stage = self._stages(model, start_layer, stream)
        meta = {"representation": representation, "start_layer": start_layer, "num_blocks": depth}
        return Plan(self.family, stages, init, init_stage, readout, model, meta)

    def final_stream(self, model: nn.Module) -> tuple[Tap, list]:
        """Where the final stream is and the per-token steps on it before the pooling (the final norm)."""
        return Tap(model.norm, "input"), [TokenNorm(model.norm)]

    def _stages(self, model: nn.Module, start_layer: int, final: Tap) -> tuple[list[Stage], Field, int]:
        kind = _KINDS[self.version]
        stages, layer, patch0 = [], 0, patch_stride(model.patch_embed)
        model_stages = getattr(model, kind.stages)
        init, init_stage = Field(final, "init", "init"), len(model_stages) - 1
        for s, st in enumerate(model_stages):
            spath = f"{kind.stages}.{s}"
            if type(st) is not kind.stage:
                raise UnsupportedModuleError(spath, st, f"only timm's {kind.stage.__name__}")
            blocks = []
            for b, blk in enumerate(st.blocks):
                path = f"{spath}.blocks.{b}"
                if type(blk) is not kind.block or type(blk.attn) is not kind.attn:
                    raise UnsupportedModuleError(
                        path, blk, f"only timm's {kind.block.__name__} with {kind.attn.__name__}"
                    )
                if layer == start_layer:
                    init, init_stage = Field(Tap(blk, "input"), "init", "init"), s
                if layer >= start_layer:
                    blocks.append(self._block(blk, path, layer, s, b, kind.post_norm))
                layer += 1
            scale = 2**s
            stages.append(
                Stage(
                    s,
                    blocks,
                    grid=Tap(st, "output", kind.stage_layout),
                    patch=(patch0[0] * scale, patch0[1] * scale),
                    transition=_merge(st.downsample, f"{spath}.downsample", s, kind.merge, kind.norm_after),
                )
            )
        return stages, init, init_stage

    @staticmethod
    def _block(blk: nn.Module, path: str, layer: int, s: int, b: int, post_norm: bool) -> Block:
        windows = Windows(Tap(blk, "input"), swin_window_index(blk))
        attn = qkv_attention(
            blk.attn, f"{path}.attn", None, windows=windows, post_norm=blk.norm1 if post_norm else None
        )
        mlp = Field(Tap(blk.norm2 if post_norm else blk.mlp), f"{path}.mlp")
        norm3 = getattr(blk, "norm3", None)  # V2-CR's main-branch norm at the block's end
        after = StreamNorm(norm3) if norm3 is not None and is_norm(norm3) else None
        return Block(path, blk, layer, [attn, mlp], stage=s, block=b, after=after)


def _merge(ds: nn.Module, path: str, stage: int, merge_cls: type, norm_after: bool) -> Merge | None:
    if isinstance(ds, nn.Identity):
        return None
    if type(ds) is not merge_cls:
        raise UnsupportedModuleError(path, ds, "unknown downsampling")
    return Merge(path, ds.norm, ds.reduction, Tap(ds, "input"), merge_index, stage, norm_after)


class SwinV2Adapter(SwinAdapter):
    family = "timm-swin-v2"
    version = "v2"


class SwinV2CrAdapter(SwinAdapter):
    family = "timm-swin-v2-cr"
    version = "v2cr"

    def final_stream(self, model: nn.Module) -> tuple[Tap, list]:
        """The last stage's output: its last block ends with the final norm (a block's ``norm3``)."""
        return Tap(model.stages[-1], "output", "nchw"), []
