"""Errors that tell the user what went wrong and what to do about it."""


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
