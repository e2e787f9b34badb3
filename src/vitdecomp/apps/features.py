"""``vitdecomp features``: sparse-autoencoder features of any ViT's representation, named in words
and located exactly in the model's parts.

On a finished analysis (its store, its aligner, its reader's text space):

1. **the SAE** — trained on the analysis' representations (:mod:`vitdecomp.sae.training`: a TopK SAE
   from the ``overcomplete`` library, streamed from the store, a tenth of the images held out), or
   read from a file (``--sae``: vitdecomp's own, saev's, ViT-Prisma's or sae-lens' layout); its
   figures on the held-out images: explained variance, L0, dead latents, and whether the model's own
   reading (its classifier, when it has one; the zero-shot reading of every feature through the
   aligner) survives the reconstruction;
2. **names** (:mod:`vitdecomp.apps.feature_names`) — each latent's decoder direction mapped into
   CLIP space as the whole representation is, read against the analysis' feature values and
   vocabulary; its **confidence** is the share of the latent's activation that the named text
   direction explains on the held-out images (the squared correlation of the activation with the
   aligned whole's projection on the name's direction);
3. **location** (:mod:`vitdecomp.apps.latents`) — each latent's pre-activation split exactly over the
   parts (``a_j = sum_i w_j . c_i + const``, completeness error reported) and each part's share of
   it (signed: carriers positive, suppressors negative), and the latent's top images with a token
   map of each: every head's per-token contribution projected on the latent's encoder row, through
   the directional token maps (:func:`vitdecomp.api.decompose` with ``token_directions``).

:class:`Features` is an :class:`~vitdecomp.apps.contract.AnalysisApplication`; its result writes
``features.json`` (per latent: ``id``, ``name``, ``confidence``, ``parts`` as ``[label, share]``
pairs, best carrier first, ...), ``activations.npy`` ``[N, L]`` (float32, the analysis' image order,
the ids in ``features.json``; written a block at a time) and, for a trained SAE, ``sae.safetensors``;
its report section is a sortable table of the latents with a side panel each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vitdecomp.align import whole_map
from vitdecomp.apps.analysis import Analysis, image_loader
from vitdecomp.apps.classifiers import own_heads
from vitdecomp.apps.contract import AnalysisApplication
from vitdecomp.apps.feature_names import analysis_candidates, latent_directions, name_latents
from vitdecomp.apps.latent_maps import latent_maps
from vitdecomp.apps.latents import LatentMeasures, Readers, SparseCodes, measure_latents, read_held_out
from vitdecomp.defaults import ANALYSIS_DIR, FEATURES_OUT, FEATURES_SHOW, FEATURES_TOP, SAE_STEPS
from vitdecomp.errors import VitDecompError
from vitdecomp.pipeline.fill import readable_rows
from vitdecomp.results import AppFigure, AppPanel, AppSection, FileData, ResultBase
from vitdecomp.sae import SparseAutoencoder, check_fits, load_sae
from vitdecomp.store import Rows, reopen_store

#: Parts listed in a latent's report panel, and in its table row.
PANEL_PARTS, ROW_PARTS = 12, 3


@dataclass(kw_only=True)
class FeaturesConfig:
    """Options of ``vitdecomp features``: the analysis folder (its models on ``device``, the subject
    from ``checkpoint``), an SAE file (``None``: train one with ``latents`` / ``k`` (``None``: from the
    data), ``steps``, ``seed``), the latents whose panel shows ``top`` images with maps (``show``,
    the most frequent ones), the output folder and progress bars."""

    analysis: str | Path = ANALYSIS_DIR
    sae: str | Path | None = None
    latents: int | None = None
    k: int | None = None
    steps: int = SAE_STEPS
    seed: int = 0
    show: int = FEATURES_SHOW
    top: int = FEATURES_TOP
    checkpoint: str | Path | None = None
    device: str | None = "cpu"
    out: str | Path = FEATURES_OUT
    progress: bool = True


@dataclass
class Latent:
    """One latent as ``features.json`` lists it: its ``name`` (a ``feature``'s value or a vocabulary
    entry; ``cosine`` with its CLIP-space direction), ``confidence`` (``None``: it never fires on the
    held-out images), ``frequency`` (share of the images it fires on), ``mean_activation`` (when on),
    ``parts`` (``[label, share]``, best carrier first) and ``top_images`` (ids, strongest first)."""

    id: int
    name: str
    feature: str
    cosine: float
    confidence: float | None
    frequency: float
    mean_activation: float
    parts: list[tuple[str, float]]
    top_images: list[str]


@dataclass
class SaeInfo:
    """The SAE: where it came from (``source``, ``file``; ``trained``: by this run, with its
    ``train_seconds``), its ``latents``, ``activation`` and ``k``, its input normalisation."""

    source: str
    file: str
    trained: bool
    latents: int
    activation: str
    k: int | None
    input_norm: str
    train_seconds: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, sae: SparseAutoencoder, file: str, trained: bool, train_seconds: float | None = None) -> SaeInfo:
        return cls(
            sae.source, file, trained, sae.n_latents, sae.activation, sae.k, sae.input_norm, train_seconds, sae.info
        )


@dataclass
class FeatureMetrics:
    """The SAE on the held-out images (``n_held_out``; all images for a given SAE):
    ``explained_variance`` of the representation and mean ``l0``; over every image: ``dead`` latents
    (never fire); the split's completeness (``max_split_error``, ``mean_split_error``); ``agreement``:
    images whose reading is the same on the reconstruction (``zero_shot`` per feature, through the
    aligner; ``model_head`` per attribute, the model's own classifier)."""

    n_images: int
    n_held_out: int
    explained_variance: float
    l0: float
    dead: int
    dead_fraction: float
    max_split_error: float
    mean_split_error: float
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class FeaturesResult(ResultBase):
    """What ``vitdecomp features`` found (``features.json``), the latents of every image (``codes``,
    written as ``activations.npy``), the panels' maps (``maps``: latent id -> figures) and the trained
    SAE's file (``sae_file``)."""

    name: ClassVar[str] = "features"
    json_name: ClassVar[str] = "features"

    model: str
    sae: SaeInfo
    metrics: FeatureMetrics
    ids: list[str]
    latents: list[Latent]
    codes: SparseCodes | None = field(default=None, repr=False)
    maps: dict[int, list[AppFigure]] = field(default_factory=dict, repr=False)
    sae_file: bytes | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "sae": asdict(self.sae),
            "metrics": asdict(self.metrics),
            "latents": [asdict(x) for x in self.latents],
            "ids": list(self.ids),
        }

    def files(self) -> dict[str, FileData]:
        out: dict[str, FileData] = {}
        if self.codes is not None:
            out["activations.npy"] = self.codes.write_npy
        if self.sae_file is not None:
            out["sae.safetensors"] = self.sae_file
        return out

    def section(self) -> AppSection:
        alive = sorted((x for x in self.latents if x.frequency > 0), key=lambda x: -x.frequency)
        rows = [_row(x) for x in alive]
        header = ["latent", "name", "confidence", "frequency", "mean activation", "top parts (share)"]
        sort = ["number", "text", "number", "number", "number", "text"]
        panels = [_panel(x, self.maps.get(x.id, [])) for x in alive]
        title = "Features: sparse-autoencoder latents, named and located"
        return AppSection("features", title, _summary(self, len(alive)), header, rows, [], "", NOTES, sort, panels)


