"""``hf:`` names: transformers vision towers, loaded with their own image processor.

``hf:ORG/REPO`` (``@REVISION`` optional) is read from the Hugging Face Hub, or from its local cache
offline; ``hf:PATH`` is a folder written by ``save_pretrained`` (``config.json``, the weights, and the
image processor's ``preprocessor_config.json``; a relative path starts with ``./``). The class loaded
is the vision tower of the checkpoint (:data:`TOWERS`: a CLIP or SigLIP checkpoint gives its image
tower, ``CLIPVisionModelWithProjection`` / ``SiglipVisionModel``); ``checkpoint=FILE`` replaces the
weights with a local file (safetensors, or a torch file transformers reads with ``weights_only``).

Imports transformers only when called; imports nothing of the loader's scheme table (which calls it).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitdecomp.errors import CheckpointError, UsageError, WeightsUnavailableError, one_line
from vitdecomp.models.loaded import LoadedModel, file_digest

HF_PREFIX = "hf:"

#: ``config.model_type`` -> the vision tower class loaded for it (an ``architectures`` entry naming
#: one of these classes wins, e.g. ``CLIPVisionModelWithProjection`` for a ``clip_vision_model``).
TOWERS = {
    "vit": "ViTModel",
    "deit": "DeiTModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "dinov3_vit": "DINOv3ViTModel",
    "clip_vision_model": "CLIPVisionModel",
    "clip": "CLIPVisionModelWithProjection",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip": "SiglipVisionModel",
}

#: Weights files of a ``save_pretrained`` folder, the first found identifies the weights.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

_REPO = re.compile(r"^[\w.-]+(/[\w.-]+)?(@[\w./-]+)?$")


def is_local(spec: str) -> bool:
    """Whether ``spec`` names a folder (an absolute / ``./`` / ``~`` path, or an existing folder)."""
    return spec.startswith(("/", "./", "../", "~")) or Path(spec).expanduser().is_dir()


def check_hf_name(spec: str) -> None:
    """Refuse an ``hf:`` name that cannot load (:class:`UsageError`, one line) without loading it."""
    if not spec.strip():
        raise UsageError("empty hf: name: give hf:ORG/REPO or hf:PATH (a save_pretrained folder)")
    if is_local(spec):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise UsageError(f"hf:{spec}: no such folder")
        if not (folder / "config.json").is_file():
            raise UsageError(f"hf:{spec}: not a save_pretrained folder (no config.json in it)")
    elif not _REPO.match(spec):
        raise UsageError(f"hf:{spec}: name a Hugging Face repository as hf:ORG/REPO (or a folder as hf:./PATH)")


@dataclass
class HFImageTransform:
    """The model's own image processor as a transform: a PIL image -> ``[3, H, W]``. ``transforms``:
    its geometric steps as torchvision equivalents (resize, centre crop), which is what maps token
    footprints back onto the original image; a step it cannot name is left as itself."""

    processor: Any

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImageTransform({' '.join(self.processor.to_json_string().split())})"

    @property
    def transforms(self) -> list[Any]:
        from torchvision import transforms as tv

        p, steps = self.processor, []
        if getattr(p, "do_resize", False):
            h, w, short = (_size(p.size, k) for k in ("height", "width", "shortest_edge"))
            steps.append(tv.Resize((h, w)) if h and w else tv.Resize(short) if short else self)
        if getattr(p, "do_center_crop", False):
            steps.append(tv.CenterCrop((_size(p.crop_size, "height"), _size(p.crop_size, "width"))))
        if getattr(p, "do_pad", False):
            steps.append(self)
        return steps


def _size(size: Any, key: str) -> int | None:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def load_hf(spec: str, pretrained: bool, checkpoint: Path | None, *, offline: bool, **kwargs: Any) -> LoadedModel:
    """Load ``hf:spec`` (see the module's docstring); ``offline``: the Hub cannot be reached, so a
    repository not in the local cache fails at once with a one-line :class:`WeightsUnavailableError`."""
    check_hf_name(spec)
    local = is_local(spec)
    source, revision = (str(Path(spec).expanduser()), None) if local else _split_revision(spec)
    if not local and offline:
        _require_cached(spec, source, revision)
    try:
        config, processor = _config_and_processor(spec, source, revision)
        model = _model(config, source, revision, pretrained, checkpoint, **kwargs)
    except (UsageError, CheckpointError, WeightsUnavailableError):
        raise
    except OSError as err:
        if local:
            raise CheckpointError(f"hf:{spec}: cannot load the folder ({one_line(err)[:200]})") from err
        raise _unavailable(spec, source, f"the download failed ({one_line(err)[:160]})") from err
    return LoadedModel(
        model=model,
        preprocess=HFImageTransform(processor),
        name=f"{HF_PREFIX}{spec}",
        source="transformers",
        weights_id=_weights_id(spec, source, local, pretrained, checkpoint),
        info={"image_size": _pair(config.image_size), "model_type": config.model_type, "class": type(model).__name__},
    )


def _split_revision(spec: str) -> tuple[str, str | None]:
    repo, _, revision = spec.partition("@")
    return repo, revision or None


def _require_cached(spec: str, repo: str, revision: str | None) -> None:
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
        raise _unavailable(spec, repo, "this machine is offline (no network or HF_HUB_OFFLINE)")


def _unavailable(spec: str, repo: str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"hf:{spec}: the Hugging Face repository '{repo}' is not in the local cache and {why}: on a machine "
        f"with network run `hf download {repo} --local-dir DIR` (or save_pretrained the model and its image "
        "processor into DIR), copy DIR here and pass --model hf:/path/to/DIR (Python: load_model('hf:/path/to/DIR')); "
        "with the repository's config cached, a weights file alone goes with --checkpoint FILE"
    )


def _config_and_processor(spec: str, source: str, revision: str | None) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(source, revision=revision)
    try:
        processor = AutoImageProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"hf:{spec} has no image processor (preprocessor_config.json): save the model's own beside it "
            f"with AutoImageProcessor.from_pretrained(...).save_pretrained(...) ({one_line(err)[:120]})"
        ) from err
    return config, processor


def tower_class(config: Any) -> type:
    """The vision tower class for a checkpoint's config (:data:`TOWERS`; else ``AutoModel``'s choice,
    which :func:`vitdecomp.decompose` refuses by class unless a plug-in covers it)."""
    import transformers

    names = [a for a in (getattr(config, "architectures", None) or []) if a in TOWERS.values()]
    name = names[0] if names else TOWERS.get(config.model_type)
    return transformers.MODEL_MAPPING[type(config)] if name is None else getattr(transformers, name)


def _model(config: Any, source: str, revision: str | None, pretrained: bool, checkpoint: Path | None, **kwargs: Any):
    cls = tower_class(config)
    if not pretrained and checkpoint is None:
        return cls(config)
    if checkpoint is None:
        return cls.from_pretrained(source, revision=revision, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:  # the config of the name, the weights of the file
        config.save_pretrained(tmp)
        name = "model.safetensors" if checkpoint.suffix == ".safetensors" else "pytorch_model.bin"
        (Path(tmp) / name).symlink_to(checkpoint.resolve())
        try:
            return cls.from_pretrained(tmp, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {checkpoint} does not fit {cls.__name__} ({one_line(err)[:160]}) (--checkpoint)"
            ) from err


def _weights_id(spec: str, source: str, local: bool, pretrained: bool, checkpoint: Path | None) -> str:
    name = f"{HF_PREFIX}{spec}"
    if checkpoint is not None:
        return f"{name}@file:{file_digest(checkpoint)}"
    if not pretrained:
        return f"{name}@random-init"
    if local:
        weights = next((Path(source) / f for f in HF_WEIGHTS if (Path(source) / f).is_file()), None)
        return f"{name}@file:{file_digest(weights)}" if weights else f"{name}@pretrained"
    return f"{name}@{_cached_commit(source) or 'pretrained'}"


def _cached_commit(repo: str) -> str | None:
    """The commit of the cached snapshot (``.../snapshots/<commit>/config.json``), if any."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, "config.json")
    return Path(path).parent.name if isinstance(path, str) else None


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
