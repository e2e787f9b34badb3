"""Helpers every adapter shares: argument checks, layer scales, value layouts, patch strides."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vitdecomp.decomp.plan import (
    Block,
    Field,
    Heads,
    Linear,
    Plan,
    Readout,
    ReadoutStep,
    Stage,
    Tap,
    TokenNorm,
    Values,
    VectorNorm,
)
from vitdecomp.errors import UnsupportedModuleError


def check_plan_args(representation: str | None, allowed: Sequence[str], start_layer: int, depth: int) -> str:
    """The representation to use (``None`` = the first allowed); errors for bad arguments."""
    representation = representation or allowed[0]
    if representation not in allowed:
        raise ValueError(f"representation must be one of {tuple(allowed)}, not {representation!r}")
    if not 0 <= start_layer <= depth:
        raise ValueError(f"start_layer must be in [0, {depth}], got {start_layer}")
    return representation


def layer_scale_of(module: nn.Module | Tensor | None, path: str) -> Tensor | None:
    """The gamma of a layer scale: a ``LayerScale``-like module, a bare parameter, or None/Identity."""
    if module is None or isinstance(module, nn.Identity):
        return None
    if isinstance(module, Tensor):
        return module
    gamma = getattr(module, "gamma", None)
    if isinstance(gamma, Tensor) and gamma.ndim == 1:
        return gamma
    raise UnsupportedModuleError(path, module, "unknown layer-scale module")


def check_identity(module: nn.Module | None, path: str, why: str) -> None:
    if module is not None and not isinstance(module, nn.Identity):
        raise UnsupportedModuleError(path, module, why)


def check_eval_identity(module: nn.Module, path: str) -> None:
    """Drop-path / dropout must be identities (eval mode or zero rate)."""
    if not isinstance(module, nn.Identity) and module.training:
        raise UnsupportedModuleError(path, module, "stochastic in training mode; call model.eval()")


def is_norm(module: nn.Module) -> bool:
    return not isinstance(module, nn.Identity)


def patch_stride(patch_embed: nn.Module) -> tuple[int, int]:
    """Input pixels per token of a timm patch embedding (a ``HybridEmbed``'s backbone stride included)."""
    patch = tuple(patch_embed.patch_size)
    ratio = tuple(getattr(patch_embed, "feature_ratio", None) or (1, 1))
    return (patch[0] * ratio[0], patch[1] * ratio[1])


def fused_qkv_values(num_heads: int) -> Callable[[Tensor], Tensor]:
    """``qkv output [B, N, 3*H*dh] -> v [B, N, H*dh]`` for timm's ``reshape(B, N, 3, H, dh)`` layout."""

    def fn(qkv: Tensor) -> Tensor:
        b, n, _ = qkv.shape
        return qkv.reshape(b, n, 3, num_heads, -1)[:, :, 2].reshape(b, n, -1)

    return fn


def linear_values(weight: Tensor, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """``attention input [B, N, D] -> v = x @ weight.T + bias`` (for qkv computed with ``F.linear``)."""
    return lambda x: nn.functional.linear(x, weight, bias)


def qkv_attention(attn: nn.Module, path: str, layer_scale: Tensor | None, **extra) -> Heads:
    """timm-style attention (``qkv`` -> ``attn_drop`` -> ``proj``) as a :class:`Heads` declaration.

    Values come from the ``qkv`` module's output, or — when the module adds separate q/v biases with
    ``F.linear`` (BEiT, EVA, Swin V2) or uses separate projections — from its input.
    """
    return Heads(
        attn,
        path,
        attn.num_heads,
        attn.proj.weight,
        attn.proj.bias,
        z=Tap(attn.proj, "input"),
        probs=Tap(attn.attn_drop),
        values=qkv_values(attn),
        layer_scale=layer_scale,
        **extra,
    )


def qkv_values(attn: nn.Module) -> Values:
    """Where the value vectors of a timm-style attention module are, whatever its q/k/v layout."""
    v_proj = getattr(attn, "v_proj", None)
    if isinstance(v_proj, nn.Linear):
        return Values(Tap(v_proj), lambda v: v)
    qkv = attn.qkv
    v_bias = getattr(attn, "v_bias", None)
    if v_bias is None and getattr(attn, "q_bias", None) is None:
        return Values(Tap(qkv), fused_qkv_values(attn.num_heads))
    inner = qkv.weight.shape[0] // 3
    bias = v_bias
    if qkv.bias is not None:
        bias = qkv.bias[2 * inner :] + (0 if v_bias is None else v_bias)
    return Values(Tap(attn, "input"), linear_values(qkv.weight[2 * inner :], bias))


def mlp_field(tap_module: nn.Module, path: str, scale: Tensor | None = None, **tap) -> Field:
    """The MLP branch read at ``tap_module``'s output (a layer-scale or drop-path module after it)."""
    return Field(Tap(tap_module, **tap), path, "mlp", scale)


def positions_of(indices: Sequence[int]) -> Tensor:
    return torch.tensor(list(indices))


def token_model_plan(
    family: str,
    model: nn.Module,
    blocks: list,
    *,
    block_modules: Sequence[nn.Module],
    start_layer: int,
    num_prefix_tokens: int,
    patch: tuple[int, int],
    image_tap: Tap,
    readout: Readout,
    meta: dict,
) -> Plan:
    """The plan of a single-grid token model (ViT, EVA, BEiT, open_clip): one stage, ``init`` the stream
    entering block ``start_layer`` (or the readout's stream when every block is folded)."""
    if start_layer < len(block_modules):
        init_tap = Tap(block_modules[start_layer], "input", readout.stream.layout)
    else:
        init_tap = readout.stream
    stage = Stage(0, blocks, grid=image_tap, patch=patch, num_prefix_tokens=num_prefix_tokens, grid_divisor=patch)
    return Plan(family, [stage], Field(init_tap, "init", "init"), 0, readout, model, meta)


def timm_token_readout(model: nn.Module, pooling: ReadoutStep, representation: str) -> Readout:
    """timm's ``norm`` -> pooling -> ``fc_norm`` (-> ``head``), as ``forward_features`` / ``forward_head``."""
    if representation == "logits" and not isinstance(model.head, nn.Linear):
        raise UnsupportedModuleError("head", model.head, "logits need a linear head")
    steps: list[ReadoutStep] = [TokenNorm(model.norm)] if is_norm(model.norm) else []
    steps.append(pooling)
    if is_norm(model.fc_norm):
        steps.append(VectorNorm(model.fc_norm))
    if representation == "logits":
        steps.append(Linear(model.head.weight, model.head.bias))
    output = Tap(model.head) if representation == "logits" else Tap(model.fc_norm)
    return Readout(Tap(model.norm, "input"), steps, output)


class TimmTokenAdapter:
    """The plan shared by timm's single-grid token models (ViT, EVA, BEiT): a subclass declares its
    blocks and its pooling step; representations ``"pre_logits"`` (default) and ``"logits"``."""

    family = ""
    representations: tuple[str, ...] = ("pre_logits", "logits")

    def blocks(self, model: nn.Module, start_layer: int) -> list[Block]:
        raise NotImplementedError

    def pooling(self, model: nn.Module) -> ReadoutStep:
        raise NotImplementedError

    def plan(self, model: nn.Module, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        representation = check_plan_args(representation, self.representations, start_layer, len(model.blocks))
        readout = timm_token_readout(model, self.pooling(model), representation)
        return self.plan_with(model, start_layer, readout, representation)

    def plan_with(self, model: nn.Module, start_layer: int, readout: Readout, representation: str) -> Plan:
        """The plan for a chosen readout (a subclass with other representations builds its own)."""
        depth = len(model.blocks)
        return token_model_plan(
            self.family,
            model,
            self.blocks(model, start_layer),
            block_modules=model.blocks,
            start_layer=start_layer,
            num_prefix_tokens=model.num_prefix_tokens,
            patch=patch_stride(model.patch_embed),
            image_tap=Tap(model.patch_embed, "input", "nchw"),
            readout=readout,
            meta={"representation": representation, "start_layer": start_layer, "num_blocks": depth},
        )