class Features(AnalysisApplication[FeaturesConfig, FeaturesResult]):
    """``vitdecomp features``: train or read an SAE on an analysis' representation; name and locate
    its latents."""

    name = "features"

    def measure(self, cfg: FeaturesConfig, analysis: Analysis) -> FeaturesResult:
        rows = _rows_of(analysis)
        sae, held_out, info = _sae_for(cfg, rows)
        m = measure_latents(rows, sae, held_out, top=max(cfg.top, 8), progress=cfg.progress)
        to_clip = whole_map(rows, analysis.aligner)
        cands = analysis_candidates(analysis)
        names = name_latents(latent_directions(sae.decoder_directions(), to_clip), cands)
        ids = _ids(rows)
        readers = _readers(analysis, rows, ids, to_clip, cands.directions[[n.index for n in names]])
        held = read_held_out(rows, sae, held_out, readers)
        latents = [
            _latent(j, names[j], held.confidence[j], m, analysis.result.labels, ids) for j in range(sae.n_latents)
        ]
        shown = [x.id for x in sorted(latents, key=lambda x: -x.frequency)[: cfg.show] if x.frequency > 0]
        picks = {
            j: [int(i) for i, v in zip(m.top_rows[j], m.top_values[j], strict=True) if v > 0][: cfg.top] for j in shown
        }
        maps = latent_maps(analysis, sae, picks, ids, progress=cfg.progress)
        metrics = _metrics(m, sae, held.agreement, len(rows))
        return FeaturesResult(
            analysis.result.model.name, info, metrics, ids, latents, m.codes, maps, _sae_bytes(info, sae)
        )


