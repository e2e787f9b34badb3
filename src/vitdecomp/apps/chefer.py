"""Chefer et al.'s gradient-weighted attention rollout (Chefer, Gur, Wolf 2021, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", the
self-attention rule, their eq. 5-6), behind the relevance-map contract of :mod:`vitdecomp.apps.relevance`.

Per block ``l`` with attention probabilities ``A_l [B, h, N, N]`` and the gradient of the explained
scalar with respect to them ``dA_l``:

    Abar_l = mean_h (dA_l * A_l)^+            (positive part, averaged over heads)
    R_0 = I,   R_l = R_{l-1} + Abar_l @ R_{l-1}

and the relevance of the patch tokens is the class token's row of ``R_L`` (prefix tokens dropped),
reshaped to the patch grid and upsampled bilinearly to the input, as in the authors' code.

Where it applies: models with *global* self-attention and a class token whose row is the readout —
timm ``VisionTransformer`` (DeiT, DINO, the zoo's deit / dino). It does not apply to windowed or
partitioned attention (Swin's shifted windows, MaxViT's block / grid attention: a token attends only
inside its window, there is no token-to-token matrix over the image to roll out), nor to models
pooling without a class token; the paper reports it for DeiT and DINO only. open_clip's towers have
global attention and a class token, but their ``nn.MultiheadAttention`` probabilities are not captured
here (:func:`why_not` says which reason holds).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from vitdecomp.apps.relevance import Representation, network, upsample
from vitdecomp.errors import VitDecompError


def rollout(attentions: list[Tensor], gradients: list[Tensor]) -> Tensor:
    """``R [B, N, N]`` from per-block ``attentions`` and ``gradients`` ``[B, h, N, N]`` (first block first)."""
    b, _, n, _ = attentions[0].shape
    r = torch.eye(n, dtype=attentions[0].dtype).expand(b, n, n)
    for a, g in zip(attentions, gradients, strict=True):
        cam = (g * a).clamp_min(0).mean(1)
        r = r + cam @ r
    return r


def why_not(model: object) -> str | None:
    """``None`` when the rollout applies to ``model``, else the reason it does not (one line)."""
    net = network(model)
    blocks = getattr(net, "blocks", None)
    kind = f"{type(net).__module__.split('.')[0]} {type(net).__name__}"
    if type(net).__module__.startswith("open_clip") or hasattr(getattr(net, "visual", None), "transformer"):
        return (
            f"{kind}: its attention is torch's nn.MultiheadAttention, whose probabilities this implementation "
            "does not capture (it hooks timm's Attention; the rollout itself would apply)"
        )
    if type(net).__name__.startswith(("Swin", "MaxxVit", "MaxVit")):
        return f"{kind} has no global self-attention over all tokens (windowed / partitioned attention)"
    if type(net).__name__ not in ("VisionTransformer", "VisionTransformerDistilled") or blocks is None:
        return f"{kind}: the rollout is wired for timm's VisionTransformer only (it hooks timm's Attention)"
    if getattr(net, "cls_token", None) is None or getattr(net, "global_pool", "token") != "token":
        return "the model does not read out a class token (Chefer's relevance is the class token's row)"
    if not all(hasattr(blk.attn, "attn_drop") and hasattr(blk.attn, "fused_attn") for blk in blocks):
        return "its attention modules are not timm's Attention (no attention probabilities to capture)"
    return None


@contextmanager
def captured_attention(net: nn.Module) -> Iterator[list[Tensor]]:
    """Collect each block's attention probabilities ``[B, h, N, N]`` (graph kept) while in the context:
    timm's fused kernel is switched off and ``attn_drop``'s input is recorded."""
    found: list[Tensor] = []
    saved = [blk.attn.fused_attn for blk in net.blocks]
    hooks = [blk.attn.attn_drop.register_forward_hook(lambda _m, inp, _o: found.append(inp[0])) for blk in net.blocks]
    try:
        for blk in net.blocks:
            blk.attn.fused_attn = False
        yield found
    finally:
        for h in hooks:
            h.remove()
        for blk, fused in zip(net.blocks, saved, strict=True):
            blk.attn.fused_attn = fused


def token_relevance(model: object, images: Tensor, directions: Tensor) -> Tensor:
    """``[B, N - prefix]``: the class token's row of the rollout for ``<representation, direction>``."""
    reason = why_not(model)
    if reason is not None:
        raise VitDecompError(f"Chefer et al.'s rollout does not apply: {reason}")
    net = network(model)
    with torch.enable_grad(), captured_attention(net) as attns:
        score = (Representation(net)(images) * directions.to(images)).sum()
        grads = torch.autograd.grad(score, attns)
    r = rollout([a.detach() for a in attns], [g.detach() for g in grads])
    return r[:, 0, net.num_prefix_tokens :]


class CheferMap:
    """The relevance-map contract for Chefer et al.'s rollout: ``[B, H, W]`` on the input pixels
    (``context`` is ignored: the gradient explains the scalar alone)."""

    name = "chefer"

    def __call__(self, model: object, images: Tensor, directions: Tensor, context: object = None) -> Tensor:
        rel = token_relevance(model, images, directions)
        gh, gw = network(model).patch_embed.grid_size
        return upsample(rel.reshape(-1, gh, gw), (images.shape[-2], images.shape[-1]))
