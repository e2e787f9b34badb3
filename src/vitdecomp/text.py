"""Text in CLIP space: prompt-averaged text embeddings (cached) and TextSpan-style descriptions.

:class:`TextEncoder` embeds each description under every prompt template, normalises each prompt's
embedding, averages over templates and normalises again (``[T, d_clip]``). Embeddings are cached on
disk per (CLIP weights id, templates) in one safetensors file holding every text seen so far.

:func:`text_span` names what one component does across an image set: it greedily picks the
vocabulary entries whose directions explain most of the component's (centred) variance, projecting
each picked direction out of both the component outputs and the remaining text directions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vitdecomp.align import Aligner, aligned_component
from vitdecomp.store import RowSource, as_rows
from vitdecomp.world import ATTRIBUTES, CORE_ATTRIBUTES, prompt_texts

#: Generic prompt templates for descriptions of real images; ``{}`` is the description.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a picture of {}.",
    "an image of {}.",
    "a close-up photo of {}.",
    "a cropped photo of {}.",
    "a bright photo of {}.",
    "a blurry photo of {}.",
    "a photo showing {}.",
)
#: Prompt templates for the built-in world's descriptions (one word or a short phrase each).
WORLD_TEMPLATES: tuple[str, ...] = ("{}", "a {}", "a photo of {}", "a picture of {}")


def normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def _cache_name(weights_id: str, templates: Sequence[str]) -> str:
    blob = json.dumps({"weights": weights_id, "templates": list(templates)}, sort_keys=True)
    return f"text-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.safetensors"


class TextEncoder:
    """Prompt-averaged, normalised CLIP text embeddings with an on-disk cache.

    ``model`` has ``encode_text(tokens) -> [B, d_clip]`` (an open_clip CLIP model), ``tokenizer``
    maps a list of strings to tokens. The cache (``cache_dir``) is keyed by ``weights_id`` +
    templates + text; without ``weights_id`` nothing is cached. ``calls`` counts model batches.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Callable[[list[str]], torch.Tensor],
        weights_id: str | None = None,
        *,
        cache_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 256,
    ) -> None:
        self.model, self.tokenizer, self.weights_id = model, tokenizer, weights_id
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if device is None:
            try:
                device = next(model.parameters()).device
            except (AttributeError, StopIteration):
                device = "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.calls = 0
        self.progress = False  # a bar while embedding more than two batches of prompts
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_loaded(cls, loaded: Any, cache_dir: str | Path | None = None, **kwargs: Any) -> TextEncoder:
        """From a :class:`~vitdecomp.models.LoadedModel` of a CLIP model."""
        if getattr(loaded, "tokenizer", None) is None:
            raise ValueError(f"{loaded.name} is not a CLIP model (no tokenizer): it cannot embed text")
        return cls(loaded.model, loaded.tokenizer, loaded.weights_id, cache_dir=cache_dir, **kwargs)

    # ------------------------------------------------------------------ cache
    def _cache_file(self, templates: Sequence[str]) -> Path | None:
        if self.cache_dir is None or self.weights_id is None:
            return None
        return self.cache_dir / _cache_name(self.weights_id, templates)

    def _load(self, templates: Sequence[str]) -> dict[str, torch.Tensor]:
        name = json.dumps(list(templates))
        if name in self._memory:
            return self._memory[name]
        table: dict[str, torch.Tensor] = {}
        f = self._cache_file(templates)
        if f is not None and f.exists():
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("weights_id") == self.weights_id and json.loads(meta["templates"]) == list(templates):
                    emb = fh.get_tensor("embeddings")
                    table = {t: emb[i] for i, t in enumerate(json.loads(meta["texts"]))}
        self._memory[name] = table
        return table

    def _save(self, templates: Sequence[str], table: dict[str, torch.Tensor]) -> None:
        f = self._cache_file(templates)
        if f is None or not table:
            return
        from safetensors.torch import save_file

        f.parent.mkdir(parents=True, exist_ok=True)
        texts = list(table)
        meta = {
            "weights_id": str(self.weights_id),
            "templates": json.dumps(list(templates)),
            "texts": json.dumps(texts),
        }
        tmp = f.with_name(f.name + f".{os.getpid()}.tmp")
        save_file({"embeddings": torch.stack([table[t] for t in texts]).contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, f)

    # --------------------------------------------------------------- encoding
    @torch.no_grad()
    def _embed(self, texts: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        prompts = [t.format(x) for x in texts for t in templates]
        out = []
        quiet = not self.progress or len(prompts) <= 2 * self.batch_size
        for s in tqdm(range(0, len(prompts), self.batch_size), desc="embed texts", unit="batch", disable=quiet):
            tokens = self.tokenizer(prompts[s : s + self.batch_size]).to(self.device)
            self.calls += 1
            out.append(normalize(self.model.encode_text(tokens).float()).cpu())
        emb = torch.cat(out).view(len(texts), len(templates), -1)
        return normalize(emb.mean(1))

    def encode(self, texts: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """Embeddings ``[T, d_clip]`` (float32, CPU, unit norm) of ``texts`` averaged over ``templates``."""
        templates = tuple(templates)
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"every template needs a '{{}}' for the description: {templates}")
        texts = [str(t) for t in texts]
        table = self._load(templates)
        missing = list(dict.fromkeys(t for t in texts if t not in table))
        if missing:
            for text, emb in zip(missing, self._embed(missing, templates), strict=True):
                table[text] = emb
            self._save(templates, table)
        if not texts:
            return torch.zeros(0, next(iter(table.values())).shape[0] if table else 0)
        return torch.stack([table[t] for t in texts])

    __call__ = encode


@torch.no_grad()
def world_class_embeddings(encode: Callable[[list[str]], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per core attribute of the built-in world, ``[n_classes, d]`` unit class embeddings: each the
    normalised mean of the unit embeddings of the class's prompts (:data:`vitdecomp.world.PROMPTS`).
    ``encode``: texts -> ``[T, d]`` (any CLIP text encoder)."""
    out = {}
    for attr in CORE_ATTRIBUTES:
        rows = [normalize(encode(prompt_texts(attr, v)).float()).mean(0) for v in range(len(ATTRIBUTES[attr]))]
        out[attr] = normalize(torch.stack(rows))
    return out


# --------------------------------------------------------------------- vocabularies
def _data_dir() -> Any:
    return resources.files("vitdecomp").joinpath("data")


def vocabulary_names() -> list[str]:
    """Names of the vocabularies shipped in ``vitdecomp/data`` (``vocab_<name>.txt``)."""
    files = _data_dir().iterdir()
    return sorted(f.name[6:-4] for f in files if f.name.startswith("vocab_") and f.name.endswith(".txt"))


def load_vocabulary(name_or_path: str | Path = "general") -> list[str]:
    """A vocabulary: a shipped one by name (``"general"``, ``"world"``) or a text file, one entry a line.

    Blank lines and ``#`` comments are skipped; duplicates are dropped (first kept).
    """
    path = Path(name_or_path)
    if path.suffix == ".txt" and path.exists():
        text = path.read_text()
    else:
        res = _data_dir().joinpath(f"vocab_{name_or_path}.txt")
        if not res.is_file():
            raise ValueError(f"no vocabulary {name_or_path!r}: give a .txt file or one of {vocabulary_names()}")
        text = res.read_text()
    entries = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return list(dict.fromkeys(e for e in entries if e))


# --------------------------------------------------------------------- TextSpan
@dataclass(frozen=True)
class Description:
    """One pick of :func:`text_span`.

    ``explained``: fraction of the component's total variance across images carried by this
    (residual) text direction; ``projection``: mean projection of the component's outputs on the
    unit text embedding (sign: whether the component adds or removes the description on average).
    """

    text: str
    index: int
    explained: float
    projection: float


@torch.no_grad()
def text_span(
    outputs: torch.Tensor,
    text_emb: torch.Tensor,
    texts: Sequence[str],
    k: int = 5,
    *,
    center_texts: bool = False,
) -> list[Description]:
    """Greedy TextSpan over one component: ``outputs [N, d_clip]`` (aligned contributions of the
    component over N images), ``text_emb [T, d_clip]`` (vocabulary embeddings) -> ``k`` picks.

    Each step picks the text whose residual direction carries the most variance of the centred
    outputs, then projects that direction out of the outputs and of every text direction.
    ``center_texts`` subtracts the vocabulary's mean embedding first (removes the direction all
    CLIP text embeddings share, so picks are about what distinguishes the entries).
    """
    if text_emb.shape[0] != len(texts):
        raise ValueError(f"{text_emb.shape[0]} text embeddings for {len(texts)} texts")
    x = outputs.double()
    t = normalize(text_emb.to(x))
    mean_proj = x.mean(0) @ t.T  # [T]
    if center_texts:
        t = t - t.mean(0)
    x = x - x.mean(0)
    total = x.square().sum().item()
    n, d = x.shape
    if n > d:  # same second moments with d rows: ||X v||^2 = ||R v||^2 for R^T R = X^T X
        evals, evecs = torch.linalg.eigh(x.T @ x)
        x = evals.clamp_min(0).sqrt()[:, None] * evecs.T
    resid = t.clone()
    picked: list[Description] = []
    alive = torch.ones(len(texts), dtype=torch.bool, device=x.device)
    for _ in range(min(k, len(texts))):
        norms2 = resid.square().sum(1)
        ok = alive & (norms2 > 1e-10)
        if total <= 0 or not ok.any():
            break
        var = (x @ resid.T).square().sum(0) / norms2.clamp_min(1e-30)
        var[~ok] = -1.0
        best = int(var.argmax())
        picked.append(Description(texts[best], best, var[best].item() / total, mean_proj[best].item()))
        alive[best] = False
        p = resid[best] / norms2[best].sqrt()
        x = x - (x @ p)[:, None] * p
        resid = resid - (resid @ p)[:, None] * p
    return picked


def component_descriptions(
    source: RowSource,
    aligner: Aligner,
    text_emb: torch.Tensor,
    texts: Sequence[str],
    k: int = 5,
    *,
    max_images: int | None = 4096,
    center_texts: bool = False,
    progress: bool = True,
) -> dict[str, list[Description]]:
    """TextSpan for every component of rows / contributions ``[N, C, D]``.

    Reads one component column at a time and maps it with ``aligner`` (see
    :func:`vitdecomp.align.aligned_component`); uses at most ``max_images`` images (the first ones).
    Returns ``{component name: [Description, ...]}`` in component order.
    """
    rows = as_rows(source)
    text_emb = text_emb.to(aligner.device)
    out: dict[str, list[Description]] = {}
    for i in tqdm(range(aligner.n_components), desc="describe components", unit="comp", disable=not progress):
        outputs = aligned_component(rows, aligner, i, stop=max_images)
        out[aligner.labels[i]] = text_span(outputs, text_emb, texts, k, center_texts=center_texts)
    return out
