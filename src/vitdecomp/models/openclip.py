"""open_clip ``VisionTransformer`` (CLIP image towers).

Stream: ``[B, 1 + gh*gw, width]`` after ``ln_pre`` (which, with the embeddings, is ``init``). Each
``ResidualAttentionBlock`` adds ``ls_1(attn(ln_1(x)))`` and ``ls_2(mlp(ln_2(x)))``. The attention is
``nn.MultiheadAttention``, which never exposes per-head outputs, so per-head outputs are recomputed
from its captured input with its own weights (the completeness check confirms they add up).
Representation ``"embedding"``: ``ln_post``, pooling, ``@ proj`` — the image embedding before L2
normalisation.
"""

from __future__ import annotations

import math

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from vitdecomp.components import ComponentLabel
from vitdecomp.decompose import (
    Block,
    Capture,
    ComputedAttention,
    FieldBranch,
    NormRule,
    Plan,
    ReadoutBuilder,
    Stage,
    check_plan_args,
    pool_weights,
)
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models.vit import layer_scale_of

REPRESENTATIONS = ("embedding",)


def mha_heads(mha: nn.MultiheadAttention, batch_first: bool):
    """A function computing ``(z [B, S, H*dh], probs [B, H, S, N] | None, v [B, H, N, dh] | None)`` from
    the call ``mha(q, k, v, attn_mask=...)`` for query positions ``positions``."""
    heads = mha.num_heads

    def compute(args: tuple, kwargs: dict, positions: Tensor | None, tokens: bool):
        q_in, k_in, v_in = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args) :])[:3]
        if not batch_first:
            q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))
        w, b = mha.in_proj_weight, mha.in_proj_bias
        d = q_in.shape[-1]
        wq, wk, wv = w.split(d)
        bq, bk, bv = b.split(d) if b is not None else (None, None, None)
        qx = q_in if positions is None else q_in[:, positions]
        q = nn.functional.linear(qx, wq, bq)
        k = nn.functional.linear(k_in, wk, bk)
        v = nn.functional.linear(v_in, wv, bv)
        bsz, n = k.shape[:2]
        dh = d // heads
        q = q.view(bsz, -1, heads, dh).transpose(1, 2)
        k = k.view(bsz, n, heads, dh).transpose(1, 2)
        v = v.view(bsz, n, heads, dh).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)
        mask = kwargs.get("attn_mask")
        if mask is not None:
            mask = mask if positions is None else mask[..., positions, :]
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.softmax(-1)
        z = (probs @ v).transpose(1, 2).reshape(bsz, -1, heads * dh)
        return z, (probs if tokens else None), (v if tokens else None)

    return compute


class OpenClipAdapter:
    family = "open_clip-vit"
    model_types = (VisionTransformer,)

    def plan(self, model: VisionTransformer, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        if model.attn_pool is not None:
            raise UnsupportedModuleError("attn_pool", model.attn_pool, "attention pooling has no rule yet")
        if model.pool_type not in ("tok", "avg"):
            raise UnsupportedModuleError("", model, f"pool_type={model.pool_type!r} has no rule")
        batch_first = getattr(model.transformer, "batch_first", True)
        resblocks = model.transformer.resblocks
        depth = len(resblocks)
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, depth)
        ln_post = NormRule.of(model.ln_post, "ln_post")

        def to_stream(x: Tensor) -> Tensor:
            return x if batch_first else x.transpose(0, 1)

        blocks = []
        for i, blk in enumerate(resblocks):
            path = f"transformer.resblocks.{i}"
            if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
                raise UnsupportedModuleError(path, blk, "only open_clip's self-attention ResidualAttentionBlock")
            mha = blk.attn
            if type(mha) is not nn.MultiheadAttention or not mha._qkv_same_embed_dim or mha.bias_k is not None:
                raise UnsupportedModuleError(f"{path}.attn", mha, "only plain nn.MultiheadAttention")
            if i < start_layer:
                continue
            base = {"layer": i}
            attn = ComputedAttention(
                mha,
                f"{path}.attn",
                base,
                heads,
                layer_scale_of(blk.ls_1, f"{path}.ls_1"),
                mha.out_proj.weight,
                mha.out_proj.bias,
                mha.num_heads,
                mha_heads(mha, batch_first),
            )
            layer_scale_of(blk.ls_2, f"{path}.ls_2")
            mlp = FieldBranch(blk.ls_2, ComponentLabel("mlp", **base), f"{path}.mlp", to_stream=to_stream)
            blocks.append(Block(path, blk, i, [attn, mlp], stream_in=to_stream, stream_out=to_stream))

        patch = model.patch_size if isinstance(model.patch_size, tuple) else (model.patch_size,) * 2
        stage = Stage(0, blocks, patch=tuple(patch), num_prefix_tokens=1)
        positions = torch.tensor([0]) if model.pool_type == "tok" else None
        if start_layer < depth:
            init = FieldBranch(resblocks[start_layer], ComponentLabel("init"), "init", "input", to_stream)
        else:
            init = FieldBranch(model.ln_post, ComponentLabel("init"), "init", "input")
        seen: dict[str, Tensor] = {}

        def keep_output(out) -> None:
            seen["embedding"] = out[0] if isinstance(out, tuple) else out

        def attach_readout(cap: Capture) -> None:
            cap.on_output(model.transformer, lambda x: seen.__setitem__("stream", to_stream(x)))
            cap.on_input(model.ln_post, lambda x: seen.__setitem__("ln_in", x))
            cap.on_output(model, keep_output)
            cap.on_input(model.conv1, lambda x: seen.__setitem__("image", x.shape[-2:]))

        def readout():
            x = seen["stream"]
            x = x if positions is None else x[:, positions]
            d = x.shape[-1]
            weight = pool_weights(x, positions, 1)
            rb = ReadoutBuilder(weight, d, positions.to(x.device) if positions is not None else None)
            if model.final_ln_after_pool:
                rb.vector_norm(seen["ln_in"], ln_post, ComponentLabel("norm_bias"))
            else:
                rb.token_norm(x, ln_post, ComponentLabel("norm_bias"))
            if model.proj is not None:
                rb.linear(model.proj.T, None, ComponentLabel("head_bias"))
            ro, consts = rb.build()
            return ro, consts, seen["embedding"]

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
