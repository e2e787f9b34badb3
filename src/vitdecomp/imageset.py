"""Image folders: list, read (with a clear error per bad file) and preprocess in batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vitdecomp.errors import ImageReadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted for a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"not a folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageReadError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def read_image(path: str | Path) -> Image.Image:
    """An RGB PIL image, or :class:`ImageReadError` naming the file and the reason."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def iter_batches(
    paths: Sequence[str | Path],
    preprocess: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 16,
    skip_bad: bool = False,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield ``(ids, images [b, 3, H, W])``; unreadable files raise, or are skipped (and reported
    on stderr) with ``skip_bad``."""
    import sys

    ids: list[str] = []
    tensors: list[torch.Tensor] = []
    for p in paths:
        try:
            tensors.append(preprocess(read_image(p)))
            ids.append(str(p))
        except ImageReadError as err:
            if not skip_bad:
                raise
            print(f"skipped: {err}", file=sys.stderr)
        if len(tensors) == batch_size:
            yield ids, torch.stack(tensors)
            ids, tensors = [], []
    if tensors:
        yield ids, torch.stack(tensors)
