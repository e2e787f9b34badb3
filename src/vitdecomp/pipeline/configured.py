"""The stages as an analysis configures them: the models, the store and the aligner that an
:class:`~vitdecomp.pipeline.config.AnalysisConfig` names (``vitdecomp analyze`` and the applications that
reuse its caches call these, so a change of options reaches both)."""

from __future__ import annotations

from vitdecomp.imageset import ImageSource
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.stages import (
    AlignerStage,
    BuiltStore,
    Models,
    StoreFiller,
    align_components,
    build_store,
    load_models,
)
from vitdecomp.store import Rows


def configured_models(cfg: AnalysisConfig, device: str) -> Models:
    """The subject and reader that ``cfg`` names, on ``device``."""
    return load_models(
        cfg.model,
        cfg.reader,
        checkpoint=cfg.checkpoint,
        reader_checkpoint=cfg.reader_checkpoint,
        random_init=cfg.random_init,
        device=device,
        seed=cfg.seed,
    )


def configured_store(
    cfg: AnalysisConfig, models: Models, source: ImageSource, device: str, fill: StoreFiller | None = None
) -> BuiltStore:
    """The cached store of ``source`` under ``cfg``'s cache, filled where rows are missing (``fill``:
    who fills it; ``None``: this process)."""
    return build_store(
        models,
        source,
        cfg.cache_path / "stores",
        start_layer=cfg.start_layer,
        batch_size=cfg.batch_size,
        device=device,
        dtype=cfg.dtype,
        progress=cfg.progress,
        fill=fill,
    )


def configured_aligner(cfg: AnalysisConfig, rows: Rows, models: Models, device: str) -> AlignerStage:
    """The aligner of ``rows`` under ``cfg``'s cache and CompAlign options (identity for CLIP subjects)."""
    return align_components(
        rows,
        cfg.cache_path / "aligners",
        identity=models.identity,
        device=device,
        given=cfg.aligner,
        lam=cfg.lam,
        val_fraction=cfg.val_fraction,
        max_steps=cfg.align_steps,
        batch_size=cfg.align_batch_size,
        progress=cfg.progress,
        log=print if cfg.verbose else (lambda *a, **k: None),
    )
