"""Load timm / open_clip / zoo models with their own preprocessing, offline-friendly.

Names (one scheme table, :data:`_SCHEMES`; :func:`check_name` checks a name without loading it):
  ``deit_base_patch16_224``, ``vit_base_patch16_224.dino``, ... timm names (kwargs go to
      ``timm.create_model``)
  ``hf-hub:ORG/REPO`` / ``local-dir:PATH``  timm's own Hub and local-folder names (a folder holding
      ``open_clip_config.json`` is open_clip's)
  ``open_clip:ViT-B-16/laion2b_s34b_b88k`` (or ``open_clip:ViT-B-16`` with ``pretrained=False``),
      ``open_clip:hf-hub:ORG/REPO``, ``open_clip:local-dir:PATH``
  ``zoo:deit``, ``zoo:clip``, ...           the models shipped with vitdecomp
  ``hf:ORG/REPO`` / ``hf:PATH``             a transformers vision tower (ViT, DeiT, DINOv2/v3, CLIP, SigLIP)
      from the Hub or a ``save_pretrained`` folder, with its own image processor
      (:mod:`vitdecomp.models.hf_load`)
A local checkpoint (safetensors, or a torch file read with ``weights_only``) is given with
``checkpoint=PATH`` and is loaded through timm's / open_clip's own pretrained-loading code.

Offline (``HF_HUB_OFFLINE`` set, or the Hub unreachable within :data:`NETWORK_TIMEOUT_S`), the Hub
is not retried: weights come from the local Hugging Face cache or the load fails at once with
:class:`WeightsUnavailableError` naming the repository, the file and the ``--checkpoint`` flag.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from vitdecomp.errors import CheckpointError, UsageError, VitDecompError, WeightsUnavailableError, one_line
from vitdecomp.models.hf_load import HF_PREFIX, check_hf_name, is_local, load_hf
from vitdecomp.models.loaded import LoadedModel, file_digest
from vitdecomp.zoo.hub import load_zoo_model

__all__ = ["OPEN_CLIP_PREFIX", "ZOO_PREFIX", "LoadedModel", "check_name", "file_digest", "hub_offline", "load_model"]

OPEN_CLIP_PREFIX = "open_clip:"
ZOO_PREFIX = "zoo:"
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
#: Seconds to wait for the Hugging Face Hub before treating the machine as offline.
NETWORK_TIMEOUT_S = 3.0


def load_model(
    name: str,
    pretrained: bool = True,
    *,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> LoadedModel:
    """Create a model by name, load its weights, and return it with its preprocessing.

    ``pretrained=False`` gives random-init weights; ``checkpoint`` loads a local file instead of
    the hub. Raises :class:`WeightsUnavailableError` (with instructions) when the weights cannot be
    had offline and :class:`CheckpointError` when a checkpoint does not fit the architecture.
    """
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"checkpoint file not found: {checkpoint} (--checkpoint)")
    loader, spec = _loader_for(name)
    if pretrained and checkpoint is None and hub_offline():
        _go_offline()
    try:
        loaded = loader(spec, pretrained, checkpoint, **kwargs)
    except VitDecompError:
        raise
    except Exception as err:
        if checkpoint is None or isinstance(err, TypeError):
            raise
        raise CheckpointError(
            f"cannot load checkpoint {checkpoint} into {name} ({type(err).__name__}: {one_line(err)[:160]}); "
            "is it a weights file of this model (--checkpoint)?"
        ) from err
    loaded.model.eval()
    return loaded.to(device)


def _loader_for(name: str) -> tuple[Callable[..., LoadedModel], str]:
    """The loader of a name's scheme (see :data:`_SCHEMES`; timm for a plain name) and the name its
    library reads (``zoo:``/``open_clip:`` stripped; ``hf-hub:``/``local-dir:`` kept, as timm and
    open_clip read them)."""
    if name.startswith(LOCAL_DIR_PREFIX) and (Path(name[len(LOCAL_DIR_PREFIX) :]) / "open_clip_config.json").is_file():
        return _load_open_clip, name
    for prefix, (loader, strip) in _SCHEMES.items():
        if name.startswith(prefix):
            return loader, name[len(prefix) :] if strip else name
    return _load_timm, name


def check_name(name: str, pretrained: bool = True, checkpoint: str | Path | None = None) -> None:
    """Refuse a model name that cannot load (:class:`UsageError`, one line) without loading it:
    an unknown zoo / timm / open_clip name, an open_clip name without its weights tag, a missing
    ``local-dir:`` folder."""
    if not name or not name.strip():
        raise UsageError(
            "empty model name: give a timm name, hf-hub:ORG/REPO, open_clip:ARCH/TAG, hf:ORG/REPO or zoo:NAME"
        )
    if name.startswith(HF_PREFIX):
        check_hf_name(name[len(HF_PREFIX) :])
        return
    if name.startswith(ZOO_PREFIX):
        from vitdecomp.zoo.models import ZOO_NAMES

        if name[len(ZOO_PREFIX) :] not in ZOO_NAMES:
            raise UsageError(f"unknown zoo model {name!r}: the zoo has {', '.join(ZOO_PREFIX + n for n in ZOO_NAMES)}")
        return
    spec = name[len(OPEN_CLIP_PREFIX) :] if name.startswith(OPEN_CLIP_PREFIX) else name
    if spec.startswith(LOCAL_DIR_PREFIX):
        if not Path(spec[len(LOCAL_DIR_PREFIX) :]).is_dir():
            raise UsageError(f"{name}: no such folder")
        return
    if spec.startswith(HF_HUB_PREFIX):
        if "/" not in spec[len(HF_HUB_PREFIX) :].strip("/"):
            raise UsageError(f"{name}: name the Hub repository as hf-hub:ORG/REPO")
        return
    if name.startswith(OPEN_CLIP_PREFIX):
        _check_open_clip(spec, pretrained and checkpoint is None)
    else:
        _check_timm(name)


def _check_timm(name: str) -> None:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise UsageError(
            f"unknown model {name!r}: not a timm model name (see timm.list_models()); open_clip models are "
            f"named '{OPEN_CLIP_PREFIX}ARCH/TAG', shipped ones 'zoo:NAME', Hub ones '{HF_HUB_PREFIX}ORG/REPO'"
        )


def _check_open_clip(spec: str, need_tag: bool) -> None:
    import open_clip

    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        raise UsageError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    tags = [t for a, t in open_clip.list_pretrained() if a == arch]
    if need_tag and not tag:
        raise UsageError(
            f"say which open_clip weights: '{OPEN_CLIP_PREFIX}{arch}/TAG' with TAG in {tags}, "
            "or --random-init for random weights"
        )
    if need_tag and tag not in tags:
        raise UsageError(f"unknown open_clip weights {arch}/{tag}: TAG is one of {tags}")


@functools.cache
def hub_offline() -> bool:
    """Whether the Hugging Face Hub cannot be reached: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)
    set, or no connection to ``$HF_ENDPOINT`` within :data:`NETWORK_TIMEOUT_S` seconds."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), NETWORK_TIMEOUT_S):
            return False
    except OSError:
        return True


