"""Errors that tell the user what went wrong and what to do about it.

The contract: a :class:`VitDecompError` is a *user* error. Its message is one line naming what is
wrong and how to fix it; the command line prints it as ``vitdecomp: error: <message>`` and exits
with status 2 (as argparse does for a bad option). Any other exception is an internal error and
keeps its traceback.
"""

from __future__ import annotations


class VitDecompError(Exception):
    """Base class of vitdecomp's own errors."""


class UnsupportedModuleError(VitDecompError):
    """A module with no decomposition rule; names its path inside the model and its class."""

    def __init__(self, path: str, module: object, why: str = "") -> None:
        cls = type(module)
        self.path = path
        self.cls = f"{cls.__module__}.{cls.__qualname__}"
        msg = f"cannot decompose module '{path or '<root>'}' of class {self.cls}"
        super().__init__(msg + (f": {why}" if why else ""))


class WeightsUnavailableError(VitDecompError):
    """Pretrained weights could not be had (offline); the message says how to give a local file."""


class CheckpointError(VitDecompError):
    """A checkpoint file is missing or does not fit the architecture."""


class MismatchError(VitDecompError):
    """Saved artefacts (aligners, caches) were made for a different model or component layout."""


class ImageReadError(VitDecompError):
    """An image file could not be read."""


class UsageError(VitDecompError, ValueError):
    """An option, a name or an argument that cannot work (checked before any heavy work where it can be)."""


class InputError(UsageError):
    """Images that do not fit the model (not a batch ``[B, C, H, W]``, an empty batch, other channels or
    size) or a model that cannot run them (weights on the meta device); names the expected input."""


class NonFiniteInputError(VitDecompError):
    """Images with NaN or infinite pixels; the message names them (``names``), ``positions`` are
    their places in the batch."""

    def __init__(self, message: str, names: list[str] | None = None, positions: list[int] | None = None) -> None:
        super().__init__(message)
        self.names = list(names or [])
        self.positions = list(positions or [])

    @classmethod
    def of(cls, names: list[object], positions: list[int] | None = None) -> NonFiniteInputError:
        """The error for these images (``names``: ids, file names, or batch positions)."""
        shown = ", ".join(str(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return cls(
            f"{len(names)} image(s) have NaN or infinite pixel values ({shown}); the model is not at fault: "
            "fix or drop these images",
            [str(n) for n in names],
            positions,
        )


class OutputError(VitDecompError):
    """A file or folder could not be written (no space, no permission, ...); names the path."""


class CacheError(VitDecompError):
    """A cached artefact (store, aligner) cannot be read; names the path and the command that rebuilds it."""


class LockedError(VitDecompError):
    """Another run holds the lock of a cache folder; names the holder."""


def one_line(message: object) -> str:
    """A message on one line (its lines joined with ' / ')."""
    lines = [s.strip() for s in str(message).splitlines() if s.strip()]
    return " / ".join(lines) or type(message).__name__
