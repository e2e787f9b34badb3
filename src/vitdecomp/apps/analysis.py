"""What the applications read from a finished analysis (``vitdecomp analyze --out DIR``): the subject
and reader models, the aligner, the text encoder, the feature scores and the store.

Two documented rules choose components without any per-model table:

* :func:`auto_heads` — for a heatmap, the ``2 ceil(sqrt(H))`` attention heads with the highest score
  for the feature (``H`` = the model's number of heads: 8 of 16, 24 of 144; measured on the built-in
  world against ``ceil(sqrt(H))``, docs/applications.md: the colour maps of the zoo models point into the
  object at 0.92–1.00 instead of 0.86–1.00);
* :func:`auto_k` — for retrieval, the ``2 ceil(sqrt(C))`` components with the highest score (``C`` = the
  number of components: 12 of 32, 26 of 160; measured against ``ceil(sqrt(C))`` in docs/applications.md:
  image retrieval by a feature's reading matches it more often, the other attributes still at chance).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vitdecomp.align import Aligner, load_aligner
from vitdecomp.errors import UsageError, VitDecompError, one_line
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.pipeline.model_pair import load_model_for
from vitdecomp.results import AnalysisResult
from vitdecomp.text import WORLD_TEMPLATES, TextEncoder


@dataclass
class Analysis:
    """A finished analysis, ready for the applications."""

    result: AnalysisResult
    subject: LoadedModel
    reader: LoadedModel
    aligner: Aligner | None  # None: identity (a CLIP subject read in its own space)
    encoder: TextEncoder
    out: Path

    @property
    def templates(self) -> tuple[str, ...]:
        return tuple(self.result.vocabulary.templates) or WORLD_TEMPLATES

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit text embeddings ``[T, d_clip]`` under the analysis' prompt templates."""
        return self.encoder.encode(texts, self.templates)

    @property
    def logit_scale(self) -> float:
        """The reader's zero-shot logit scale (CLIP's learned ``exp(logit_scale)``; 100 when it has none)."""
        scale = getattr(self.reader.model, "logit_scale", None)
        return 100.0 if scale is None else float(torch.as_tensor(scale).detach().float().exp())

    def scores(self, feature: str) -> dict[str, float]:
        """Every component's score for ``feature`` (label -> score)."""
        table = self.result.scores[self.result.method()]
        if feature not in table:
            raise VitDecompError(f"no feature {feature!r} in this analysis; features: {sorted(table)}")
        return table[feature]

    def feature_of(self, text_emb: torch.Tensor) -> str:
        """The feature whose value texts come closest (cosine) to a text embedding ``[d_clip]``."""
        best, where = -2.0, None
        for feature, values in self.result.features.items():
            sim = (self.embed(list(values)) @ text_emb.float()).max().item()
            if sim > best:
                best, where = sim, feature
        return where


def auto_heads(scores: dict[str, float], labels: list[str]) -> list[str]:
    """The ``2 ceil(sqrt(H))`` heads (names like ``L3.H1`` or ``S1.B0.H2``) with the highest score."""
    heads = [lab for lab in labels if _is_head(lab)]
    n = min(len(heads), 2 * math.ceil(math.sqrt(len(heads))))
    return sorted(heads, key=lambda lab: -scores.get(lab, float("-inf")))[:n]


def auto_k(n_components: int) -> int:
    """Number of top-scored components retrieval sums: ``2 ceil(sqrt(C))`` (at most ``C``)."""
    return max(1, min(n_components, 2 * math.ceil(math.sqrt(n_components))))


