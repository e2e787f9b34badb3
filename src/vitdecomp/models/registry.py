"""Which adapter decomposes which model class: keyed by type, a library's adapters imported only when
that library is loaded, each adapter made once.

Classes are matched exactly: a subclass may change the forward pass, so it needs its own rule.

Plug-ins: another package registers an adapter for its own class without editing vitdecomp, either at
run time (:func:`register_adapter`) or through the entry-point group :data:`ENTRY_POINT_GROUP`, whose
entry names are the model classes' dotted paths and whose values are the adapters::

    [project.entry-points."vitdecomp.adapters"]
    "mypkg.models.MyViT" = "mypkg.vitdecomp_adapter:MyViTAdapter"

An entry point is read, and its adapter imported, only when a model of that class is decomposed. A
class registered at run time wins over vitdecomp's own adapters; an entry point is used only for a
class vitdecomp has no adapter for. :func:`vitdecomp.testing.check_adapter` holds a plug-in to the
same standard as the adapters shipped here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import sys
from typing import Protocol, runtime_checkable

from torch import nn

from vitdecomp.decomp.plan import Plan
from vitdecomp.errors import UnsupportedModuleError, UsageError, VitDecompError, one_line

#: The entry-point group plug-in packages register adapters in (name: the model class's dotted path).
ENTRY_POINT_GROUP = "vitdecomp.adapters"


@runtime_checkable
class Adapter(Protocol):
    """Says where a model's parts are: ``plan`` returns a :class:`~vitdecomp.decomp.plan.Plan` made
    only of declarations (see docs/adding-a-family.md); ``family`` names it in results."""

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
    ("open_clip.timm_model", "TimmModel"): ("vitdecomp.models.openclip_timm", "OpenClipTimmAdapter"),
    ("timm.models.naflexvit", "NaFlexVit"): ("vitdecomp.models.naflex", "NaFlexVitAdapter"),
    ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2Cr"): ("vitdecomp.models.swin", "SwinV2CrAdapter"),
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


#: Adapters registered at run time or loaded from an entry point, keyed by the exact model class.
_PLUGINS: dict[type, Adapter] = {}


def register_adapter(model_class: type, adapter: Adapter | type) -> None:
    """Decompose models of exactly ``model_class`` with ``adapter`` (an instance, or a class made once
    here); replaces any adapter the class had, vitdecomp's own included."""
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module):
        raise UsageError(f"register_adapter: {model_class!r} is not an nn.Module class")
    made = adapter() if isinstance(adapter, type) else adapter
    if not isinstance(made, Adapter) or not isinstance(made.family, str):
        raise UsageError(
            f"register_adapter: {adapter!r} is not an adapter (it needs a str 'family' and a "
            "plan(model, *, start_layer, representation, heads) method)"
        )
    _PLUGINS[model_class] = made


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def plugin_names() -> list[str]:
    """Dotted paths of the classes with a plug-in adapter: registered at run time or named by an
    installed package's entry point (not imported)."""
    names = {_dotted(cls) for cls in _PLUGINS}
    names.update(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _entry_point_adapter(cls: type) -> Adapter | None:
    """The adapter an installed package's entry point names for ``cls`` (registered on first use)."""
    name = _dotted(cls)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name != name:
            continue
        dist = getattr(ep.dist, "name", "?")
        try:
            register_adapter(cls, ep.load())
        except Exception as err:
            raise VitDecompError(
                f"the adapter plug-in '{ep.value}' (package {dist}, entry point '{name}' in group "
                f"'{ENTRY_POINT_GROUP}') cannot be loaded: {type(err).__name__}: {one_line(err)[:200]}"
            ) from err
        return _PLUGINS[cls]
    return None


def registered_types() -> list[type]:
    """The model classes with an adapter, among the libraries loaded so far (plug-ins registered at
    run time or already loaded included)."""
    out = list(_PLUGINS)
    for mod, cls in ADAPTERS:
        lib = sys.modules.get(mod)
        if lib is not None and hasattr(lib, cls) and getattr(lib, cls) not in out:
            out.append(getattr(lib, cls))
    return out


def target_of(model: nn.Module) -> nn.Module:
    """The module to decompose: an open_clip CLIP's ``visual``, else the model itself."""
    visual = getattr(model, "visual", None)
    return visual if isinstance(visual, nn.Module) and hasattr(model, "encode_image") else model


def adapter_for(model: nn.Module) -> tuple[Adapter, nn.Module]:
    """The adapter for ``model`` and the module it decomposes: a run-time registration, vitdecomp's
    own, or an installed plug-in's entry point, in that order."""
    target = target_of(model)
    cls = type(target)
    if cls in _PLUGINS:
        return _PLUGINS[cls], target
    key = (cls.__module__, cls.__qualname__)
    if key in ADAPTERS:
        return _adapter(*ADAPTERS[key]), target
    plugin = _entry_point_adapter(cls)
    if plugin is None:
        known = ", ".join([f"{m}.{c}" for m, c in ADAPTERS] + [_dotted(c) for c in _PLUGINS])
        raise UnsupportedModuleError(
            "",
            target,
            f"no adapter for this model class (supported: {known}; to add one see docs/adding-a-family.md)",
        )
    return plugin, target


def supported_families() -> list[str]:
    return sorted({_adapter(*v).family for v in ADAPTERS.values()} | {a.family for a in _PLUGINS.values()})
