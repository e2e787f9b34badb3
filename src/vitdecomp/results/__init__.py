"""The results schema: what an analysis and its applications hand their readers, typed.

``analysis`` (:class:`AnalysisResult`, the schema of ``results.json``, with its schema version and the
score the report ranks by) · ``sections`` (:class:`AppSection`: one application's part of the report,
and :class:`AppResult`, the contract of an application's typed result) · ``views`` (the report's
heatmaps, head grids and retrieval galleries). A floor below the pipeline, the applications and the
report, so that each of them reads and writes these types without importing the others.
"""

from vitdecomp.results.analysis import (
    FORMAT_VERSION,
    AlignerInfo,
    Alignment,
    AnalysisResult,
    CacheInfo,
    Completeness,
    ImagesInfo,
    ModelInfo,
    OutputPaths,
    Pick,
    ReaderInfo,
    StoreInfo,
    TopImage,
    VocabularyInfo,
)
from vitdecomp.results.sections import AppFigure, AppPanel, AppResult, AppSection, Figure, FileData, ResultBase
from vitdecomp.results.views import ComponentView, FeatureView, Hit, ImageMap, ReportViews, RetrievalGallery

__all__ = [
    "FORMAT_VERSION",
    "AlignerInfo",
    "Alignment",
    "AnalysisResult",
    "AppFigure",
    "AppPanel",
    "AppResult",
    "AppSection",
    "CacheInfo",
    "Completeness",
    "ComponentView",
    "FeatureView",
    "Figure",
    "FileData",
    "Hit",
    "ImageMap",
    "ImagesInfo",
    "ModelInfo",
    "OutputPaths",
    "Pick",
    "ReaderInfo",
    "ReportViews",
    "ResultBase",
    "RetrievalGallery",
    "StoreInfo",
    "TopImage",
    "VocabularyInfo",
]
