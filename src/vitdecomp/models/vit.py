"""timm ``VisionTransformer`` (DeiT, DINO, DINOv2, DeiT-III, timm's CLIP ViTs, register tokens, layer scale).

Stream: ``[B, prefix + gh*gw, D]`` at the blocks. Each pre-norm ``Block`` adds
``ls1(attn(norm1(x)))`` (split per head at ``attn.proj``) and ``ls2(mlp(norm2(x)))``.
Representations: ``"pre_logits"`` (default: final norm, pool — class token or average — and
``fc_norm``, i.e. ``forward_head(pre_logits=True)``) and ``"logits"`` (through the linear head).
"""

from __future__ import annotations

import torch
from timm.layers import LayerScale
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from vitdecomp.components import ComponentLabel
from vitdecomp.decompose import (
    Block as PlanBlock,
)
from vitdecomp.decompose import (
    Capture,
    FieldBranch,
    GlobalAttention,
    NormRule,
    Plan,
    ReadoutBuilder,
    Stage,
    check_plan_args,
    pool_weights,
)
from vitdecomp.errors import UnsupportedModuleError

REPRESENTATIONS = ("pre_logits", "logits")


def layer_scale_of(module: nn.Module, path: str) -> Tensor | None:
    """The gamma of a layer-scale module (``None`` for Identity)."""
    if isinstance(module, nn.Identity):
        return None
    if hasattr(module, "gamma") and isinstance(module.gamma, Tensor) and module.gamma.ndim == 1:
        return module.gamma
    raise UnsupportedModuleError(path, module, "unknown layer-scale module")


def check_identity(module: nn.Module | None, path: str, why: str) -> None:
    if module is not None and not isinstance(module, nn.Identity):
        raise UnsupportedModuleError(path, module, why)


def norm_or_none(module: nn.Module, path: str) -> NormRule | None:
    return None if isinstance(module, nn.Identity) else NormRule.of(module, path)


class TimmViTAdapter:
    family = "timm-vit"
    model_types = (VisionTransformer,)

    def plan(self, model: VisionTransformer, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        if model.attn_pool is not None:
            raise UnsupportedModuleError("attn_pool", model.attn_pool, "attention-pool (MAP) heads have no rule yet")
        if model.global_pool not in ("token", "avg"):
            raise UnsupportedModuleError("", model, f"global_pool={model.global_pool!r} is not linear")
        depth = len(model.blocks)
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, depth)
        final_norm = norm_or_none(model.norm, "norm")
        fc_norm = norm_or_none(model.fc_norm, "fc_norm")
        if representation == "logits" and not isinstance(model.head, nn.Linear):
            raise UnsupportedModuleError("head", model.head, "logits need a linear head")

        blocks = []
        for i, blk in enumerate(model.blocks):
            path = f"blocks.{i}"
            if type(blk) is not Block:
                raise UnsupportedModuleError(path, blk, "only timm's pre-norm Block is supported")
            attn = blk.attn
            if type(attn) is not Attention:
                raise UnsupportedModuleError(f"{path}.attn", attn, "only timm's Attention is supported")
            check_identity(attn.norm, f"{path}.attn.norm", "a norm between attention and projection is not linear")
            if getattr(attn, "gate", None) is not None:
                raise UnsupportedModuleError(f"{path}.attn.gate", attn.gate, "gated attention is not linear")
            if i < start_layer:
                continue
            base = {"layer": i}
            branches = [
                GlobalAttention(attn, f"{path}.attn", base, heads, layer_scale_of(blk.ls1, f"{path}.ls1")),
                FieldBranch(blk.ls2, ComponentLabel("mlp", **base), f"{path}.mlp"),
            ]
            if not isinstance(blk.ls2, (nn.Identity, LayerScale)):
                layer_scale_of(blk.ls2, f"{path}.ls2")
            blocks.append(PlanBlock(path, blk, i, branches))

        npre = model.num_prefix_tokens
        patch = patch_stride(model.patch_embed)
        stage = Stage(0, blocks, patch=patch, num_prefix_tokens=npre)
        positions = torch.tensor([0]) if model.global_pool == "token" else None
        if start_layer < depth:
            init = FieldBranch(model.blocks[start_layer], ComponentLabel("init"), "init", where="input")
        else:
            init = FieldBranch(model.norm, ComponentLabel("init"), "init", where="input")

        seen: dict[str, Tensor] = {}

        def attach_readout(cap: Capture) -> None:
            cap.on_input(model.norm, lambda x: seen.__setitem__("stream", x if positions is None else x[:, positions]))
            cap.on_input(model.fc_norm, lambda x: seen.__setitem__("pooled", x))
            cap.on_output(model.fc_norm, lambda x: seen.__setitem__("pre_logits", x))
            cap.on_output(model.head, lambda x: seen.__setitem__("logits", x))
            cap.on_input(model.patch_embed, lambda x: seen.__setitem__("image", x.shape[-2:]))

        def readout():
            x = seen["stream"]
            d = x.shape[-1]
            weight = pool_weights(x, positions, 0 if model.pool_include_prefix else npre)
            rb = ReadoutBuilder(weight, d, positions.to(x.device) if positions is not None else None)
            if final_norm is not None:
                rb.token_norm(x, final_norm, ComponentLabel("norm_bias"))
            if fc_norm is not None:
                rb.vector_norm(seen["pooled"], fc_norm, ComponentLabel("fc_norm_bias"))
            if representation == "logits":
                rb.linear(model.head.weight, model.head.bias, ComponentLabel("head_bias"))
            ro, consts = rb.build()
            return ro, consts, seen[representation]

        def grid_of_stage(_: int) -> tuple[int, int]:
            h, w = seen["image"]
            return (h // patch[0], w // patch[1])

        return Plan(
            stages=[stage],
            init=init,
            init_stage=0,
            positions=positions,
            run=model,
            readout=readout,
            attach_readout=attach_readout,
            family=self.family,
            grid_of_stage=grid_of_stage,
            meta={"representation": representation, "start_layer": start_layer, "num_blocks": depth},
        )


def patch_stride(patch_embed: nn.Module) -> tuple[int, int]:
    """Input pixels per token of a timm patch embedding (a ``HybridEmbed``'s backbone stride included)."""
    patch = tuple(patch_embed.patch_size)
    ratio = tuple(getattr(patch_embed, "feature_ratio", None) or (1, 1))
    return (patch[0] * ratio[0], patch[1] * ratio[1])