def _is_head(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last.startswith("H") and last[1:].isdigit()


def check_heads(heads: Sequence[str], labels: Sequence[str], model: str = "the model") -> None:
    """Refuse head names that are not attention heads among ``labels`` (a one-line
    :class:`UsageError` naming them and the heads there are)."""
    have = [lab for lab in labels if _is_head(lab)]
    if not heads:
        raise UsageError("--heads: give head names, comma-separated (e.g. L0.H1), or auto")
    bad = [h for h in heads if h not in have]
    if not bad:
        return
    parts = [f"{h} is a component, not an attention head" if h in labels else f"no head {h}" for h in bad]
    shown = f"{have[0]} ... {have[-1]}" if len(have) > 2 else ", ".join(have)
    raise UsageError(f"--heads: {'; '.join(parts)} in {model}: its {len(have)} heads are {shown} (or --heads auto)")


def _load_as(name: str, weights_id: str, checkpoint: str | Path | None, device: str) -> LoadedModel:
    """The model an analysis used, by name and weights id (random weights drawn again from their seed)."""
    seed = re.search(r":seed=(\d+)$", weights_id)
    random_init = "random-init" in weights_id
    loaded = load_model_for(name, checkpoint, random_init, device, int(seed.group(1)) if seed else None)
    if loaded.weights_id != weights_id:
        raise VitDecompError(
            f"{name} loads as {loaded.weights_id}, the analysis was of {weights_id}: "
            "give the same weights (--checkpoint)"
        )
    return loaded


def load_analysis(out: str | Path, device: str = "cpu", checkpoint: str | Path | None = None) -> Analysis:
    """Read ``out/results.json`` and load what it names (models, aligner, text encoder)."""
    out = Path(out)
    result = analysis_result(out)
    refuse_untrained(result, out)
    subject = _load_as(result.model.name, result.model.weights_id, checkpoint, device)
    same = result.reader.name == result.model.name and result.reader.weights_id == result.model.weights_id
    reader = subject if same else _load_as(result.reader.name, result.reader.weights_id, None, device)
    return analysis_of(result, subject, reader, out, device)


def analysis_result(out: str | Path) -> AnalysisResult:
    """The ``results.json`` of the analysis folder ``out`` (nothing loaded), or a one-line error."""
    path = Path(out) / "results.json"
    if not path.exists():
        raise VitDecompError(f"no analysis at {out} (no results.json): run `vitdecomp analyze --out {out}` first")
    try:
        return AnalysisResult.load(path)
    except (ValueError, KeyError, TypeError) as err:
        raise VitDecompError(f"{path} is not the results.json of an analysis ({one_line(err)})") from err


def refuse_untrained(result: AnalysisResult, out: str | Path) -> None:
    """An analysis made with ``--align-steps 0`` has no saved aligner to read its components with."""
    if result.alignment.state == "untrained":
        raise VitDecompError(
            f"the analysis in {out} has an untrained aligner (--align-steps 0), which is not saved: run "
            "`vitdecomp analyze` again with --align-steps > 0 to make heatmaps and retrievals"
        )


def analysis_of(
    result: AnalysisResult, subject: LoadedModel, reader: LoadedModel, out: str | Path, device: str = "cpu"
) -> Analysis:
    """An analysis from models already loaded (as ``vitdecomp analyze`` holds them): the aligner and
    the text encoder's cache are read from where ``result`` says they are."""
    refuse_untrained(result, out)
    aligner = None
    if result.aligner.path is not None:
        aligner = load_aligner(result.aligner.path, labels=result.labels, device="cpu")
        aligner = None if aligner.mode == "identity" else aligner
    cache = Path(result.cache.dir) / "text"
    encoder = TextEncoder.from_loaded(reader, cache_dir=cache, device=device)
    return Analysis(result, subject, reader, aligner, encoder, Path(out))


def image_loader(image_ids: list[str], root: str = "") -> Callable[[str], Image.Image]:
    """``row id -> PIL image`` for the ids shown: files (relative to the analysed folder ``root``), or
    generated world scenes ``world-SEED-ROW`` (each seed's scenes made once)."""
    from vitdecomp.imageset import read_image
    from vitdecomp.world import make_scenes

    world: dict[int, int] = {}
    for i in image_ids:
        if i.startswith("world-"):
            _, seed, row = i.split("-")
            world[int(seed)] = max(world.get(int(seed), 0), int(row) + 1)
    scenes = {seed: make_scenes(n, seed=seed) for seed, n in world.items()}

    def load(image_id: str):
        if image_id.startswith("world-"):
            _, seed, row = image_id.split("-")
            return scenes[int(seed)].pil(int(row))
        return read_image(Path(root) / image_id if root else image_id)

    return load
