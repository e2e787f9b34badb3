"""Which adapter decomposes which model class."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from vitdecomp.decompose import Plan
from vitdecomp.errors import UnsupportedModuleError


class Adapter(Protocol):
    family: str
    model_types: tuple[type, ...]

    def plan(self, model: nn.Module, *, start_layer: int, representation: str | None, heads: bool) -> Plan: ...


def _adapters() -> list[Adapter]:
    from vitdecomp.models.maxvit import MaxViTAdapter
    from vitdecomp.models.openclip import OpenClipAdapter
    from vitdecomp.models.swin import SwinAdapter
    from vitdecomp.models.vit import TimmViTAdapter

    return [TimmViTAdapter(), OpenClipAdapter(), SwinAdapter(), MaxViTAdapter()]


def adapter_for(model: nn.Module) -> tuple[Adapter, nn.Module]:
    """The adapter for ``model`` and the module it decomposes (an open_clip CLIP's ``visual``).

    Classes are matched exactly: a subclass may change the forward pass, so it needs its own rule.
    """
    target = model
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and hasattr(model, "encode_image"):
        target = visual
    for adapter in _adapters():
        if type(target) in adapter.model_types:
            return adapter, target
    known = ", ".join(t.__name__ for a in _adapters() for t in a.model_types)
    raise UnsupportedModuleError("", target, f"no adapter for this model class (supported: {known})")


def supported_families() -> list[str]:
    return [a.family for a in _adapters()]
