"""Images with object masks for ``vitdecomp segment``: a folder of images with a folder of masks
matched by file stem (:func:`folder_set`), or generated world scenes (:func:`world_set`), and masks
carried into a model's input frame (:func:`to_input`).

A mask is any image file where non-zero is object (greyscale, palette indices, or any RGB channel;
alpha ignored). A mask of another size than its image is resized to it with nearest-neighbour
sampling (and listed). Images without a mask are skipped and listed; an unreadable image or mask stops
the run with the file named, or with ``skip_bad`` (``--skip-bad-images``) is skipped and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitdecomp.apps.pixels import InputGeometry
from vitdecomp.errors import ImageReadError, VitDecompError
from vitdecomp.imageset import IMAGE_SUFFIXES, display_name, list_images, read_image, with_skip_hint


@dataclass
class SegmentSet:
    """Images with their object masks ``[H0, W0]`` bool (original pixels); what was skipped / resized.
    ``square``: images and masks enter the model resized to its input square, no crop (the published
    ImageNet-segmentation protocol, :func:`vitdecomp.apps.pixels.square_preprocess`), instead of
    through the model's own resize / crop; ``benchmark``: the published benchmark the set is (``""``:
    none)."""

    names: list[str]
    images: list[Image.Image]
    masks: list[np.ndarray]
    description: str
    skipped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    benchmark: str = ""
    square: bool = False


def read_mask(path: Path) -> np.ndarray:
    """``[H, W]`` bool: non-zero = object (any RGB channel; palette indices; alpha ignored)."""
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im.convert("RGB") if im.mode in ("RGBA", "LA", "PA") else im)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageReadError(f"mask {display_name(path)} cannot be read: {err}") from err
    return a.any(-1) if a.ndim == 3 else a != 0


def world_set(n: int, seed: int) -> SegmentSet:
    """``n`` generated scenes of the built-in world with their object masks."""
    from vitdecomp.world import make_scenes

    s = make_scenes(n, seed=seed)
    names = [f"world-{seed}-{i:06d}" for i in range(n)]
    desc = f"{n} generated world scenes (seed {seed})"
    return SegmentSet(names, [s.pil(i) for i in range(n)], list(s.masks.astype(bool)), desc)


def folder_set(images: str | Path, masks: str | Path, n: int | None = None, skip_bad: bool = False) -> SegmentSet:
    """Images under ``images`` with the mask of the same file stem under ``masks`` (see the module
    text); ``skip_bad``: unreadable images and masks are skipped and listed instead of stopping."""
    masks = Path(masks)
    if not masks.is_dir():
        raise VitDecompError(f"not a folder of masks: {display_name(masks)}")
    by_stem: dict[str, Path] = {}
    for p in sorted(masks.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."):
            if p.stem in by_stem:
                raise VitDecompError(f"two masks share the stem {p.stem!r}: {by_stem[p.stem]} and {display_name(p)}")
            by_stem[p.stem] = p
    out = SegmentSet([], [], [], f"images from {display_name(images)}, masks from {display_name(masks)}")
    inside = masks.resolve()
    for path in list_images(images, skip_bad):
        if n is not None and len(out.names) >= n:
            break
        if inside in path.resolve().parents:  # a masks folder inside the images folder
            continue
        mask_path = by_stem.get(path.stem)
        if mask_path is None:
            out.skipped.append(display_name(path))
            continue
        try:
            im, mask = read_image(path), read_mask(mask_path)
        except ImageReadError as err:
            if not skip_bad:
                raise ImageReadError(with_skip_hint(str(err))) from err
            out.skipped.append(f"{display_name(path)} (unreadable)")
            continue
        if mask.shape != (im.height, im.width):
            out.resized.append(f"{display_name(mask_path)} {mask.shape[1]}x{mask.shape[0]} -> {im.width}x{im.height}")
            mask = np.asarray(Image.fromarray(mask).resize(im.size, Image.NEAREST))
        out.names.append(path.stem)
        out.images.append(im)
        out.masks.append(mask)
    if not out.names:
        raise VitDecompError(f"no image under {display_name(images)} has a mask (same file stem) in {masks}")
    return out


def to_input(a: np.ndarray, geo: InputGeometry, resample: int) -> np.ndarray:
    """An ``[H0, W0(, 3)]`` uint8 array of the original image's frame in the model's input frame
    (resize then crop as the model's preprocessing does; zero where the input lies outside)."""
    im = Image.fromarray(a).resize((geo.resized[1], geo.resized[0]), resample)
    r = np.asarray(im)
    out = np.zeros((*geo.crop, *r.shape[2:]), dtype=r.dtype)
    top, left = geo.offset
    ys, xs = max(top, 0), max(left, 0)
    ye, xe = min(top + geo.crop[0], r.shape[0]), min(left + geo.crop[1], r.shape[1])
    out[ys - top : ye - top, xs - left : xe - left] = r[ys:ye, xs:xe]
    return out
