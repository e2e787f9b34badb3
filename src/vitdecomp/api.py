"""The public entry point: :func:`decompose` any supported model (the registry picks its adapter)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from vitdecomp.components import Decomposition
from vitdecomp.decomp.engine import decompose_plan
from vitdecomp.models.registry import adapter_for


def decompose(
    model: nn.Module | object,
    images: Tensor,
    *,
    heads: bool = True,
    tokens: bool | Sequence[int] = False,
    start_layer: int = 0,
    representation: str | None = None,
    check: float | None = None,
) -> Decomposition:
    """Split ``model``'s representation of ``images [B, 3, H, W]`` into additive components.

    ``model``: what :func:`vitdecomp.load_model` returns, or a timm / open_clip model object.
    ``heads``: one component per attention head (else one per attention layer).
    ``tokens``: also split head contributions over source tokens (``True`` or a list of layer indices).
    ``start_layer``: blocks before it are folded into ``init``.
    ``representation``: which output to decompose (adapter-specific; ``None`` = the paper's).
    ``check``: raise if the relative completeness error of any image exceeds it
    (default: 1e-4 for float32, 1e-9 for float64; ``0`` disables).
    """
    adapter, target = adapter_for(getattr(model, "model", model))

    def make_plan():
        return adapter.plan(target, start_layer=start_layer, representation=representation, heads=heads)

    return decompose_plan(make_plan, target, images, heads=heads, tokens=tokens, check=check)
