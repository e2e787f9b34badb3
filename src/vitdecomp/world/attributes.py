"""The world's attribute vocabularies (a leaf module: the generator, the captions and the zoo read it).

Every value is also the natural-language word for it; a scene's categorical attribute is stored as
an index into its vocabulary.
"""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
PATTERNS = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = ("grass", "sand", "snow", "water", "sky")
SIZES = ("small", "large")

ATTRIBUTES: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "color": list(COLORS),
    "pattern": list(PATTERNS),
    "background": list(BACKGROUNDS),
    "size": list(SIZES),
}
#: The four attributes the zoo is trained and probed on.
CORE_ATTRIBUTES = ("shape", "color", "pattern", "background")
