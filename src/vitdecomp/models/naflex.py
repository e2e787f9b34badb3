"""timm ``NaFlexVit``: the ViT for variable resolutions and aspect ratios (NaFlex SigLIP 2, RADIO, ...).

It is called either on an image batch ``[B, 3, H, W]`` (a plain ViT) or on NaFlex's pre-patchified batch:
a mapping with ``patches [B, N, P*P*C]``, ``patch_coord [B, N, 2]`` and ``patch_valid [B, N]`` (bool),
which ``vd.decompose(model, batch)`` hands on to the model's forward as it is.

Stream: ``[B, prefix + N, D]`` after ``norm_pre``. Blocks are timm's pre-norm ``Block`` (split as in
:mod:`vitdecomp.models.vit`) or, with rotary embeddings / SwiGLU / grouped kv heads, ``EvaBlock`` (as in
:mod:`vitdecomp.models.eva`).

Padding (``patch_valid`` false) contributes nothing, by the model's own masks: a real token never attends
to a padding token (its probability is exactly 0, so every head's contribution from a padding token is
0), and the masked average pool and the MAP head's key mask leave padding out of the pooling — the
decomposition reads the same ``patch_valid``, so every part (``init`` and the MLPs included) is read
only at real tokens, and a sample decomposes the same whatever it is padded with. A patch batch has no
2-D token grid: token splits are a ``1 x N`` row in the batch's own patch order (the places are its
``patch_coord``; pixel boxes ``-1``).

Representations: ``"pre_logits"`` (default: final norm, pooling — class token, the (masked) average, or
the MAP head — and ``fc_norm``, i.e. ``forward_head(pre_logits=True)``) and ``"logits"``. ``max`` /
``avgmax`` pooling (not linear) and no pooling are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from timm.layers import AttentionPoolLatent
from timm.models.eva import EvaBlock
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import Block
from torch import Tensor

from vitdecomp.decomp.plan import AttentionPool, Plan, Pool, Tap, Validity
from vitdecomp.decomp.plan import Block as PlanBlock
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import check_plan_args, timm_token_readout, token_model_plan
from vitdecomp.models.eva import eva_blocks
from vitdecomp.models.vit import vit_blocks

REPRESENTATIONS = ("pre_logits", "logits")


class PatchValidity:
    """Calls the model and keeps the ``patch_valid`` of the batch it is called on (none for images)."""

    def __init__(self, model: NaFlexVit) -> None:
        self.model = model
        self.patch_valid: Tensor | None = None

    def run(self, images: Tensor | Mapping[str, Tensor]) -> object:
        self.patch_valid = images.get("patch_valid") if isinstance(images, Mapping) else None
        return self.model(images)

    def of_pooled(self, prefix: int) -> Validity:
        """``() -> [B, prefix + N]``: the validity of the tokens a pool sees (``prefix`` tokens first, real)."""

        def valid() -> Tensor | None:
            pv = self.patch_valid
            if pv is None:
                return None
            return torch.cat([pv.new_ones(pv.shape[0], prefix), pv], 1).bool()

        return valid


def naflex_pooling(model: NaFlexVit, validity: PatchValidity) -> Pool | AttentionPool:
    """``NaFlexVit._pool``: the MAP head with its key mask, the class token, or the masked average."""
    npre = model.num_prefix_tokens
    skip, seen_prefix = (0, npre) if model.pool_include_prefix else (npre, 0)
    if model.attn_pool is not None:
        if type(model.attn_pool) is not AttentionPoolLatent:
            raise UnsupportedModuleError("attn_pool", model.attn_pool, "only timm's AttentionPoolLatent")
        return AttentionPool(model.attn_pool, skip=skip, valid=validity.of_pooled(seen_prefix))
    if model.global_pool == "token":
        return Pool(positions=(0,))
    if model.global_pool == "avg":
        return Pool(skip=skip, valid=validity.of_pooled(seen_prefix))
    raise UnsupportedModuleError("", model, f"global_pool={model.global_pool!r} is not a linear pooling")


def naflex_blocks(model: NaFlexVit, start_layer: int) -> list[PlanBlock]:
    """timm ``Block`` s as a ViT's, ``EvaBlock`` s as an EVA's (every block is checked)."""
    kinds = {type(blk) for blk in model.blocks}
    if kinds <= {Block}:
        return vit_blocks(model, start_layer)
    if kinds <= {EvaBlock}:
        return eva_blocks(model, start_layer)
    raise UnsupportedModuleError("blocks", model.blocks, f"blocks of classes {sorted(k.__name__ for k in kinds)}")


class NaFlexVitAdapter:
    family = "timm-naflexvit"

    def plan(self, model: NaFlexVit, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, len(model.blocks))
        validity = PatchValidity(model)
        readout = timm_token_readout(model, naflex_pooling(model, validity), representation)
        patch = tuple(model.embeds.patch_size)
        plan = token_model_plan(
            self.family,
            model,
            naflex_blocks(model, start_layer),
            block_modules=model.blocks,
            start_layer=start_layer,
            num_prefix_tokens=model.num_prefix_tokens,
            patch=patch,
            image_tap=Tap(model.embeds, "input", "nchw"),
            readout=readout,
            meta={"representation": representation, "start_layer": start_layer, "num_blocks": len(model.blocks)},
        )
        return dataclasses.replace(plan, run=validity.run)
