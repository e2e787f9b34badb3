"""timm ``Eva``: EVA-01, EVA-02, EVA-CLIP vision towers, timm's RoPE ViTs, Perception Encoder (PE), DINOv3 and
the other models timm builds on this class.

Stream: ``[B, prefix + gh*gw, D]`` at the blocks (after ``norm_pre``). A pre-norm ``EvaBlock`` adds
``gamma_1 * attn(norm1(x))`` (split per head at ``attn.proj``; with ``scale_attn_inner`` at the input of
``attn.norm``, a norm between the heads and the projection whose frozen statistics make it linear per head)
and ``gamma_2 * mlp(norm2(x))`` (one component, whatever the MLP: GELU ``Mlp``, ``SwiGLU``, ``GluMlp``,
with or without its inner norm). A residual post-norm ``EvaBlockPostNorm`` (EVA-CLIP enormous) adds
``norm1(attn(x))`` (split per head, ``norm1``'s statistics frozen) and ``norm2(mlp(x))``. Rotary embeddings
and q/k norms act only inside the attention probabilities, frozen from the pass; with grouped-query
attention (``AttentionRope``'s ``num_kv_heads``) a head's values are those of its kv group.

Representations: ``"pre_logits"`` (default: final norm, pooling — class token, average of the non-prefix
tokens, or the attention-pool (MAP) head — and ``fc_norm``, i.e. ``forward_head(pre_logits=True)``) and
``"logits"`` (through the linear head). An attention-pool head splits as in :mod:`vitdecomp.models.vit`
(one readout slot per pool head; ``pool_pos``, ``pool_bias``, ``pool_mlp`` components).

Norms: LayerNorm and timm's ``RmsNorm`` (Sapiens2; no centring, no beta — see
:class:`~vitdecomp.decomp.readout.NormRule`). Not covered (refused by name): gated attention (a sigmoid gate
is not linear), ``max``/``avgmax`` pooling or none, and norms without a frozen-statistics rule.
"""

from __future__ import annotations

import dataclasses

from timm.layers import AttentionPoolLatent, AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import Tensor, nn

from vitdecomp.decomp.plan import (
    AttentionPool,
    Block,
    Heads,
    Pool,
    Tap,
    Values,
)
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import (
    TimmTokenAdapter,
    is_norm,
    layer_scale_of,
    mlp_field,
    qkv_attention,
)


def grouped_values(values: Values, num_kv_heads: int, groups: int) -> Values:
    """Values of grouped-query attention: ``[B, N, H_kv*dh]`` expanded to ``[B, N, H*dh]``, head ``h``
    taking kv head ``h // groups`` (timm's ``repeat_interleave``)."""
    fn = values.fn

    def expand(t: Tensor) -> Tensor:
        v = fn(t)
        b, n, _ = v.shape
        return v.view(b, n, num_kv_heads, -1).repeat_interleave(groups, dim=2).reshape(b, n, -1)

    return Values(values.tap, expand)


def eva_attention(attn: nn.Module, path: str, layer_scale: Tensor | None, post_norm: nn.Module | None) -> Heads:
    """``EvaAttention`` / ``AttentionRope`` (fused or separate q/k/v, q/v biases, an optional inner norm,
    grouped kv heads) as a :class:`Heads` declaration."""
    if type(attn) not in (EvaAttention, AttentionRope):
        raise UnsupportedModuleError(path, attn, "only timm's EvaAttention / AttentionRope are supported")
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModuleError(path, attn, "gated attention (a sigmoid gate on the heads' output) is not linear")
    heads = qkv_attention(attn, path, layer_scale, post_norm=post_norm)
    changes: dict = {}
    if is_norm(attn.norm):
        changes.update(z=Tap(attn.norm, "input"), inner_norm=attn.norm)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        changes["values"] = grouped_values(heads.values, attn.num_kv_heads, groups)
    return dataclasses.replace(heads, **changes) if changes else heads


def eva_blocks(model: Eva, start_layer: int) -> list[Block]:
    """Every block from ``start_layer`` on (all are checked)."""
    blocks = []
    for i, blk in enumerate(model.blocks):
        path = f"blocks.{i}"
        if type(blk) is EvaBlock:
            heads = eva_attention(blk.attn, f"{path}.attn", layer_scale_of(blk.gamma_1, f"{path}.gamma_1"), None)
            mlp = mlp_field(blk.mlp, f"{path}.mlp", scale=layer_scale_of(blk.gamma_2, f"{path}.gamma_2"))
        elif type(blk) is EvaBlockPostNorm:
            heads = eva_attention(blk.attn, f"{path}.attn", None, blk.norm1)
            mlp = mlp_field(blk.norm2, f"{path}.mlp")
        else:
            raise UnsupportedModuleError(path, blk, "only timm's EvaBlock / EvaBlockPostNorm are supported")
        if i >= start_layer:
            blocks.append(Block(path, blk, i, [heads, mlp]))
    return blocks


def eva_pooling(model: Eva) -> Pool | AttentionPool:
    """``Eva.pool``: the attention pool over every token, else ``global_pool`` over the stream."""
    if model.attn_pool is not None:
        if type(model.attn_pool) is not AttentionPoolLatent:
            raise UnsupportedModuleError("attn_pool", model.attn_pool, "only timm's AttentionPoolLatent")
        return AttentionPool(model.attn_pool, skip=0)
    if model.global_pool == "token":
        return Pool(positions=(0,))
    if model.global_pool == "avg":
        return Pool(skip=model.num_prefix_tokens)
    raise UnsupportedModuleError("", model, f"global_pool={model.global_pool!r} is not a linear pooling")


class EvaAdapter(TimmTokenAdapter):
    family = "timm-eva"

    def blocks(self, model: Eva, start_layer: int) -> list[Block]:
        return eva_blocks(model, start_layer)

    def pooling(self, model: Eva) -> Pool | AttentionPool:
        return eva_pooling(model)
