"""timm ``VisionTransformer`` (DeiT, DINO, DINOv2 + registers, DeiT-III, timm CLIP ViTs, SigLIP's MAP head,
AIMv2's RmsNorm towers) and ``VisionTransformerDistilled`` (DeiT with a distillation token).

Stream: ``[B, prefix + gh*gw, D]`` at the blocks. Each pre-norm ``Block`` adds ``ls1(attn(norm1(x)))``
(split per head at ``attn.proj``) and ``ls2(mlp(norm2(x)))``.

Representations of ``VisionTransformer``: ``"pre_logits"`` (default: final norm, pooling — class token,
average, or the attention-pool (MAP) head — and ``fc_norm``, i.e. ``forward_head(pre_logits=True)``)
and ``"logits"`` (through the linear head). An attention-pool head is linear in its values once its
probabilities are frozen: one readout slot per pool head; its position term (``pool_pos.H<h>``, per
pool head), value/projection biases (``pool_bias``) and MLP (``pool_mlp``) are components of their own.
Its latent query only shapes the (frozen) probabilities, so it adds no term.

``VisionTransformerDistilled``: ``"pre_logits"`` (default: the average of the class and distillation
tokens after the final norm, as the model's own head averages them), ``"cls"``, ``"dist"``.

Norms (final, ``fc_norm``): LayerNorm, or timm's ``RmsNorm`` (AIMv2, ``test_vit4``): frozen statistics, the RMS of
the full stream, and no centring — a LayerNorm's ``C`` subtracts each part's own mean, an RMS norm passes
each part through only scaled, and adds no beta (``norm_bias``) since it has none.
"""

from __future__ import annotations

from timm.layers import AttentionPoolLatent
from timm.layers.attention import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from vitdecomp.decomp.plan import (
    AttentionPool,
    Pool,
    Readout,
    Tap,
    TokenNorm,
)
from vitdecomp.decomp.plan import (
    Block as PlanBlock,
)
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import (
    TimmTokenAdapter,
    check_identity,
    check_plan_args,
    is_norm,
    layer_scale_of,
    mlp_field,
    qkv_attention,
)

DISTILLED_REPRESENTATIONS = {"pre_logits": ((0, 1), (0.5, 0.5)), "cls": ((0,), None), "dist": ((1,), None)}


def vit_blocks(model: VisionTransformer, start_layer: int) -> list[PlanBlock]:
    """Every block from ``start_layer`` on, checked to be timm's pre-norm ``Block`` (all are checked)."""
    blocks = []
    for i, blk in enumerate(model.blocks):
        path = f"blocks.{i}"
        if type(blk) is not Block:
            raise UnsupportedModuleError(path, blk, "only timm's pre-norm Block is supported")
        attn = blk.attn
        if type(attn) is not Attention:
            raise UnsupportedModuleError(f"{path}.attn", attn, "only timm's Attention is supported")
        check_identity(attn.norm, f"{path}.attn.norm", "a norm between attention and projection has no rule here")
        check_identity(getattr(attn, "gate", None), f"{path}.attn.gate", "gated attention is not linear")
        layer_scale_of(blk.ls2, f"{path}.ls2")  # the MLP is read after it: only checked
        if i >= start_layer:
            heads = qkv_attention(attn, f"{path}.attn", layer_scale_of(blk.ls1, f"{path}.ls1"))
            blocks.append(PlanBlock(path, blk, i, [heads, mlp_field(blk.ls2, f"{path}.mlp")]))
    return blocks


def vit_pooling(model: VisionTransformer) -> Pool | AttentionPool:
    npre = model.num_prefix_tokens
    skip = 0 if model.pool_include_prefix else npre
    if model.attn_pool is not None:
        if type(model.attn_pool) is not AttentionPoolLatent:
            raise UnsupportedModuleError("attn_pool", model.attn_pool, "only timm's AttentionPoolLatent")
        return AttentionPool(model.attn_pool, skip=skip)
    if model.global_pool == "token":
        return Pool(positions=(0,))
    if model.global_pool == "avg":
        return Pool(skip=skip)
    raise UnsupportedModuleError("", model, f"global_pool={model.global_pool!r} is not linear")


class TimmViTAdapter(TimmTokenAdapter):
    family = "timm-vit"

    def blocks(self, model: VisionTransformer, start_layer: int) -> list[PlanBlock]:
        return vit_blocks(model, start_layer)

    def pooling(self, model: VisionTransformer) -> Pool | AttentionPool:
        return vit_pooling(model)


class DistilledViTAdapter(TimmViTAdapter):
    family = "timm-vit-distilled"
    representations = tuple(DISTILLED_REPRESENTATIONS)

    def plan(self, model: VisionTransformerDistilled, *, start_layer: int, representation: str | None, heads: bool):
        representation = check_plan_args(representation, self.representations, start_layer, len(model.blocks))
        positions, weights = DISTILLED_REPRESENTATIONS[representation]
        steps: list = [TokenNorm(model.norm)] if is_norm(model.norm) else []
        steps.append(Pool(positions=positions, weights=weights))
        w = weights or (1.0,)

        def own(tokens):  # the model's own forward_head(pre_logits=True) for the averaged tokens
            return sum(wi * tokens[:, p] for wi, p in zip(w, positions, strict=True))

        readout = Readout(Tap(model.norm, "input"), steps, Tap(model.norm), output_fn=own)
        return self.plan_with(model, start_layer, readout, representation)