def _go_offline() -> None:
    """Make huggingface_hub read only its local cache (no retries against an unreachable Hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm and open_clip depend on it
        return
    constants.HF_HUB_OFFLINE = True


def _hub_state(offline: bool) -> str:
    """Why a file could not be fetched, for the messages of the weights and the tokenizer."""
    return "this machine is offline (no network or HF_HUB_OFFLINE)" if offline else "the download failed"


def _offline_error(what: str, repo: str | None, file: str, err: Exception) -> WeightsUnavailableError:
    """Offline: where to get the weights and the flag that loads them; online, the download's own error too."""
    where = f"file '{file}' of the Hugging Face repository '{repo}'" if repo else f"the weights file of {what}"
    offline = hub_offline()
    state = _hub_state(offline)
    cause = "" if offline else f" ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    return WeightsUnavailableError(
        f"pretrained weights of {what} are not in the local cache and {state}: download {where} elsewhere, "
        f"copy it here and pass it with --checkpoint FILE (Python: checkpoint=FILE), or use --random-init "
        f"for random weights{cause}"
    )


@contextlib.contextmanager
def _download_logs_held() -> Iterator[None]:
    """Hold the root logger's error records (open_clip logs a failed download there, naming a file it
    tried) while in the context: dropped when the block raises (its error says what to do), emitted
    as they came when it succeeds."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            held.append(record)
            return False
        return True

    root = logging.getLogger()
    root.addFilter(hold)
    try:
        yield
    finally:
        root.removeFilter(hold)
    for record in held:  # reached only without an exception
        root.handle(record)


def _load_hf(spec: str, pretrained: bool, checkpoint: Path | None, **kwargs: Any) -> LoadedModel:
    """A transformers vision tower (offline: from a folder or the local cache only; the config and the
    image processor come from there even for random or ``checkpoint`` weights)."""
    offline = not is_local(spec) and hub_offline()
    if offline:
        _go_offline()
    return load_hf(spec, pretrained, checkpoint, offline=offline, **kwargs)


def _load_zoo(spec: str, pretrained: bool, checkpoint: Path | None, **kwargs: Any) -> LoadedModel:
    """A shipped zoo model (``pretrained`` is not used: the zoo always loads its weights)."""
    return load_zoo_model(spec, checkpoint=checkpoint, **kwargs)


#: Weights files of a ``local-dir:`` folder, in the order timm / open_clip look for them.
LOCAL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _weights_id(name: str, pretrained: bool, checkpoint: Path | None, tag: str | None = None) -> str:
    if checkpoint is None and LOCAL_DIR_PREFIX in name:  # the folder's weights file identifies them
        folder = Path(name.split(LOCAL_DIR_PREFIX, 1)[1])
        checkpoint = next((folder / f for f in LOCAL_WEIGHTS if (folder / f).is_file()), None)
    if checkpoint is not None:
        return f"{name}@file:{file_digest(checkpoint)}"
    if not pretrained:
        return f"{name}@random-init"
    return f"{name}@{tag}" if tag else f"{name}@pretrained"


def _load_timm(name: str, pretrained: bool, checkpoint: Path | None, **kwargs: Any) -> LoadedModel:
    import timm

    if not name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        _check_timm(name)
    try:
        if checkpoint is not None:
            # timm's own pretrained loader, pointed at a local file (handles its checkpoint filters)
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)}, **kwargs)
        else:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "state_dict" in str(err) or "size mismatch" in str(err) or "Missing key" in str(err):
            raise CheckpointError(f"checkpoint {checkpoint} does not fit timm model {name!r}: {err}") from err
        raise
    except Exception as err:
        if pretrained and checkpoint is None and _looks_like_download_failure(err):
            raise _offline_error(f"timm model {name!r}", _timm_repo(name), "model.safetensors", err) from err
        raise
    overrides = {}
    if "img_size" in kwargs:  # the pretrained config still names the original size
        size = kwargs["img_size"]
        overrides["input_size"] = (3, *((size, size) if isinstance(size, int) else tuple(size)))
        overrides["crop_pct"] = 1.0
    data_cfg = timm.data.resolve_data_config(overrides, model=model)
    preprocess = timm.data.create_transform(**data_cfg, is_training=False)
    tag = getattr(model, "pretrained_cfg", {}).get("tag") if pretrained else None
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        name=name,
        source="timm",
        weights_id=_weights_id(name, pretrained, checkpoint, tag),
        info={"image_size": tuple(data_cfg["input_size"][1:]), "data_config": data_cfg},
    )


def _timm_repo(name: str) -> str | None:
    """The Hub repository timm would download ``name``'s weights from."""
    if name.startswith(HF_HUB_PREFIX):
        return name[len(HF_HUB_PREFIX) :].split("@")[0]
    try:
        import timm

        return getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or None
    except Exception:  # a name timm has no pretrained config for
        return None


