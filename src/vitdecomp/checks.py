"""Checks of options that can be made before anything heavy runs, each a one-line
:class:`~vitdecomp.errors.UsageError` naming the option: a device, a folder to write, a model name,
a number's lower bound, a file or folder that must exist."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vitdecomp.errors import UsageError
from vitdecomp.fsio import writing


def check_at_least(flag: str, value: float | None, least: float) -> None:
    """``value`` (when given) is at least ``least``."""
    if value is not None and value < least:
        raise UsageError(f"{flag} {value}: must be at least {least}")


def check_file(flag: str, path: str | Path | None) -> None:
    """``path`` (when given) is a file."""
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")


def check_folder(flag: str, path: str | Path | None) -> None:
    """``path`` (when given) is a folder."""
    if path is not None and not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: no such folder")


def check_device(device: str | None) -> None:
    """Refuse a device torch does not know or this machine does not have."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {device}: not a device torch knows ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")


def check_writable_dir(path: str | Path, flag: str) -> None:
    """Make sure ``path`` is (or can be made) a folder this process can write to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a folder")
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".vitdecomp-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()


def check_model_name(name: str, *, pretrained: bool, checkpoint: str | Path | None = None) -> None:
    """:func:`vitdecomp.models.loading.check_name` (imports timm / open_clip only for their names)."""
    from vitdecomp.models.loading import check_name

    check_name(name, pretrained=pretrained, checkpoint=checkpoint)


def default_device(device: str | None) -> str:
    """``device``, else CUDA when there is one, else the CPU."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def require_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`UsageError` saying what to install (``--runner ray``)."""
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise UsageError(
            f"--runner ray needs Ray ({err.name or 'ray'} is not installed): pip install 'vitdecomp[scale]'"
        ) from None
    return ray
