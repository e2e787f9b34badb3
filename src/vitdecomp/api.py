"""The public entry point: :func:`decompose` any supported model (the registry picks its adapter)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import Tensor, nn

from vitdecomp.components import ComponentLabel, Decomposition
from vitdecomp.decomp.directional import TokenDirections
from vitdecomp.decomp.engine import decompose_plan
from vitdecomp.models.loaded import LoadedModel
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
    token_directions: Tensor | Callable[[ComponentLabel], Tensor] | None = None,
) -> Decomposition:
    """Split ``model``'s representation of ``images [B, 3, H, W]`` into additive components.

    ``model``: what :func:`vitdecomp.load_model` returns, or the model object itself (timm, open_clip,
    a transformers vision tower, or a class registered with :func:`vitdecomp.register_adapter`).
    ``heads``: one component per attention head (else one per attention layer).
    ``tokens``: also split head contributions over source tokens (``True`` or a list of layer indices).
    ``start_layer``: blocks before it are folded into ``init``.
    ``representation``: which output to decompose (adapter-specific; ``None`` = the paper's).
    ``check``: raise if the relative completeness error of any image exceeds it
    (default by dtype: 1e-9 float64, 1e-4 float32, 1e-2 float16, 5e-2 bfloat16 — see
    ``vitdecomp.decomp.engine.COMPLETENESS_TOLERANCE``; ``0`` disables). Images with NaN / inf pixels
    raise :class:`~vitdecomp.errors.NonFiniteInputError` naming their batch positions.
    ``token_directions``: split over tokens (all layers unless ``tokens`` names some) but keep only
    each token's projection on these directions (``[k, D]`` for every head, or ``label -> [k, D]``
    per head): ``d.tokens[i].values`` is then
    ``[B, heads, N, k]``, pulled back through the frozen readout at about the cost of the forward
    (see :mod:`vitdecomp.decomp.directional`).
    """
    adapter, target = adapter_for(model.model if isinstance(model, LoadedModel) else model)

    def make_plan():
        return adapter.plan(target, start_layer=start_layer, representation=representation, heads=heads)

    directions = None if token_directions is None else TokenDirections(token_directions)
    tokens = True if directions is not None and tokens is False else tokens
    d = decompose_plan(make_plan, target, images, heads=heads, tokens=tokens, check=check, directions=directions)
    d.tokens = [replace(t, projected=True) for t in d.tokens] if directions is not None else d.tokens
    return d