NOTES = [
    "name: the analysis' feature value or vocabulary entry closest to the latent's decoder direction mapped into "
    "CLIP space as the whole representation is (cosine in brackets in the panel); confidence: the share of the "
    "latent's activation on the held-out images that the name's text direction explains (squared correlation).",
    "share of a part: its covariance share of the latent's pre-activation over the images, from the exact split "
    "a_j = sum_i w_j . c_i + const; the shares sum to 1, negative ones work against the latent.",
    "maps: every head's per-token contribution projected on the latent's encoder row (red raises the latent, blue "
    "lowers it); the MLPs and the embedding are not split over tokens and are not in the maps.",
]


def _row(x: Latent) -> list[str]:
    name, conf = f"{x.name} ({x.feature})", _num(x.confidence)
    return [str(x.id), name, conf, f"{x.frequency:.3f}", f"{x.mean_activation:.3g}", _top_parts(x.parts)]


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _top_parts(parts: list[tuple[str, float]]) -> str:
    """The strongest carriers, and the strongest suppressor when there is one."""
    text = ", ".join(f"{lab} {v:+.2f}" for lab, v in parts[:ROW_PARTS] if v > 0)
    low = parts[-1] if parts else None
    return text + (f"; against: {low[0]} {low[1]:+.2f}" if low and low[1] < 0 else "")


def _panel(x: Latent, maps: list[AppFigure]) -> AppPanel:
    strongest = sorted(x.parts, key=lambda p: -abs(p[1]))[:PANEL_PARTS]
    facts = [
        ["name", f"{x.name} ({x.feature}; cosine {x.cosine:.2f})"],
        ["confidence", _num(x.confidence)],
        ["frequency", f"{100 * x.frequency:.1f} % of the images"],
        ["mean activation", f"{x.mean_activation:.3g} (when on)"],
    ]
    bars = sorted(strongest, key=lambda p: -p[1])
    title = "its parts: share of the pre-activation's variation (negative: works against it)"
    return AppPanel(f"latent {x.id}: {x.name}", facts, bars, title, maps)


def _summary(res: FeaturesResult, alive: int) -> str:
    f, s = res.metrics, res.sae
    what = "an SAE trained here" if s.trained else f"the {s.source} SAE {Path(s.file).name}"
    act = f"{s.activation}" + (f", k = {s.k}" if s.k else "")
    return (
        f"{alive} of {s.latents} latents of {what} ({act}) on {res.model}'s representation: explained variance "
        f"{f.explained_variance:.3f} at mean L0 {f.l0:.1f} on {f.n_held_out} held-out images, {f.dead} dead "
        f"({100 * f.dead_fraction:.1f} %). Each latent is named through the aligner and split exactly over the parts "
        f"(largest completeness error {f.max_split_error:.1e})."
    )


