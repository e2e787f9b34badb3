"""What the parts let a user do: token heatmaps along text directions and retrieval through chosen
components. One contract per kind: a token map is a callable ``(model, images, direction) -> [B, H, W]``
(:class:`DirectionalTokenMap`); retrieval ranks an analysed image set (:mod:`vitdecomp.apps.retrieval`)."""

from vitdecomp.apps.pixels import InputGeometry, input_geometry, place_tokens
from vitdecomp.apps.token_maps import DirectionalTokenMap, TokenMaps, pull_back, token_maps

__all__ = [
    "DirectionalTokenMap",
    "InputGeometry",
    "TokenMaps",
    "input_geometry",
    "place_tokens",
    "pull_back",
    "token_maps",
]
