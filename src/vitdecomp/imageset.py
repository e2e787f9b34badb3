"""Image sets: folders read as users expect, and the :class:`ImageSource` that ``vitdecomp analyze``
reads (a folder or generated world scenes).

A folder is listed recursively (hidden files and folders skipped, sorted); a ``vitdecomp world
export`` folder (``attributes.csv`` naming ``images/…`` and ``masks/…``) is read as its images only,
in the CSV's order, with the attributes attached. Every file is decoded by :func:`read_image` into
8-bit RGB the way a viewer shows it:

* 16-bit and float greyscale (``I;16``, ``I``, ``F``) scaled from their type's range (16-bit:
  0..65535; float: 0..1, clipped) instead of PIL's clipping to white/black;
* palette images through their palette (with their transparency), CMYK through PIL's conversion;
* transparency composited on :data:`BACKGROUND` (white), not dropped;
* images with more than :data:`MAX_PIXELS` pixels refused (decompression bombs), per file.

Every file is read and decoded up front, before any model loads: an unreadable file raises
:class:`~vitdecomp.errors.ImageReadError` naming it (and ``--skip-bad-images``); with ``skip_bad`` it
is dropped and listed (``ImageSource.errors``, the skip report). A world export whose ``images/`` no
longer matches its ``attributes.csv`` (a listed file missing, a file not listed) is refused naming
the CSV, or with ``skip_bad`` read as far as it matches, the rest listed. File names that are
not UTF-8 get printable ids (``\\xe9`` escapes). The set's key hashes every file's *bytes* (as they
are read), so an edited image is never mistaken for its old rows. Files are read and decoded by a
torch ``DataLoader`` with worker processes (:func:`loader_workers`).
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vitdecomp.defaults import DEFAULT_N_IMAGES, WORLD_SEED
from vitdecomp.errors import ImageReadError
from vitdecomp.world.attributes import ATTRIBUTES
from vitdecomp.world.scenes import CHUNK, make_scenes, scene_attributes

__all__ = ["DEFAULT_N_IMAGES", "WORLD_SEED", "ImageSource", "image_source", "list_images", "read_image"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: Transparent pixels are composited on this colour (RGB).
BACKGROUND = (255, 255, 255)
#: Images with more pixels than this are refused (PIL's own bomb limit is 89 M, with only a warning).
MAX_PIXELS = 50_000_000
#: The file that marks a ``vitdecomp world export`` folder.
WORLD_EXPORT_CSV = "attributes.csv"
#: What every error about an unreadable image ends with.
SKIP_HINT = "skip unreadable files with --skip-bad-images"


def with_skip_hint(message: str) -> str:
    """``message`` ending with :data:`SKIP_HINT` (once)."""
    return message if "--skip-bad-images" in message else f"{message}; {SKIP_HINT}"


def display_name(path: str | Path) -> str:
    """A printable, reversible-enough name: undecodable bytes of a non-UTF-8 file name as ``\\xNN``."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def list_images(folder: str | Path, skip_bad: bool = False) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden ones skipped), sorted for a stable order;
    for a world export folder, its ``images/`` as listed in ``attributes.csv`` (a mismatch between
    the two is an :class:`ImageReadError` naming the CSV, unless ``skip_bad``: see
    :func:`export_mismatch`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"not a folder: {display_name(folder)}")
    export = _world_export(folder)
    if export is not None:
        paths = [folder / row["img_filename"] for row in export]
        if not skip_bad:  # with skip_bad a mismatch is no error: not worth scanning the folders for
            missing, unlisted = export_mismatch(folder, paths)
            if missing:
                raise ImageReadError(_mismatch_message(folder, missing, unlisted))
        return paths
    files = _image_files(folder)
    if not files:
        raise ImageReadError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {display_name(folder)}")
    return files


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def export_mismatch(folder: Path, paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """A world export's ``attributes.csv`` against its files: ``(missing, unlisted)``, the listed
    ``paths`` that are not files and the image files under the listed folders that it does not list."""
    listed = set(paths)
    missing = [p for p in paths if not p.is_file()]
    folders = sorted({p.parent for p in paths if p.parent.is_dir()})
    unlisted = [f for d in folders for f in _image_files(d) if f.parent == d and f not in listed]
    return missing, unlisted


def _mismatch_message(folder: Path, missing: list[Path], unlisted: list[Path]) -> str:
    def some(ps: list[Path]) -> str:
        return ", ".join(display_name(p.relative_to(folder)) for p in ps[:3]) + (" ..." if len(ps) > 3 else "")

    csv_path = display_name(folder / WORLD_EXPORT_CSV)
    text = f"{csv_path} lists {len(missing)} image(s) that are not there ({some(missing)})"
    if unlisted:
        text += f", and {len(unlisted)} image file(s) it does not list are not read ({some(unlisted)})"
    return (
        f"{text}: a world export is read as its {WORLD_EXPORT_CSV} lists it; restore the files, skip the missing "
        f"ones with --skip-bad-images, or move {WORLD_EXPORT_CSV} away to read the folder as plain images"
    )


def _world_export(folder: Path) -> list[dict[str, str]] | None:
    """The rows of a world export's ``attributes.csv`` (``None`` if ``folder`` is not one)."""
    path = folder / WORLD_EXPORT_CSV
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "img_filename" not in rows[0] or "mask_filename" not in rows[0]:
        return None
    return rows


def _export_attributes(rows: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """A world export's attributes as the generator gives them: word indices, numbers as floats."""
    out: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if name in ATTRIBUTES:
            words = list(ATTRIBUTES[name])
            out[name] = np.asarray([words.index(v) if v in words else -1 for v in values])
        elif name not in ("img_filename", "mask_filename", "caption"):
            try:
                out[name] = np.asarray([float(v) for v in values])
            except ValueError:
                continue
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows ``im`` (see the module docstring for the rules)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        scale = 1.0 if im.mode == "F" else (65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0)
        a = np.clip(np.nan_to_num(a / scale), 0.0, 1.0)
        return Image.fromarray((a * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """An RGB PIL image (see :func:`to_rgb`), or :class:`ImageReadError` naming the file and the reason."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; only open() is guarded)
    except OSError as err:
        raise ImageReadError(f"cannot read image {display_name(path)}: {err.strerror or err}") from err
    with f:
        return decode_image(f, path)


def decode_image(f: object, path: str | Path) -> Image.Image:
    """Decode an open file (or ``BytesIO``) of ``path``; refuses bombs and unreadable bytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageReadError(
                        f"image {display_name(path)} has {w}x{h} pixels, more than the limit of {MAX_PIXELS:,} "
                        "(a decompression bomb?); shrink it or skip it with --skip-bad-images"
                    )
                im.load()
                return to_rgb(im)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(
            f"image {display_name(path)} is too large ({err}); skip it with --skip-bad-images"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageReadError(f"cannot read image {display_name(path)}: not an image PIL can decode") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"cannot read image {display_name(path)}: {err}") from err


def loader_workers(n_files: int) -> int:
    """Decoding processes for ``n_files``: none for a handful, else up to 4 (``$VITDECOMP_WORKERS``)."""
    env = os.environ.get("VITDECOMP_WORKERS")
    if env is not None:
        return max(0, int(env))
    return 0 if n_files < 64 else min(4, os.cpu_count() or 1)


class _Files(Dataset):
    """Each item: ``(index, bytes digest, RGB image or None, error or None)``; every file is decoded,
    its image returned only with ``keep`` (a check pass sends back none)."""

    def __init__(self, paths: Sequence[Path], keep: bool = True) -> None:
        self.paths, self.keep = list(paths), keep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, str, Image.Image | None, str | None]:
        import io

        p = self.paths[i]
        try:
            data = p.read_bytes()
        except OSError as err:
            return i, "", None, f"cannot read image {display_name(p)}: {err.strerror or err}"
        digest = hashlib.sha256(data).hexdigest()
        try:
            im = decode_image(io.BytesIO(data), p)
        except ImageReadError as err:
            return i, digest, None, str(err)
        return i, digest, im if self.keep else None, None


def _load(paths: Sequence[Path], keep: bool = True, batch_size: int = 16) -> Iterator[list[tuple]]:
    """Batches of :class:`_Files` items, in order, decoded by a ``DataLoader`` with workers."""
    loader = DataLoader(
        _Files(paths, keep), batch_size=batch_size, num_workers=loader_workers(len(paths)), collate_fn=list
    )
    yield from loader


def iter_batches(
    paths: Sequence[str | Path],
    preprocess: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 16,
    skip_bad: bool = False,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield ``(ids, images [b, 3, H, W])``; unreadable files raise, or are skipped (and reported
    on stderr) with ``skip_bad``."""
    for items in _load([Path(p) for p in paths], True, batch_size):
        ids, tensors = [], []
        for i, _, im, err in items:
            if err is not None:
                if not skip_bad:
                    raise ImageReadError(with_skip_hint(err))
                print(f"skipped: {err}", file=sys.stderr)
                continue
            ids.append(display_name(paths[i]))
            tensors.append(preprocess(im))
        if tensors:
            yield ids, torch.stack(tensors)


# ----------------------------------------------------------------------------------------------
# image sources


@dataclass
class ImageSource:
    """An image set: stable ids, batches of PIL images, and a way to fetch one image by id.

    ``key`` identifies the set for the store key; ``attributes`` holds the ground-truth attributes
    of generated world scenes or of a world export folder (``None`` for other folders); ``errors``
    the files skipped as unreadable (the skip report).
    """

    ids: list[str]
    key: str
    description: str
    _get: Callable[[int], Image.Image]
    attributes: dict[str, np.ndarray] | None = None
    errors: list[str] = field(default_factory=list)
    paths: list[Path] | None = None
    root: str = ""  # the folder ``ids`` are relative to ("" for generated world scenes)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_world(self) -> bool:
        """Scenes of the built-in world (with ground-truth attributes): generated or exported."""
        return self.attributes is not None

    def image(self, index: int) -> Image.Image:
        """The PIL image of row ``index``."""
        return self._get(index)

    def batches(self, batch_size: int) -> Callable[[int], Iterator[tuple[list[str], list[Image.Image]]]]:
        """A resumable batch source: ``source(start)`` yields ``(ids, images)`` from row ``start`` on
        (a folder's files decoded by a ``DataLoader`` with workers)."""

        def source(start: int) -> Iterator[tuple[list[str], list[Image.Image]]]:
            if self.paths is None:
                for s in range(start, len(self.ids), batch_size):
                    e = min(s + batch_size, len(self.ids))
                    yield self.ids[s:e], [self._get(i) for i in range(s, e)]
                return
            for items in _load(self.paths[start:], True, batch_size):
                bad = next((err for *_, err in items if err is not None), None)
                if bad is not None:  # the file changed since it was checked
                    raise ImageReadError(with_skip_hint(f"{bad} (it changed since the run began)"))
                yield [self.ids[start + i] for i, *_ in items], [im for _, _, im, _ in items]

        return source


def world_source(n: int = DEFAULT_N_IMAGES, seed: int = WORLD_SEED, size: int = 64) -> ImageSource:
    """``n`` generated scenes of the built-in world (deterministic in ``seed``), rendered when read
    (:class:`WorldScenes`: memory flat in ``n``); the attributes are drawn up front."""
    return ImageSource(
        ids=[f"world-{seed}-{i:06d}" for i in range(n)],
        key=f"world:seed={seed}:n={n}:size={size}",
        description=f"{n} generated scenes of the built-in world (seed {seed}, {size}x{size} px)",
        _get=WorldScenes(n, seed, size),
        attributes=scene_attributes(n, seed=seed, size=size),
    )


class WorldScenes:
    """Scene ``i`` of ``make_scenes(n, seed, size)`` as a PIL image, rendered a chunk of
    :data:`~vitdecomp.world.scenes.CHUNK` scenes at a time; the chunks last read are kept up to
    :data:`HELD_BYTES` (least recently read dropped first: a report's scattered reads of a set that
    fits render each chunk once), none travels when pickled (Ray actors render their own)."""

    HELD_BYTES = 64 << 20

    def __init__(self, n: int, seed: int, size: int) -> None:
        self.n, self.seed, self.size = n, seed, size
        self.held: dict[int, np.ndarray] = {}

    @property
    def max_held(self) -> int:
        """Chunks kept at once (at least 2)."""
        return max(2, self.HELD_BYTES // (CHUNK * self.size * self.size * 3))

    def __call__(self, i: int) -> Image.Image:
        if not 0 <= i < self.n:
            raise IndexError(f"scene {i} of {self.n}")
        c = i // CHUNK
        if c in self.held:
            self.held[c] = self.held.pop(c)  # now the most recently read
        else:
            while len(self.held) >= self.max_held:
                del self.held[next(iter(self.held))]  # the least recently read
            self.held[c] = make_scenes(min(CHUNK, self.n - c * CHUNK), self.seed, self.size, start=c * CHUNK).images
        return Image.fromarray(self.held[c][i % CHUNK])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "held": {}}


def folder_source(
    folder: str | Path, n: int | None = None, skip_bad: bool = False, progress: bool = False
) -> ImageSource:
    """The images under ``folder`` (see :func:`list_images`; the first ``n``), every file read and
    decoded up front (before any model loads): its bytes hashed into the key, an unreadable file an
    :class:`ImageReadError` naming it, or with ``skip_bad`` dropped and listed in ``errors`` (the skip
    report :func:`skip_report` prints) so that row ids stay stable."""
    folder = Path(folder).resolve()
    paths = list_images(folder, skip_bad)
    export = _world_export(folder)
    if n is not None:
        paths = paths[:n]
    digests, errors, keep = _check_files(paths, skip_bad, progress)
    if export is not None and skip_bad:
        unlisted = export_mismatch(folder, [folder / r["img_filename"] for r in export])[1]
        errors += [f"{display_name(p)}: not listed in {WORLD_EXPORT_CSV}, not read" for p in unlisted]
    good = [p for p, k in zip(paths, keep, strict=True) if k]
    listing = hashlib.sha256()
    for p, d, k in zip(paths, digests, keep, strict=True):
        if k:
            listing.update(f"{display_name(p.relative_to(folder))}|{d}\n".encode())
    attributes = None
    if export is not None:
        rows = [r for r, k in zip(export[: len(paths)], keep, strict=True) if k]
        attributes = _export_attributes(rows)
    kind = "world export" if export is not None else "images"
    return ImageSource(
        ids=[display_name(p.relative_to(folder)) for p in good],
        key=f"folder:{display_name(folder)}:{len(good)}:{listing.hexdigest()[:16]}",
        description=f"{len(good)} {kind} from {display_name(folder)}",
        _get=lambda i: read_image(good[i]),
        attributes=attributes,
        errors=errors,
        paths=good,
        root=str(folder),
    )


def _check_files(paths: Sequence[Path], skip_bad: bool, progress: bool) -> tuple[list[str], list[str], list[bool]]:
    """Read and decode every file (a ``DataLoader`` with workers): ``(digests, errors, keep)``; an
    unreadable file raises unless ``skip_bad``."""
    digests, errors, keep = [""] * len(paths), [], [True] * len(paths)
    bar = tqdm(total=len(paths), desc="check images", unit="img", disable=not progress, leave=False)
    for items in _load(paths, keep=False):
        for i, digest, _, err in items:
            digests[i] = digest
            if err is not None:
                if not skip_bad:
                    raise ImageReadError(with_skip_hint(err))
                errors.append(err)
                keep[i] = False
        bar.update(len(items))
    bar.close()
    return digests, errors, keep


def skip_report(source: ImageSource, shown: int = 3) -> str | None:
    """One line listing the files skipped as unreadable (``None`` when none were)."""
    if not source.errors:
        return None
    more = (
        f" and {len(source.errors) - shown} more (results.json: images.skipped)" if len(source.errors) > shown else ""
    )
    return f"skipped {len(source.errors)} unreadable file(s): " + "; ".join(source.errors[:shown]) + more


def image_source(
    images: str | Path | None = None,
    n: int | None = None,
    seed: int = WORLD_SEED,
    skip_bad: bool = False,
    progress: bool = False,
) -> ImageSource:
    """A folder's images (``images``), or ``n`` (default :data:`DEFAULT_N_IMAGES`) world scenes from
    ``seed`` when ``images`` is ``None``."""
    if images is None:
        return world_source(n or DEFAULT_N_IMAGES, seed=seed)
    return folder_source(images, n, skip_bad=skip_bad, progress=progress)
