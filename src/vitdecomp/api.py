"""The public entry point: :func:`decompose` any supported model (the registry picks its adapter)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from torch import Tensor, nn

from vitdecomp.components import ComponentLabel, Decomposition
from vitdecomp.decomp.directional import TokenDirections
from vitdecomp.decomp.engine import decompose_plan
from vitdecomp.errors import InputError
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.models.registry import adapter_for


def decompose(
    model: nn.Module | object,
    images: Tensor | Mapping[str, Tensor],
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
    ``images``: or the mapping of tensors the model's forward takes (timm ``NaFlexVit``'s ``patches`` /
    ``patch_coord`` / ``patch_valid``: padding tokens contribute nothing).
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
    Images that do not fit the model raise :class:`~vitdecomp.errors.InputError` naming the expected
    input (:func:`check_images`) before the forward pass.
    """
    adapter, target = adapter_for(model.model if isinstance(model, LoadedModel) else model)
    check_images(target, images)

    def make_plan():
        return adapter.plan(target, start_layer=start_layer, representation=representation, heads=heads)

    directions = None if token_directions is None else TokenDirections(token_directions)
    tokens = True if directions is not None and tokens is False else tokens
    d = decompose_plan(make_plan, target, images, heads=heads, tokens=tokens, check=check, directions=directions)
    d.tokens = [replace(t, projected=True) for t in d.tokens] if directions is not None else d.tokens
    return d


def check_images(net: nn.Module, images: object) -> None:
    """Refuse, naming the expected input, what the model cannot run: not a tensor ``[B, C, H, W]``, an
    empty batch, weights on the meta device, other channels than its first convolution takes, or
    another size than a fixed-size patch embedding (timm's strict ``img_size``, open_clip's
    ``image_size``) takes. A mapping of the model's own inputs (NaFlex) is checked for its batch only."""
    if isinstance(images, Mapping):
        _check_input_mapping(net, images)
        return
    channels, size = expected_input(net)
    want = f"[B, {channels or 'C'}, {size[0] if size else 'H'}, {size[1] if size else 'W'}]"
    if not isinstance(images, Tensor):
        raise InputError(f"images must be a tensor {want}, not a {type(images).__name__}")
    shape = tuple(images.shape)
    if images.dim() != 4:
        one = " (one image: images[None])" if images.dim() == 3 else ""
        raise InputError(f"images of shape {list(shape)}: give a batch {want}{one}")
    if shape[0] == 0:
        raise InputError(f"an empty batch of images {list(shape)}: give at least one image {want}")
    if images.is_meta or any(p.is_meta for p in net.parameters()):
        raise InputError(
            f"{type(net).__name__} has weights on the meta device (not loaded): load them, e.g. "
            "model.to_empty(device='cpu') then load_state_dict, or vitdecomp.load_model"
        )
    if channels is not None and shape[1] != channels:
        raise InputError(f"images of shape {list(shape)} have {shape[1]} channel(s): {type(net).__name__} takes {want}")
    if size is not None and tuple(shape[2:]) != size:
        raise InputError(
            f"images of {shape[2]}x{shape[3]} pixels: {type(net).__name__} takes {size[0]}x{size[1]}, {want} "
            "(its preprocessing resizes images to it: loaded.preprocess)"
        )


def _check_input_mapping(net: nn.Module, inputs: Mapping) -> None:
    """A mapping of the tensors the model's forward takes: tensors with one non-empty batch, real weights."""
    bad = [k for k, t in inputs.items() if not isinstance(t, Tensor)]
    if not inputs or bad:
        raise InputError(f"the input mapping must hold tensors of the model's forward (not {bad or 'nothing'})")
    sizes = {k: len(t) if t.dim() else 0 for k, t in inputs.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise InputError(f"the input tensors need one non-empty batch size, got {sizes}")
    if any(p.is_meta for p in net.parameters()):
        raise InputError(f"{type(net).__name__} has weights on the meta device (not loaded): load them")


def expected_input(net: nn.Module) -> tuple[int | None, tuple[int, int] | None]:
    """``(channels, (H, W))`` the model takes, each ``None`` when it cannot be read off the modules:
    the channels of its first convolution; the size of a patch embedding that fixes it (timm's
    ``img_size`` with ``strict_img_size``, open_clip's ``image_size`` with a fixed position table)."""
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else None
    for m in net.modules():
        if getattr(m, "strict_img_size", False) and not getattr(m, "dynamic_img_pad", False) and hasattr(m, "img_size"):
            return channels, _pair(m.img_size)
        if hasattr(m, "positional_embedding") and hasattr(m, "image_size") and hasattr(m, "conv1"):
            return channels, _pair(m.image_size)  # open_clip's VisionTransformer
    return channels, None


def _pair(size: object) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)  # type: ignore[union-attr]
