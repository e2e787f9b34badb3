"""Captions from attributes, in several phrasings, and prompt templates for zero-shot reading."""

from __future__ import annotations

from collections.abc import Mapping

from vitdecomp.world.attributes import ATTRIBUTES

#: Phrases for where the object is (several per background).
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on grass", "on the grass", "in a meadow"),
    "sand": ("on sand", "on the sand", "on a beach"),
    "snow": ("on snow", "in the snow", "on a snowfield"),
    "water": ("on water", "by the water", "on a lake"),
    "sky": ("in the sky", "against the sky", "in a blue sky"),
}
#: How a pattern reads as an adjective, and as "with ... <colour> ..." phrases.
PATTERN_ADJ = {"solid": "plain", "striped": "striped", "dotted": "dotted", "checkered": "checkered"}
PATTERN_WITH = {
    "solid": "in solid {c}",
    "striped": "with {c} stripes",
    "dotted": "with {c} dots",
    "checkered": "with a {c} checkered pattern",
}
_TEMPLATES = (
    "a {color} {padj} {shape} {where}",
    "a {shape} {pwith} {where}",
    "a photo of a {size} {color} {shape} with a {pattern} pattern, {where}",
    "{where_cap}, a {padj} {color} {shape}",
    "a {size} {padj} {shape}, {color}, {where}",
    "there is a {color} {shape} {where}; it is {pattern}",
)
N_TEMPLATES = len(_TEMPLATES)

#: Prompt templates per attribute for zero-shot classification ({} is the attribute word).
PROMPTS: dict[str, tuple[str, ...]] = {
    "shape": ("a {}", "a photo of a {}", "a {} on a background", "a picture of a {} shape"),
    "color": ("a {} object", "a {} shape", "something {}", "a photo of a {} thing"),
    "pattern": ("a {} object", "a {} shape", "an object with a {} pattern", "a photo of a {} thing"),
    "background": ("an object {}", "a shape {}", "a photo taken {}", "something {}"),
    "size": ("a {} object", "a {} shape", "a photo of a {} thing", "a {} thing"),
}


def _word(attr: str, value: int | str) -> str:
    return value if isinstance(value, str) else ATTRIBUTES[attr][int(value)]


def prompt_texts(attr: str, value: int | str) -> list[str]:
    """The zero-shot prompts for one attribute value (background words become their phrases)."""
    word = _word(attr, value)
    if attr == "background":
        return [t.format(p) for t in PROMPTS[attr] for p in BACKGROUND_PHRASES[word]]
    if attr == "pattern":
        word = PATTERN_ADJ[word] if word == "solid" else word
    return [t.format(word) for t in PROMPTS[attr]]


def caption(attrs: Mapping[str, int | str], choice: int = 0) -> str:
    """One caption of a scene; ``choice`` picks the phrasing (template and background phrase)."""
    w = {k: _word(k, attrs[k]) for k in ("shape", "color", "pattern", "background")}
    size = _word("size", attrs["size"]) if "size" in attrs else "medium"
    phrases = BACKGROUND_PHRASES[w["background"]]
    t = _TEMPLATES[choice % N_TEMPLATES]
    where = phrases[(choice // N_TEMPLATES) % len(phrases)]
    return t.format(
        color=w["color"],
        shape=w["shape"],
        pattern=w["pattern"],
        padj=PATTERN_ADJ[w["pattern"]],
        pwith=PATTERN_WITH[w["pattern"]].format(c=w["color"]),
        where=where,
        where_cap=where[0].upper() + where[1:],
        size=size,
    )


def all_captions(attrs: Mapping[str, int | str]) -> list[str]:
    """Every phrasing of one scene's caption."""
    n = N_TEMPLATES * max(len(p) for p in BACKGROUND_PHRASES.values())
    return sorted({caption(attrs, i) for i in range(n)})
