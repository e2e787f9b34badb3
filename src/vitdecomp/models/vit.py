"""timm ``VisionTransformer`` (DeiT, DINO, DINOv2 + registers, DeiT-III, timm CLIP ViTs, SigLIP's MAP head)
and ``VisionTransformerDistilled`` (DeiT with a distillation token).

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
"""

from __future__ import annotations

from timm.layers import AttentionPoolLatent
from timm.layers.attention import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitdecomp.decomp.plan import (
    AttentionPool,
    Linear,
    Plan,
    Pool,
    Readout,
    Tap,
    TokenNorm,
    VectorNorm,
)
from vitdecomp.decomp.plan import (
    Block as PlanBlock,
)
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import (
    check_identity,
    check_plan_args,
    is_norm,
    layer_scale_of,
    mlp_field,
    patch_stride,
    qkv_attention,
    token_model_plan,
)

REPRESENTATIONS = ("pre_logits", "logits")
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


def _pooling(model: VisionTransformer) -> list:
    npre = model.num_prefix_tokens
    skip = 0 if model.pool_include_prefix else npre
    if model.attn_pool is not None:
        if type(model.attn_pool) is not AttentionPoolLatent:
            raise UnsupportedModuleError("attn_pool", model.attn_pool, "only timm's AttentionPoolLatent")
        return [AttentionPool(model.attn_pool, skip=skip)]
    if model.global_pool == "token":
        return [Pool(positions=(0,))]
    if model.global_pool == "avg":
        return [Pool(skip=skip)]
    raise UnsupportedModuleError("", model, f"global_pool={model.global_pool!r} is not linear")


class TimmViTAdapter:
    family = "timm-vit"

    def plan(self, model: VisionTransformer, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        depth = len(model.blocks)
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, depth)
        if representation == "logits" and not isinstance(model.head, nn.Linear):
            raise UnsupportedModuleError("head", model.head, "logits need a linear head")
        steps: list = [TokenNorm(model.norm)] if is_norm(model.norm) else []
        steps += _pooling(model)
        if is_norm(model.fc_norm):
            steps.append(VectorNorm(model.fc_norm))
        if representation == "logits":
            steps.append(Linear(model.head.weight, model.head.bias))
        output = Tap(model.head) if representation == "logits" else Tap(model.fc_norm)
        return self._plan(model, start_layer, Readout(Tap(model.norm, "input"), steps, output), representation)

    def _plan(self, model: VisionTransformer, start_layer: int, readout: Readout, representation: str) -> Plan:
        return token_model_plan(
            self.family,
            model,
            vit_blocks(model, start_layer),
            block_modules=model.blocks,
            start_layer=start_layer,
            num_prefix_tokens=model.num_prefix_tokens,
            patch=patch_stride(model.patch_embed),
            image_tap=Tap(model.patch_embed, "input", "nchw"),
            readout=readout,
            meta={"representation": representation, "start_layer": start_layer, "num_blocks": len(model.blocks)},
        )


class DistilledViTAdapter(TimmViTAdapter):
    family = "timm-vit-distilled"

    def plan(self, model: VisionTransformerDistilled, *, start_layer: int, representation: str | None, heads: bool):
        depth = len(model.blocks)
        representation = check_plan_args(representation, tuple(DISTILLED_REPRESENTATIONS), start_layer, depth)
        positions, weights = DISTILLED_REPRESENTATIONS[representation]
        steps: list = [TokenNorm(model.norm)] if is_norm(model.norm) else []
        steps.append(Pool(positions=positions, weights=weights))
        w = weights or (1.0,)

        def own(tokens):  # the model's own forward_head(pre_logits=True) for the averaged tokens
            return sum(wi * tokens[:, p] for wi, p in zip(w, positions, strict=True))

        readout = Readout(Tap(model.norm, "input"), steps, Tap(model.norm), output_fn=own)
        return self._plan(model, start_layer, readout, representation)
