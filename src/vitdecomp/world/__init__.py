"""vitdecomp's built-in world: generated scenes with known attributes and object masks.

>>> from vitdecomp.world import make_scenes, ATTRIBUTES
>>> s = make_scenes(8, seed=0)          # images uint8 [8, 64, 64, 3], masks bool [8, 64, 64]
>>> s.words("shape")[:2], s.captions[0]
"""

from vitdecomp.world.attributes import ATTRIBUTES, CORE_ATTRIBUTES
from vitdecomp.world.captions import BACKGROUND_PHRASES, PROMPTS, all_captions, caption, prompt_texts
from vitdecomp.world.export import export_waterbirds, export_world
from vitdecomp.world.scenes import Scenes, make_scenes
from vitdecomp.world.waterbirds import LAND, WATER, WATERBIRD_SHAPES, Waterbirds, make_waterbirds

__all__ = [
    "ATTRIBUTES",
    "BACKGROUND_PHRASES",
    "CORE_ATTRIBUTES",
    "LAND",
    "PROMPTS",
    "WATER",
    "WATERBIRD_SHAPES",
    "Scenes",
    "Waterbirds",
    "all_captions",
    "caption",
    "export_waterbirds",
    "export_world",
    "make_scenes",
    "make_waterbirds",
    "prompt_texts",
]
