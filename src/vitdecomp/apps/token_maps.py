"""Token maps: where in an image the heads write along a direction, at about the cost of one forward.

A token map is a callable ``(model, images [B, 3, H, W], direction) -> [B, H, W]``: relevance in the
model's input pixels, the same shape GradCAM-style baselines return (:class:`DirectionalTokenMap`).
Underneath, :func:`token_maps` gives every head's per-source-token projection on ``k`` directions
(:class:`TokenMaps`), pulled back through the aligner map and the frozen readout
(:mod:`vitdecomp.decomp.directional`) instead of materialising ``[heads x tokens x D]``.

Directions live in CLIP space (text or image embeddings). A component's aligned contribution is
``W_i c_i``, so a CLIP-space direction ``t`` reads the model-space contribution along ``W_i^T t``
(:func:`pull_back`); CLIP subjects use the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vitdecomp.align import Aligner
from vitdecomp.api import decompose
from vitdecomp.apps.pixels import place_tokens
from vitdecomp.components import ComponentLabel, Decomposition
from vitdecomp.errors import UsageError

#: Head selection: ``None`` = every head, else a predicate on labels or a collection of names.
HeadSelection = Callable[[ComponentLabel], bool] | Sequence[str] | None


def pull_back(aligner: Aligner | None, directions: Tensor) -> Tensor | Callable[[ComponentLabel], Tensor]:
    """CLIP-space ``directions [k, d_clip]`` as model-space directions: ``[k, D]`` (identity or shared
    map), or per component ``label -> W_i^T t [k, D]`` (CompAlign)."""
    t = directions.float()
    if aligner is None or aligner.weight is None:
        return t
    weight = aligner.weight.float().cpu()
    if aligner.mode == "shared":
        return t @ weight[0]
    index = {name: i for i, name in enumerate(aligner.labels)}
    return lambda label: t @ weight[index[label.name]]


@dataclass
class TokenMaps:
    """Per-head, per-token projections on ``k`` directions, one entry per token grid (stage).

    ``values[s] [B, H_s, N_s, k]`` (stream order), ``labels[s]`` the heads, ``boxes[s] [N_s, 4]`` the
    tokens' pixel boxes in the model input of size ``input_size``, ``prefix[s]`` leading tokens
    without a place (class / register tokens).
    """

    values: list[Tensor]
    labels: list[list[ComponentLabel]]
    boxes: list[Tensor]
    prefix: list[int]
    input_size: tuple[int, int]
    decomposition: Decomposition | None = None

    @classmethod
    def of(cls, d: Decomposition, input_size: tuple[int, int]) -> TokenMaps:
        """The token stacks of a decomposition made with ``token_directions``."""
        return cls(
            values=[t.values for t in d.tokens],
            labels=[list(t.labels) for t in d.tokens],
            boxes=[t.pixel_boxes for t in d.tokens],
            prefix=[t.num_prefix_tokens for t in d.tokens],
            input_size=tuple(input_size),
            decomposition=d,
        )

    @property
    def heads(self) -> list[str]:
        return [lab.name for labs in self.labels for lab in labs]

    def select(self, heads: HeadSelection) -> list[Tensor]:
        """Per stage, the selected heads' projections summed ``[B, N_s, k]``; a head name these maps do
        not hold is a :class:`~vitdecomp.errors.UsageError`."""
        if isinstance(heads, str):
            heads = [heads]
        if heads is not None and not callable(heads):
            have = self.heads
            unknown = [h for h in heads if h not in have]
            if unknown:
                held = f"{have[0]} ... {have[-1]}" if have else "no head"
                raise UsageError(f"no token maps of head(s) {unknown}: these maps hold {held}")
        out = []
        for v, labs in zip(self.values, self.labels, strict=True):
            keep = [i for i, lab in enumerate(labs) if _wanted(lab, heads)]
            out.append(v[:, keep].sum(1) if keep else v.new_zeros(v.shape[0], v.shape[2], v.shape[3]))
        return out

    def pixels(
        self, heads: HeadSelection = None, rows: Sequence[int] | None = None, columns: Sequence[int] | None = None
    ) -> Tensor:
        """``[B, k, H, W]``: the selected heads' relevance on the input pixels (densities; prefix tokens
        left out), every stage's grid through its tokens' footprints; of the images ``rows`` and the
        directions ``columns`` only (default all: the same values as slicing the whole)."""
        per_stage = self.select(heads)
        if rows is not None:
            per_stage = [v[list(rows)] for v in per_stage]
        if columns is not None:
            per_stage = [v[:, :, list(columns)] for v in per_stage]
        b, k = per_stage[0].shape[0], per_stage[0].shape[2]
        out = per_stage[0].new_zeros(b, k, *self.input_size)
        for v, boxes, npre in zip(per_stage, self.boxes, self.prefix, strict=True):
            flat = v.permute(0, 2, 1).reshape(b * k, -1)
            out += place_tokens(flat, boxes, self.input_size, npre).view(b, k, *self.input_size)
        return out


def _wanted(label: ComponentLabel, heads: HeadSelection) -> bool:
    if heads is None:
        return True
    if callable(heads):
        return bool(heads(label))
    return label.name in heads


@torch.no_grad()
def token_maps(
    model: object,
    images: Tensor,
    directions: Tensor,
    *,
    aligner: Aligner | None = None,
    layers: Sequence[int] | None = None,
    start_layer: int = 0,
) -> TokenMaps:
    """Every head's per-token projection on CLIP-space ``directions [k, d_clip]`` (unit norm advised)
    for ``images [B, 3, H, W]`` (the model's preprocessed input), read through ``aligner`` (``None``:
    the model's own space, for CLIP subjects). ``layers``: only these blocks' heads (default all)."""
    dirs = pull_back(aligner, torch.as_tensor(directions).reshape(-1, torch.as_tensor(directions).shape[-1]))
    d = decompose(
        model,
        images,
        tokens=list(layers) if layers is not None else True,
        start_layer=start_layer,
        token_directions=dirs,
    )
    return TokenMaps.of(d, (images.shape[-2], images.shape[-1]))


class DirectionalTokenMap:
    """The token-map contract: ``tm(model, images, direction [d_clip]) -> [B, H, W]`` relevance in
    input pixels: the chosen heads' per-token contributions, aligned, projected on ``direction``.

    ``heads``: ``None`` (all), names, or a predicate on labels; ``aligner``: the model's CompAlign
    (``None`` for a CLIP subject read in its own space).
    """

    def __init__(self, heads: HeadSelection = None, aligner: Aligner | None = None) -> None:
        self.heads, self.aligner = heads, aligner

    def __call__(self, model: object, images: Tensor, direction: Tensor) -> Tensor:
        maps = token_maps(model, images, torch.as_tensor(direction).reshape(1, -1), aligner=self.aligner)
        return maps.pixels(self.heads)[:, 0]
