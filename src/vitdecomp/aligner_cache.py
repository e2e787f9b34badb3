"""The aligner cache: one folder per store key and training options, read back when it fits and
written atomically when trained (:func:`get_aligner`).

An aligner is cached under ``root/<model>-compalign-<digest of the model setting>-<digest of the image
set and training options>`` (:func:`aligner_cache_dir`): a different model, reader, start layer,
component layout, preprocessing, image set, ``lam``, number of steps, batch size or held-out share
never reuses another's maps. A cached or given aligner trained for another setting is refused
(:class:`~vitdecomp.errors.MismatchError`), never silently retrained or applied; one that cannot be
read is reported by path with how to rebuild it (:class:`~vitdecomp.errors.CacheError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdecomp.align import MODEL_FIELDS, Aligner, load_aligner, save_aligner, train_aligner
from vitdecomp.defaults import ALIGN_BATCH_SIZE, ALIGN_STEPS, DEFAULT_LAMBDA, VAL_FRACTION
from vitdecomp.errors import CacheError, MismatchError, one_line
from vitdecomp.fsio import writing
from vitdecomp.store import Rows, StoreKey

#: An aligner is cached only when trained for at least this many steps (``--align-steps 0`` is untrained).
MIN_CACHED_STEPS = 1


@dataclass(frozen=True)
class AlignOptions:
    """How CompAlign is trained for an analysis: the orthogonality weight ``lam``, the most steps
    (early-stopped), images per step and the held-out share for early stopping."""

    lam: float = DEFAULT_LAMBDA
    max_steps: int = ALIGN_STEPS
    batch_size: int = ALIGN_BATCH_SIZE
    val_fraction: float = VAL_FRACTION

    def training(self) -> dict[str, Any]:
        """The options that go to :func:`vitdecomp.align.train_aligner` and into the cache folder's name."""
        return {"val_fraction": self.val_fraction, "max_steps": self.max_steps, "batch_size": self.batch_size}


def aligner_dir(root: str | Path, key: StoreKey, mode: str = "compalign", lam: float = DEFAULT_LAMBDA) -> Path:
    """A cache folder for the aligner of ``key``'s model setting (the image set is not part of it)."""
    fields = {k: key.to_dict()[k] for k in MODEL_FIELDS}
    blob = json.dumps({"key": fields, "mode": mode, "lam": lam}, sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.model)[:48].strip("_") or "aligner"
    return Path(root) / f"{slug}-{mode}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def aligner_cache_dir(
    root: str | Path, key: StoreKey, lam: float, options: dict[str, Any], mode: str = "compalign"
) -> Path:
    """The cache folder of the aligner trained on the store ``key`` (model, reader, layout *and*
    image set) with ``lam`` and the training ``options`` (steps, batch size, held-out share)."""
    base = aligner_dir(root, key, mode, lam)
    blob = json.dumps({"images": key.images, **options}, sort_keys=True, default=str)
    return base.with_name(f"{base.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}")


@dataclass
class CachedAligner:
    """An aligner and where it came from: ``state`` (given, loaded, trained, untrained) and its folder
    (``None`` when not cached)."""

    aligner: Aligner
    state: str
    path: Path | None


def get_aligner(
    rows: Rows,
    root: str | Path,
    options: AlignOptions | None = None,
    *,
    given: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[..., None] = print,
) -> CachedAligner:
    """The CompAlign aligner for ``rows`` (a store's, with its key): ``given`` (a saved folder) if
    set, else the cached one under ``root`` for this store key and ``options`` (see
    :func:`aligner_cache_dir`), else trained from ``rows`` and cached (atomically: a folder renamed
    into place). With ``max_steps`` 0 the aligner is untrained: used, reported as such, never cached."""
    options = options or AlignOptions()
    key, labels = rows.key, rows.labels
    if key is None:
        raise ValueError("get_aligner needs rows with a store key (a store, or its rows in memory)")
    if given is not None:
        return CachedAligner(_read_aligner(given, key, labels, device, "--aligner"), "given", Path(given))
    path = aligner_cache_dir(root, key, options.lam, options.training())
    if (path / "aligner.json").exists():
        return CachedAligner(_read_aligner(path, key, labels, device, None), "loaded", path)
    c, d = rows.shapes["contributions"]
    lam = options.lam
    log(f"training CompAlign ({c} maps {d}->{rows.shapes['clip'][0]}, lam={lam:g}) on {len(rows)} images")
    al = train_aligner(rows, labels, mode="compalign", lam=lam, device=device, progress=progress, **options.training())
    al.key = key.to_dict()
    al.metrics["trained_on"] = key.images
    if options.max_steps < MIN_CACHED_STEPS:
        return CachedAligner(al, "untrained", None)
    _save_aligner_atomically(al, path)
    return CachedAligner(al, "trained", path)


def _read_aligner(
    path: str | Path, key: StoreKey, labels: Sequence[str] | None, device: str, flag: str | None
) -> Aligner:
    """:func:`load_aligner`, with a damaged folder reported by path and how to rebuild it."""
    try:
        return load_aligner(path, key=key, labels=labels, device=device)
    except MismatchError as err:
        fix = "give the aligner trained for this run" if flag else "delete that folder to retrain it"
        raise MismatchError(f"the aligner at {path} does not fit this run: {one_line(err)}; {fix}") from err
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        fix = f"give a folder written by save_aligner to {flag}" if flag else f"delete it (rm -r '{path}') and rerun"
        raise CacheError(
            f"cannot read the aligner at {path} ({type(err).__name__}: {one_line(err)[:120]}); {fix}"
        ) from err


def _save_aligner_atomically(aligner: Aligner, path: Path) -> None:
    """Save into a temporary folder beside ``path`` and rename it into place (a kill leaves no half
    aligner; a concurrent run that saved first wins, this copy is dropped)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        shutil.rmtree(tmp, ignore_errors=True)
        save_aligner(aligner, tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "aligner.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
