"""open_clip ``VisionTransformer`` (CLIP image towers).

Stream: ``[B, 1 + gh*gw, width]`` after ``ln_pre`` (which, with the embeddings, is ``init``). Each
``ResidualAttentionBlock`` adds ``ls_1(attn(ln_1(x)))`` and ``ls_2(mlp(ln_2(x)))``. The attention is
``nn.MultiheadAttention``, which never exposes per-head outputs: for the pass its forward is replaced by
one that computes the same attention from its own weights and keeps the per-head outputs (the
completeness check confirms the sum; nothing is computed twice).
Representation ``"embedding"``: ``ln_post`` (per token, or on the pooled vector with
``final_ln_after_pool``), pooling (class token or average), ``@ proj`` — the image embedding before L2
normalisation.

CoCa (``attentional_pool=True``): the tower's ``AttentionalPooler`` normalises the stream (``ln_k``), and
its learned queries (``ln_q(query)``, the same for every image) attend over it with an
``nn.MultiheadAttention``; ``ln_post`` then normalises every query's output and the *first* query's
token, ``@ proj``, is the image embedding (``encode_image``; the other query tokens feed the text
decoder and are not decomposed). With the pooler's probabilities frozen it is linear in the stream, one
readout slot per pool head as for timm's MAP head; ``ln_k``'s beta (``pool_norm_bias``), the
pooler's value/output biases (``pool_bias``) and ``ln_post``'s beta (``norm_bias``) are components.
The untested ``'parallel'`` / ``'cascade'`` poolers (a second, contrastive pooler) are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import AttentionalPooler, ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from vitdecomp.decomp.plan import (
    Block,
    Field,
    Heads,
    Linear,
    MultiheadPool,
    Plan,
    Pool,
    Readout,
    Tap,
    TokenNorm,
    VectorNorm,
)
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import check_plan_args, layer_scale_of, token_model_plan

REPRESENTATIONS = ("embedding",)


def mha_replacement(mha: nn.MultiheadAttention, batch_first: bool):
    """A forward for ``mha(q, k, v, attn_mask=...)`` returning ``((out, None), z, probs, v)``: the same
    attention as the module's, with the per-head outputs ``z [B, S, H*dh]`` at ``positions`` kept."""
    heads = mha.num_heads

    def forward(args: tuple, kwargs: dict, positions: Tensor | None, tokens: bool):
        q_in, k_in, v_in = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args) :])[:3]
        if not batch_first:
            q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))
        bsz, _, d = k_in.shape
        if q_in is k_in and k_in is v_in:  # self-attention: one projection, as the module's own fast path
            q, k, v = F.linear(q_in, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        else:
            w, b = (
                mha.in_proj_weight.chunk(3),
                (mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else [None] * 3),
            )
            q, k, v = (F.linear(t, wi, bi) for t, wi, bi in zip((q_in, k_in, v_in), w, b, strict=True))
        q, k, v = (t.reshape(bsz, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        mask = kwargs.get("attn_mask")
        if tokens:
            scores = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            probs = scores.softmax(-1)
            z = probs @ v
        else:
            probs, z = None, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        z = z.transpose(1, 2).reshape(bsz, -1, d)
        out = mha.out_proj(z)
        out = out if batch_first else out.transpose(0, 1)
        if positions is not None:
            z = z[:, positions]
            probs = None if probs is None else probs[:, :, positions]
        return (out, None), z, probs, (v if tokens else None)

    return forward


def pooler_steps(model: VisionTransformer) -> list:
    """CoCa's readout: ``ln_k`` on every token, the pooler (first query), ``ln_post`` on that token."""
    pooler = model.attn_pool
    if type(pooler) is not AttentionalPooler or model.attn_pool_contrastive is not None:
        raise UnsupportedModuleError("attn_pool", pooler, "only CoCa's single AttentionalPooler")
    if model.pool_type != "tok":
        raise UnsupportedModuleError("", model, f"pool_type={model.pool_type!r} over the pooler's queries")
    pool = MultiheadPool(pooler.attn, query=0)  # its queries ln_q(query) and keys ln_k(x) are read in the pass
    return [TokenNorm(pooler.ln_k, "pool_norm_bias"), pool, VectorNorm(model.ln_post, "norm_bias", position=0)]


class OpenClipAdapter:
    family = "open_clip-vit"

    def plan(self, model: VisionTransformer, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        if model.attn_pool is None and model.pool_type not in ("tok", "avg"):
            raise UnsupportedModuleError("", model, f"pool_type={model.pool_type!r} has no rule")
        batch_first = getattr(model.transformer, "batch_first", True)
        layout = "tokens" if batch_first else "seq_first"
        resblocks = model.transformer.resblocks
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, len(resblocks))
        blocks = [_block(blk, f"transformer.resblocks.{i}", i, batch_first) for i, blk in enumerate(resblocks)][
            start_layer:
        ]
        pool = Pool(positions=(0,)) if model.pool_type == "tok" else Pool(skip=1)
        if model.attn_pool is not None:
            steps = pooler_steps(model)
        elif model.final_ln_after_pool:
            steps = [pool, VectorNorm(model.ln_post, "norm_bias")]
        else:
            steps = [TokenNorm(model.ln_post), pool]
        if model.proj is not None:
            steps.append(Linear(model.proj.T))
        patch = model.patch_size if isinstance(model.patch_size, tuple) else (model.patch_size,) * 2
        return token_model_plan(
            self.family,
            model,
            blocks,
            block_modules=resblocks,
            start_layer=start_layer,
            num_prefix_tokens=1,
            patch=tuple(patch),
            image_tap=Tap(model.conv1, "input", "nchw"),
            readout=Readout(Tap(model.transformer, "output", layout), steps, Tap(model)),
            meta={"representation": representation, "start_layer": start_layer, "num_blocks": len(resblocks)},
        )


def _block(blk: nn.Module, path: str, layer: int, batch_first: bool) -> Block:
    if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
        raise UnsupportedModuleError(path, blk, "only open_clip's self-attention ResidualAttentionBlock")
    mha = blk.attn
    if type(mha) is not nn.MultiheadAttention or not mha._qkv_same_embed_dim or mha.bias_k is not None:
        raise UnsupportedModuleError(f"{path}.attn", mha, "only plain nn.MultiheadAttention")
    layer_scale_of(blk.ls_2, f"{path}.ls_2")  # the MLP is read after it: only checked
    layout = "tokens" if batch_first else "seq_first"
    heads = Heads(
        mha,
        f"{path}.attn",
        mha.num_heads,
        mha.out_proj.weight,
        mha.out_proj.bias,
        layer_scale=layer_scale_of(blk.ls_1, f"{path}.ls_1"),
        replace=mha_replacement(mha, batch_first),
    )
    mlp = Field(Tap(blk.ls_2, "output", layout), f"{path}.mlp")
    return Block(path, blk, layer, [heads, mlp], layout=layout)