def _load_open_clip(spec: str, pretrained: bool, checkpoint: Path | None, **kwargs: Any) -> LoadedModel:
    import open_clip

    if spec.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return _load_open_clip_named(spec, pretrained, checkpoint, **kwargs)
    arch, _, tag = spec.partition("/")
    _check_open_clip(spec, pretrained and checkpoint is None)
    tokenizer = _open_clip_tokenizer(arch)  # before the weights: an offline Hub fails fast
    source: str | None
    if checkpoint is not None:
        source = str(checkpoint)
    else:
        source = tag if pretrained else None
    try:
        with _download_logs_held():
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=source, **kwargs)
    except Exception as err:
        if checkpoint is not None and isinstance(err, RuntimeError):
            raise CheckpointError(f"checkpoint {checkpoint} does not fit open_clip {arch!r}: {err}") from err
        if source is not None and checkpoint is None and _looks_like_download_failure(err):
            repo = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "").strip("/") or None
            raise _offline_error(f"open_clip {arch}/{tag}", repo, "open_clip_model.safetensors", err) from err
        raise
    return _open_clip_loaded(model, preprocess, tokenizer, f"{OPEN_CLIP_PREFIX}{arch}", pretrained, checkpoint, tag)


def _open_clip_tokenizer(arch: str) -> Any:
    """open_clip's tokenizer for ``arch``; one whose files are on the Hugging Face Hub (SigLIP's) and not
    in the local cache gives :class:`WeightsUnavailableError` naming the repository and the ways to
    give a local copy."""
    import open_clip

    try:
        return open_clip.get_tokenizer(arch)
    except Exception as err:
        if not _looks_like_download_failure(err):
            raise
        cfg = open_clip.get_model_config(arch) if "/" not in arch and ":" not in arch else None
        repo = ((cfg or {}).get("text_cfg") or {}).get("hf_tokenizer_name") or arch
        state = _hub_state(hub_offline())
        raise WeightsUnavailableError(
            f"the tokenizer of open_clip {arch} (Hugging Face repository '{repo}') is not in the local cache and "
            f"{state}: download the repository's tokenizer files elsewhere and copy them into the Hugging Face "
            f"cache here, or give the model as open_clip:local-dir:PATH, a folder holding open_clip_config.json, "
            f"the weights and the tokenizer files ({type(err).__name__}: {one_line(err)[:120]})"
        ) from err


