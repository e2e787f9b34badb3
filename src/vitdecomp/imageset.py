"""Image sets: folders (list, read with a clear error per bad file, preprocess in batches) and the
:class:`ImageSource` that ``vitdecomp analyze`` reads (a folder or generated world scenes)."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitdecomp.errors import ImageReadError
from vitdecomp.world import make_scenes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: Seed of the default (held-out) world image set; the zoo trained on 1000/1001 (+1500 for
#: validation) and its probes use 2001/2002 — see ``vitdecomp.zoo.recipes`` (``Recipe.data_seed``) / ``zoo.evaluate``.
WORLD_SEED = 3000
DEFAULT_N_IMAGES = 2000


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


# ----------------------------------------------------------------------------------------------
# image sources


@dataclass
class ImageSource:
    """An image set: stable ids, batches of PIL images, and a way to fetch one image by id.

    ``key`` identifies the set for the store key; ``attributes`` holds the ground-truth attributes
    of generated world scenes (``None`` for folders); ``errors`` the files skipped as unreadable.
    """

    ids: list[str]
    key: str
    description: str
    _get: Callable[[int], Image.Image]
    attributes: dict[str, np.ndarray] | None = None
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_world(self) -> bool:
        """Generated scenes of the built-in world (with ground-truth attributes)."""
        return self.attributes is not None

    def image(self, index: int) -> Image.Image:
        """The PIL image of row ``index``."""
        return self._get(index)

    def batches(self, batch_size: int) -> Callable[[int], Iterator[tuple[list[str], list[Image.Image]]]]:
        """A resumable batch source: ``source(start)`` yields ``(ids, images)`` from row ``start`` on."""

        def source(start: int) -> Iterator[tuple[list[str], list[Image.Image]]]:
            for s in range(start, len(self.ids), batch_size):
                e = min(s + batch_size, len(self.ids))
                yield self.ids[s:e], [self._get(i) for i in range(s, e)]

        return source


def world_source(n: int = DEFAULT_N_IMAGES, seed: int = WORLD_SEED, size: int = 64) -> ImageSource:
    """``n`` generated scenes of the built-in world (deterministic in ``seed``)."""
    scenes = make_scenes(n, seed=seed, size=size)
    return ImageSource(
        ids=[f"world-{seed}-{i:06d}" for i in range(n)],
        key=f"world:seed={seed}:n={n}:size={size}",
        description=f"{n} generated scenes of the built-in world (seed {seed}, {size}x{size} px)",
        _get=lambda i: Image.fromarray(scenes.images[i]),
        attributes={k: np.asarray(v) for k, v in scenes.attributes.items()},
    )


def folder_source(folder: str | Path, n: int | None = None, skip_bad: bool = False) -> ImageSource:
    """The images under ``folder`` (sorted; the first ``n``). Unreadable files raise, or with
    ``skip_bad`` are dropped up front (and listed in ``errors``) so that row ids stay stable."""
    folder = Path(folder).resolve()
    paths = list_images(folder)
    if n is not None:
        paths = paths[:n]
    errors: list[str] = []
    if skip_bad:
        good = []
        for p in paths:
            try:
                read_image(p)
                good.append(p)
            except ImageReadError as err:
                errors.append(str(err))
        paths = good
    listing = hashlib.sha256()
    for p in paths:
        st = p.stat()
        listing.update(f"{p.relative_to(folder)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return ImageSource(
        ids=[str(p.relative_to(folder)) for p in paths],
        key=f"folder:{folder}:{len(paths)}:{listing.hexdigest()[:16]}",
        description=f"{len(paths)} images from {folder}",
        _get=lambda i: read_image(paths[i]),
        errors=errors,
    )


def image_source(
    images: str | Path | None = None, n: int | None = None, seed: int = WORLD_SEED, skip_bad: bool = False
) -> ImageSource:
    """A folder's images (``images``), or ``n`` (default :data:`DEFAULT_N_IMAGES`) world scenes from
    ``seed`` when ``images`` is ``None``."""
    if images is None:
        return world_source(n or DEFAULT_N_IMAGES, seed=seed)
    return folder_source(images, n, skip_bad=skip_bad)
