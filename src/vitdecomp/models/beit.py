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

from vitdecomp.decomp.plan import Block as PlanBlock
from vitdecomp.decomp.plan import Pool
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import TimmTokenAdapter, layer_scale_of, mlp_field, qkv_attention


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


class BeitAdapter(TimmTokenAdapter):
    family = "timm-beit"

    def blocks(self, model: Beit, start_layer: int) -> list[PlanBlock]:
        return beit_blocks(model, start_layer)

    def pooling(self, model: Beit) -> Pool:
        return beit_pooling(model)