def _load_open_clip_named(spec: str, pretrained: bool, checkpoint: Path | None, **kwargs: Any) -> LoadedModel:
    """open_clip's own ``hf-hub:ORG/REPO`` and ``local-dir:PATH`` names (config + weights from there)."""
    import open_clip

    try:
        with _download_logs_held():
            model, _, preprocess = open_clip.create_model_and_transforms(spec, **kwargs)
    except Exception as err:
        if spec.startswith(HF_HUB_PREFIX) and _looks_like_download_failure(err):
            repo = spec[len(HF_HUB_PREFIX) :]
            raise _offline_error(f"open_clip {spec}", repo, "open_clip_model.safetensors", err) from err
        raise
    if checkpoint is not None:
        open_clip.load_checkpoint(model, str(checkpoint))
    tokenizer = _open_clip_tokenizer(spec)
    return _open_clip_loaded(model, preprocess, tokenizer, f"{OPEN_CLIP_PREFIX}{spec}", True, checkpoint, None)


def _open_clip_loaded(
    model: Any, preprocess: Any, tokenizer: Any, name: str, pretrained: bool, checkpoint: Path | None, tag: str | None
) -> LoadedModel:
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        name=name,
        source="open_clip",
        weights_id=_weights_id(name, pretrained, checkpoint, tag or None),
        tokenizer=tokenizer,
        info={"image_size": size, "arch": name.removeprefix(OPEN_CLIP_PREFIX)},
    )


def _looks_like_download_failure(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    words = ("connect", "network", "resolve", "offline", "hub", "download", "http", "url", "timed out", "not found")
    return isinstance(err, OSError) or any(w in text for w in words)


#: Name prefixes -> (loader, whether the prefix is stripped); each loader is called as
#: ``loader(spec, pretrained, checkpoint, **kwargs)``; a name without one of these prefixes is timm's.
_SCHEMES: dict[str, tuple[Callable[..., LoadedModel], bool]] = {
    ZOO_PREFIX: (_load_zoo, True),
    OPEN_CLIP_PREFIX: (_load_open_clip, True),
    HF_PREFIX: (_load_hf, True),
    HF_HUB_PREFIX: (_load_timm, False),
    LOCAL_DIR_PREFIX: (_load_timm, False),
}
