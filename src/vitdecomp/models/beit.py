"""timm ``Beit`` (BEiT, BEiT v2).

Stream: ``[B, 1 + gh*gw, D]`` at the blocks (class token first). Each pre-norm ``Block`` adds
``gamma_1 * attn(norm1(x))`` (split per head at ``attn.proj``; values from the ``qkv`` weights plus the
separate ``v_bias``) and ``gamma_2 * mlp(norm2(x))`` (one component), without the gammas when the model has
no layer scale. Relative position biases, per block or the model's shared ``rel_pos_bias``, act only
inside the attention probabilities, frozen from the pass.

Representations: ``"pre_logits"`` (default: ``forward_head(pre_logits=True)`` — the average of the patch
tokens then ``fc_norm`` (``global_pool="avg"``), or the class token after the final norm (``"token"``),
whichever norm placement ``use_fc_norm`` chose) and ``"logits"`` (through the linear head).
``global_pool=""`` (no pooling) is refused.
"""

from __future__ import annotations

from timm.models.beit import Attention, Beit, Block
from torch import nn

from vitdecomp.decomp.plan import Block as PlanBlock
from vitdecomp.decomp.plan import Linear, Plan, Pool, Readout, Tap, TokenNorm, VectorNorm
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import (
    check_plan_args,
    is_norm,
    layer_scale_of,
    mlp_field,
    patch_stride,
    qkv_attention,
    token_model_plan,
)

REPRESENTATIONS = ("pre_logits", "logits")


def beit_blocks(model: Beit, start_layer: int) -> list[PlanBlock]:
    """Every block from ``start_layer`` on, checked to be timm's BEiT ``Block`` (all are checked)."""
    blocks = []
    for i, blk in enumerate(model.blocks):
        path = f"blocks.{i}"
        if type(blk) is not Block:
            raise UnsupportedModuleError(path, blk, "only timm's BEiT Block is supported")
        if type(blk.attn) is not Attention:
            raise UnsupportedModuleError(f"{path}.attn", blk.attn, "only timm's BEiT Attention is supported")
        # Block.forward applies both gammas or neither, keyed on gamma_1
        gamma_2 = None if blk.gamma_1 is None else layer_scale_of(blk.gamma_2, f"{path}.gamma_2")
        if i >= start_layer:
            heads = qkv_attention(blk.attn, f"{path}.attn", layer_scale_of(blk.gamma_1, f"{path}.gamma_1"))
            blocks.append(PlanBlock(path, blk, i, [heads, mlp_field(blk.mlp, f"{path}.mlp", scale=gamma_2)]))
    return blocks


def beit_pooling(model: Beit) -> Pool:
    if model.global_pool == "avg":
        return Pool(skip=model.num_prefix_tokens)
    if model.global_pool == "token":
        return Pool(positions=(0,))
    raise UnsupportedModuleError("", model, f"global_pool={model.global_pool!r}: the output is not pooled")


def beit_readout(model: Beit, representation: str) -> Readout:
    """``norm`` -> pooling -> ``fc_norm`` (-> ``head``), as ``forward_features`` / ``forward_head``."""
    if representation == "logits" and not isinstance(model.head, nn.Linear):
        raise UnsupportedModuleError("head", model.head, "logits need a linear head")
    steps: list = [TokenNorm(model.norm)] if is_norm(model.norm) else []
    steps.append(beit_pooling(model))
    if is_norm(model.fc_norm):
        steps.append(VectorNorm(model.fc_norm))
    if representation == "logits":
        steps.append(Linear(model.head.weight, model.head.bias))
    output = Tap(model.head) if representation == "logits" else Tap(model.fc_norm)
    return Readout(Tap(model.norm, "input"), steps, output)


class BeitAdapter:
    family = "timm-beit"

    def plan(self, model: Beit, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        depth = len(model.blocks)
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, depth)
        readout = beit_readout(model, representation)
        return token_model_plan(
            self.family,
            model,
            beit_blocks(model, start_layer),
            block_modules=model.blocks,
            start_layer=start_layer,
            num_prefix_tokens=model.num_prefix_tokens,
            patch=patch_stride(model.patch_embed),
            image_tap=Tap(model.patch_embed, "input", "nchw"),
            readout=readout,
            meta={"representation": representation, "start_layer": start_layer, "num_blocks": depth},
        )
