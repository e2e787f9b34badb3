"""Which adapter decomposes which model class: keyed by type, a library's adapters imported only when
that library is loaded, each adapter made once.

Classes are matched exactly: a subclass may change the forward pass, so it needs its own rule.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Protocol

from torch import nn

from vitdecomp.decomp.plan import Plan
from vitdecomp.errors import UnsupportedModuleError


class Adapter(Protocol):
    family: str

    def plan(self, model: nn.Module, *, start_layer: int, representation: str | None, heads: bool) -> Plan: ...


#: (module defining the model class, class name) -> (adapter module, adapter class). The adapter module
#: is imported only when the model's own library already is (it imports that library itself).
ADAPTERS: dict[tuple[str, str], tuple[str, str]] = {
    ("timm.models.vision_transformer", "VisionTransformer"): ("vitdecomp.models.vit", "TimmViTAdapter"),
    ("timm.models.deit", "VisionTransformerDistilled"): ("vitdecomp.models.vit", "DistilledViTAdapter"),
    ("timm.models.eva", "Eva"): ("vitdecomp.models.eva", "EvaAdapter"),
    ("timm.models.beit", "Beit"): ("vitdecomp.models.beit", "BeitAdapter"),
    ("timm.models.swin_transformer", "SwinTransformer"): ("vitdecomp.models.swin", "SwinAdapter"),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2"): ("vitdecomp.models.swin", "SwinV2Adapter"),
    ("timm.models.maxxvit", "MaxxVit"): ("vitdecomp.models.maxvit", "MaxViTAdapter"),
    ("open_clip.transformer", "VisionTransformer"): ("vitdecomp.models.openclip", "OpenClipAdapter"),
    ("transformers.models.vit.modeling_vit", "ViTModel"): ("vitdecomp.models.hf", "HFViTAdapter"),
    ("transformers.models.deit.modeling_deit", "DeiTModel"): ("vitdecomp.models.hf", "HFDeiTAdapter"),
    ("transformers.models.dinov2.modeling_dinov2", "Dinov2Model"): ("vitdecomp.models.hf", "HFDinov2Adapter"),
    ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers", "Dinov2WithRegistersModel"): (
        "vitdecomp.models.hf",
        "HFDinov2RegistersAdapter",
    ),
    ("transformers.models.dinov3_vit.modeling_dinov3_vit", "DINOv3ViTModel"): (
        "vitdecomp.models.hf",
        "HFDINOv3Adapter",
    ),
    ("transformers.models.clip.modeling_clip", "CLIPVisionModel"): ("vitdecomp.models.hf", "HFCLIPVisionAdapter"),
    ("transformers.models.clip.modeling_clip", "CLIPVisionModelWithProjection"): (
        "vitdecomp.models.hf",
        "HFCLIPVisionProjectionAdapter",
    ),
    ("transformers.models.siglip.modeling_siglip", "SiglipVisionModel"): (
        "vitdecomp.models.hf",
        "HFSiglipVisionAdapter",
    ),
}


@functools.cache
def _adapter(module: str, name: str) -> Adapter:
    return getattr(importlib.import_module(module), name)()


def registered_types() -> list[type]:
    """The model classes with an adapter, among the libraries loaded so far."""
    out = []
    for mod, cls in ADAPTERS:
        lib = sys.modules.get(mod)
        if lib is not None and hasattr(lib, cls):
            out.append(getattr(lib, cls))
    return out


def target_of(model: nn.Module) -> nn.Module:
    """The module to decompose: an open_clip CLIP's ``visual``, else the model itself."""
    visual = getattr(model, "visual", None)
    return visual if isinstance(visual, nn.Module) and hasattr(model, "encode_image") else model


def adapter_for(model: nn.Module) -> tuple[Adapter, nn.Module]:
    """The adapter for ``model`` and the module it decomposes."""
    target = target_of(model)
    key = (type(target).__module__, type(target).__qualname__)
    if key not in ADAPTERS:
        known = ", ".join(f"{m}.{c}" for m, c in ADAPTERS)
        raise UnsupportedModuleError("", target, f"no adapter for this model class (supported: {known})")
    return _adapter(*ADAPTERS[key]), target


def supported_families() -> list[str]:
    return sorted({_adapter(*v).family for v in ADAPTERS.values()})