def _rows_of(analysis: Analysis) -> Rows:
    """The analysis' store (in memory when small)."""
    path = analysis.result.store.path
    try:
        store = reopen_store(path)
        n = len(store)
    except (OSError, ValueError, KeyError, VitDecompError) as err:
        raise VitDecompError(
            f"cannot read the analysis' store at {path} ({str(err).splitlines()[0][:100]}): run "
            f"`vitdecomp analyze` again with the same options (its cache may have been cleared)"
        ) from None
    if n != analysis.result.images.n:
        raise VitDecompError(f"the store at {path} holds {n} images, the analysis {analysis.result.images.n}: rerun it")
    return readable_rows(store)


def _ids(rows: Rows) -> list[str]:
    ids = getattr(rows, "ids", None)
    return [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(rows))]


def _sae_for(cfg: FeaturesConfig, rows: Rows) -> tuple[SparseAutoencoder, np.ndarray, SaeInfo]:
    """The SAE (read, or trained here), the images it was not trained on (bool ``[N]``), its info."""
    dim = rows.shapes["representation"][0]
    held = np.ones(len(rows), bool)
    if cfg.sae is not None:
        sae = load_sae(cfg.sae)
        check_fits(sae, dim, "the analysed representation")
        return sae, held, SaeInfo.of(sae, str(cfg.sae), False)
    from vitdecomp.sae.training import SaeTrainConfig, train_sae

    trained = train_sae(
        rows, SaeTrainConfig(latents=cfg.latents, k=cfg.k, steps=cfg.steps, seed=cfg.seed), cfg.progress
    )
    held[:] = False
    held[trained.split.val] = True
    return trained.sae, held, SaeInfo.of(trained.sae, "sae.safetensors", True, trained.figures["seconds"])


def _sae_bytes(info: SaeInfo, sae: SparseAutoencoder) -> bytes | None:
    """A trained SAE's file (``None`` for one read from a file)."""
    if not info.trained:
        return None
    from safetensors.torch import save

    from vitdecomp.sae.formats import metadata, tensors

    return save(tensors(sae), metadata=metadata(sae))


def _readers(analysis: Analysis, rows: Rows, ids: list[str], to_clip: torch.Tensor, names: torch.Tensor) -> Readers:
    al = analysis.aligner
    whole = (lambda c, r: r.float()) if al is None else (lambda c, r: al.apply_sum(c).cpu())
    features = {f: analysis.embed(list(v)) for f, v in analysis.result.features.items()}
    heads = {}
    if analysis.subject.attribute_heads:
        image = image_loader(ids[:1], analysis.result.images.root)(ids[0])
        own = own_heads(analysis.subject, image, rows.batch([0], ("contributions",))["contributions"])
        heads = {a: h.predict for a, h in own.items()}
    return Readers(whole, to_clip, names, features, heads)


def _latent(j: int, name: Any, confidence: float, m: LatentMeasures, labels: list[str], ids: list[str]) -> Latent:
    order = np.argsort(-m.shares[:, j], kind="stable")
    parts = [(labels[i], round(float(m.shares[i, j]), 5)) for i in order]
    top = [ids[int(i)] for i, v in zip(m.top_rows[j], m.top_values[j], strict=True) if v > 0]
    conf = None if not math.isfinite(float(confidence)) else round(float(confidence), 4)
    return Latent(
        j,
        name.text,
        name.group,
        round(name.cosine, 4),
        conf,
        float(m.frequency[j]),
        float(m.mean_activation[j]),
        parts,
        top,
    )


def _metrics(
    m: LatentMeasures, sae: SparseAutoencoder, agreement: dict[str, dict[str, float]], n: int
) -> FeatureMetrics:
    dead = int((m.frequency == 0).sum())
    return FeatureMetrics(
        n,
        m.n_held_out,
        m.explained_variance,
        m.l0,
        dead,
        dead / max(sae.n_latents, 1),
        m.max_error,
        m.mean_error,
        agreement,
    )


__all__ = ["Features", "FeaturesConfig", "FeaturesResult", "Latent"]
