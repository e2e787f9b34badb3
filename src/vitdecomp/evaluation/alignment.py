"""The first validation (alignment, per-component probe truth, retrieval, CompAlign ablation) on the built-in world:
:func:`validate_alignment` for one model (:class:`AlignmentRun`), :func:`markdown` for the page.

Superseded for the scores by ``vitdecomp validate`` (:mod:`vitdecomp.evaluation`: causal truths, non-constant
components only, held-out seed); kept for its alignment, retrieval and ablation figures.

``python -m vitdecomp.commands.validate_alignment [--models zoo:deit zoo:simclr zoo:swin zoo:maxvit]
[--out docs/validation-alignment.md]``
(a ``## Notes`` section already in the output file is carried over to the new version).

Data: the aligner is trained (or loaded from the cache) on the analysis set of ``vitdecomp
analyze`` (:data:`vitdecomp.imageset.WORLD_SEED`, 2000 scenes; 10 % held out for early stopping);
every figure below is measured on a disjoint test set (seed ``WORLD_SEED + 1``, 1000 scenes). The
ground-truth probes are fitted on the analysis set and scored on the test set. None of these seeds
was used to train the zoo (1000, 1001, 1500) or by its probes (2001, 2002).

(a) alignment: held-out cosine between the aligned sum and the CLIP image embedding; zero-shot
    accuracy per attribute from the aligned sum vs from CLIP's own embedding (prompt-averaged class
    texts, :data:`vitdecomp.world.PROMPTS`).
(b) ground-truth importance: per attribute, each component's contribution alone (model space) is
    linearly probed for the attribute (multinomial logistic regression, L-BFGS); components are
    ranked by held-out probe accuracy and the Spearman correlation with the score function's
    ranking is averaged over attributes (target >= 0.6 for every zoo model).
(c) the paper's own check: Spearman between a CLIP-derived ranking
    (:func:`vitdecomp.evaluation.agreement.clip_retrieval_scores`) and the score.
(d) text retrieval: precision@20 of images ranked by the cosine between a class text and the
    aligned sum of the attribute's top-3 components vs the full aligned representation vs 3 random
    components (mean over 20 draws), averaged over the classes of each attribute.
Ablation (supervised zoo models, whose classification head gives a reference reading): one shared
map vs CompAlign with lambda = 0 vs lambda = 1 (the published normalisation); held-out cosine and
the match rate of the top-3 TextSpan descriptions of each component (over the 21 class words)
against the top-3 classes read through the model's own linear head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitdecomp.align import Aligner, aligned_component, evaluate, train_ablation
from vitdecomp.defaults import ALIGN_STEPS, DEFAULT_N_IMAGES, WORLD_SEED
from vitdecomp.evaluation.agreement import clip_retrieval_scores, spearman
from vitdecomp.evaluation.truths import probe_importance
from vitdecomp.evaluation.world_runs import WorldRun, prepare
from vitdecomp.scores import ScoreTable, score_features
from vitdecomp.store import Rows
from vitdecomp.text import text_span
from vitdecomp.world import ATTRIBUTES, CORE_ATTRIBUTES

MODELS = ("zoo:deit", "zoo:simclr", "zoo:swin", "zoo:maxvit")
N_TEST = 1000
TEST_SEED = WORLD_SEED + 1
TARGET_SPEARMAN = 0.6
TOP_K = 3
PRECISION_AT = 20
#: Draws of random components retrieval is compared with.
RANDOM_DRAWS = 20
METHODS = ("invariant", "paper", "share")


# ----------------------------------------------------------------------------------------------
# pieces


@torch.no_grad()
def zero_shot(
    al: Aligner, rows: Rows, classes: dict[str, torch.Tensor], attrs: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Zero-shot accuracy from the aligned sum and from the reader's own image embedding."""
    b = rows.batch(slice(None))
    z_al = F.normalize(al.apply_sum(b["contributions"]).float().cpu(), dim=-1)
    z_clip = F.normalize(b["clip"], dim=-1)
    out: dict[str, Any] = {"aligned": {}, "clip": {}}
    for a, t in classes.items():
        y = torch.from_numpy(attrs[a])
        out["aligned"][a] = float(((z_al @ t.T).argmax(1) == y).float().mean())
        out["clip"][a] = float(((z_clip @ t.T).argmax(1) == y).float().mean())
    return out


@torch.no_grad()
def retrieval_precision(
    al: Aligner,
    rows: Rows,
    classes: dict[str, torch.Tensor],
    attrs: dict[str, np.ndarray],
    tables: dict[str, ScoreTable],
    k: int = TOP_K,
    at: int = PRECISION_AT,
) -> dict[str, dict[str, float]]:
    """Precision@``at`` of class-text retrieval with the attribute's top-``k`` components (by the
    invariant score), the whole aligned representation, and ``k`` random components (the mean over
    :data:`RANDOM_DRAWS` draws)."""
    aligned = al.apply(rows.batch(slice(None))["contributions"]).float().cpu()  # [N, C, d]
    whole = aligned.sum(1) + al.bias.float().cpu()
    g = np.random.default_rng(0)
    n_comp = aligned.shape[1]
    out: dict[str, dict[str, float]] = {"top": {}, "full": {}, "random": {}}

    def prec(z: torch.Tensor, t: torch.Tensor, y: np.ndarray) -> float:
        sims = F.normalize(z, dim=-1) @ t.T  # [N, K]
        top = sims.topk(min(at, len(z)), dim=0).indices  # [at, K]
        return float(np.mean([(y[top[:, j].numpy()] == j).mean() for j in range(t.shape[0])]))

    for a, t in classes.items():
        y = attrs[a]
        labels = tables["invariant"].labels
        best = [labels.index(lab) for lab, _ in tables["invariant"].ranking(a, k)]
        out["top"][a] = prec(aligned[:, best].sum(1), t, y)
        out["full"][a] = prec(whole, t, y)
        rnd = [prec(aligned[:, g.choice(n_comp, k, replace=False)].sum(1), t, y) for _ in range(RANDOM_DRAWS)]
        out["random"][a] = float(np.mean(rnd))
    return out


@torch.no_grad()
def head_reading(loaded: Any, rows: Rows, words: list[str], k: int = TOP_K) -> dict[str, list[str]] | None:
    """Per component, the top-``k`` classes read through the model's own linear head (TextSpan over
    the head's class directions in model space), or ``None`` without a linear head."""
    head = getattr(loaded.model, "head", None)
    fc = getattr(head, "fc", head)
    if not isinstance(fc, torch.nn.Linear) or fc.out_features != len(words):
        return None
    w = fc.weight.detach().float().cpu()  # [classes, D]
    if w.shape[1] != rows.shapes["contributions"][1]:
        return None
    return {lab: [d.text for d in text_span(rows.component(i), w, words, k)] for i, lab in enumerate(rows.labels)}


@torch.no_grad()
def match_rate(
    al: Aligner, rows: Rows, class_emb: torch.Tensor, words: list[str], reference: dict[str, list[str]], k: int = TOP_K
) -> float:
    """Mean overlap of each varying component's top-``k`` aligned TextSpan picks with its head reading."""
    rates = []
    for i, lab in enumerate(rows.labels):
        ref = reference.get(lab) or []
        if not ref:
            continue  # constant component: nothing to read
        outputs = aligned_component(rows, al, i).cpu()
        picks = [d.text for d in text_span(outputs, class_emb, words, k)]
        rates.append(len(set(picks) & set(ref)) / k)
    return float(np.mean(rates)) if rates else float("nan")


def _spearmans(tables: dict[str, ScoreTable], truth: dict[str, np.ndarray], method: str) -> dict[str, float]:
    t = tables[method]
    return {a: spearman(t[a], torch.from_numpy(truth[a])) for a in truth}


# ----------------------------------------------------------------------------------------------
# one model


@dataclass(kw_only=True)
class AlignmentRun(WorldRun):
    """One subject model's first validation (a :class:`~vitdecomp.evaluation.world_runs.WorldRun`
    whose reader is random too with ``random_init``); ``ablation``: also the CompAlign ablation."""

    n_test: int = N_TEST
    test_seed: int = TEST_SEED
    ablation: bool = False

    def __post_init__(self) -> None:
        self.random_reader = self.random_init


def validate_alignment(run: AlignmentRun) -> dict[str, Any]:
    """Every figure (a)-(d) for one subject model (and the CompAlign ablation when ``run.ablation``)."""
    t0 = time.time()
    p = prepare(run)
    train, test, al, classes = p.train, p.test, p.aligned.aligner, p.classes
    attrs_te = p.test_source.attributes
    res: dict[str, Any] = {
        "model": run.name,
        "weights_id": p.models.subject.weights_id,
        "clip": p.models.reader.weights_id,
    }
    res["n_components"] = len(train.labels)
    res["n_train"], res["n_test"] = len(train), len(test)
    res["alignment"] = {  # (a)
        "state": p.aligned.state,
        "aligner": str(p.aligned.path),
        "val_cosine_early_stopping": al.metrics.get("val_cosine"),
        "test_cosine": evaluate(al, test)["cosine"],
        "zero_shot": zero_shot(al, test, classes, attrs_te),
    }
    tables = score_features(test, al, p.features, methods=METHODS, progress=run.progress)  # scores on the test set
    truth = probe_importance(train, test, p.train_source.attributes, attrs_te, progress=run.progress)  # (b)
    res["probe_accuracy"] = {a: dict(zip(train.labels, v.tolist(), strict=True)) for a, v in truth.items()}
    res["spearman_probe"] = {m: _spearmans(tables, truth, m) for m in METHODS}
    clip_rank = {a: clip_retrieval_scores(test, al, p.features[a]).numpy() for a in CORE_ATTRIBUTES}  # (c)
    res["spearman_clip"] = {
        m: {a: spearman(tables[m][a], torch.from_numpy(clip_rank[a])) for a in CORE_ATTRIBUTES} for m in METHODS
    }
    res["retrieval_p20"] = retrieval_precision(al, test, classes, attrs_te, tables)  # (d)
    res["top_components"] = {a: tables["invariant"].ranking(a, TOP_K) for a in CORE_ATTRIBUTES}
    if run.ablation:
        subject = p.models.subject
        res["ablation"] = alignment_ablation(subject, train, test, classes, run.align_steps, run.device, run.progress)
    res["time_s"] = round(time.time() - t0, 1)
    return res


def summary_line(r: dict[str, Any], random_init: bool) -> str:
    """One line per model run: its test cosine and its Spearman against the probe truth."""
    sp = _mean(r["spearman_probe"]["invariant"])
    tag = " (random init)" if random_init else ""
    return f"{r['model']}{tag}: test cosine {r['alignment']['test_cosine']:.3f}, Spearman vs probe {sp:.3f}"


def alignment_ablation(
    subject: Any,
    train: Rows,
    test: Rows,
    classes: dict[str, torch.Tensor],
    align_steps: int = ALIGN_STEPS,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """One shared map vs CompAlign with lambda = 0 vs lambda = 1, trained on ``train``: each one's
    test cosine and match rate against the reading through ``subject``'s own linear head."""
    words = [w for a in CORE_ATTRIBUTES for w in ATTRIBUTES[a]]
    ref = head_reading(subject, train, words)
    if ref is None:
        return {"skipped": "no linear head over the world's classes to read components with"}
    class_emb = torch.cat([classes[a] for a in CORE_ATTRIBUTES])
    trained = train_ablation(train, train.labels, max_steps=align_steps, device=device, progress=progress)
    return {
        k: {
            "test_cosine": evaluate(v, test)["cosine"],
            "match_rate": match_rate(v, test, class_emb, words, ref),
            "steps": v.metrics.get("steps"),
        }
        for k, v in trained.items()
    }


# ----------------------------------------------------------------------------------------------
# the document


def _mean(d: dict[str, float] | None) -> float | None:
    return None if d is None else float(np.mean(list(d.values())))


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _summary_rows(results: list[dict[str, Any]], label: str = "") -> list[str]:
    rows = []
    for r in results:
        zs = r["alignment"]["zero_shot"]
        sp = _mean(r["spearman_probe"]["invariant"])
        ok = "met" if sp >= TARGET_SPEARMAN else "**missed**"
        p = r["retrieval_p20"]
        rows.append(
            f"| {r['model']}{label} | {r['n_components']} | {_f(r['alignment']['test_cosine'])} "
            f"| {_f(_mean(zs['aligned']))} / {_f(_mean(zs['clip']))} "
            f"| {_f(sp)} ({ok}) | {_f(_mean(r['spearman_probe']['paper']))} "
            f"/ {_f(_mean(r['spearman_probe'].get('share')))} "
            f"| {_f(_mean(r['spearman_clip']['invariant']))} "
            f"| {_f(_mean(p['top']))} / {_f(_mean(p['full']))} / {_f(_mean(p['random']))} |"
        )
    return rows


_SUMMARY_HEAD = [
    "| model | comps | (a) test cosine | (a) zero-shot aligned / CLIP (mean of 4) "
    "| (b) Spearman vs probe, invariant (target >= 0.6) | (b) paper / share score "
    "| (c) Spearman vs CLIP ranking "
    "| (d) P@20 top-3 / full / random-3 |",
    "|---|---|---|---|---|---|---|---|",
]


def _intro_lines(results: list[dict[str, Any]], argv: list[str], meta: dict[str, Any]) -> list[str]:
    cmd = "python -m vitdecomp.commands.validate_alignment " + " ".join(argv)
    n_train = results[0]["n_train"] if results else DEFAULT_N_IMAGES
    n_test = results[0]["n_test"] if results else N_TEST
    return [
        "# Validation on the built-in world",
        "",
        "Measured by `python -m vitdecomp.commands.validate_alignment` (numbers below are written by the script; "
        "rerun it to refresh):",
        "",
        "```",
        cmd.strip(),
        "```",
        "",
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads; "
        f"total time {meta['time_s'] / 60:.1f} min (stores and aligners are cached after the first run).",
        "",
        f"Data: aligner trained on the `vitdecomp analyze` set (world seed {WORLD_SEED}, {n_train} scenes, "
        f"10 % held out for early stopping); every figure measured on {n_test} other scenes (seed {TEST_SEED}). "
        "Probes of (b) are fitted on the first set and scored on the second. No seed overlaps the zoo's "
        "training (1000, 1001, 1500) or probe (2001, 2002) sets. CLIP = the zoo's CLIP.",
        "",
    ]


def _attribute_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        f"### {r['model']} (`{r['weights_id']}`)",
        "",
        "| attribute | zero-shot aligned | zero-shot CLIP | Spearman probe (invariant) | Spearman probe (paper) "
        "| Spearman CLIP-rank (invariant) | P@20 top-3 | P@20 full | P@20 random-3 | top-3 components "
        "(invariant score) | best probe components |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    zs, p = r["alignment"]["zero_shot"], r["retrieval_p20"]
    for a in CORE_ATTRIBUTES:
        top = ", ".join(f"{lab} ({v:.2f})" for lab, v in r["top_components"][a])
        pa = r["probe_accuracy"][a]
        best = ", ".join(f"{lab} ({v:.2f})" for lab, v in sorted(pa.items(), key=lambda kv: -kv[1])[:3])
        lines.append(
            f"| {a} | {_f(zs['aligned'][a])} | {_f(zs['clip'][a])} | {_f(r['spearman_probe']['invariant'][a])} "
            f"| {_f(r['spearman_probe']['paper'][a])} | {_f(r['spearman_clip']['invariant'][a])} "
            f"| {_f(p['top'][a])} | {_f(p['full'][a])} | {_f(p['random'][a])} | {top} | {best} |"
        )
    return [*lines, ""]


def _ablation_lines(results: list[dict[str, Any]]) -> list[str]:
    abl = [r for r in results if "ablation" in r]
    if not abl:
        return []
    lines = [
        "## CompAlign ablation (paper: one shared map < lambda = 0 < lambda > 0)",
        "",
        "Held-out cosine to the CLIP embedding (test set) and the match rate: the share of each "
        f"component's top-{TOP_K} TextSpan picks over the 21 class words (aligned contribution vs CLIP "
        f"class texts) that are among its top-{TOP_K} classes read through the model's own linear head "
        "(the reference the paper takes from the pretrained classifier), averaged over the non-constant "
        "components.",
        "",
        "| model | shared map: cosine / match | lambda = 0: cosine / match | lambda = 1 (published): cosine / match |",
        "|---|---|---|---|",
    ]
    for r in abl:
        a = r["ablation"]
        if "skipped" in a:
            lines.append(f"| {r['model']} | skipped: {a['skipped']} | | |")
            continue
        cells = [
            f"{_f(a[k]['test_cosine'])} / {_f(a[k]['match_rate'], 2)}" for k in ("shared", "lambda=0", "compalign")
        ]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(
    results: list[dict[str, Any]],
    argv: list[str],
    meta: dict[str, Any],
    control: list[dict[str, Any]] | None = None,
) -> str:
    """The validation document; ``control``: results of the same script on random-init weights."""
    lines = _intro_lines(results, argv, meta)
    lines += ["## Summary against the targets", "", *_SUMMARY_HEAD, *_summary_rows(results)]
    if control:
        lines += [
            "",
            "Control: the same script on random-init weights of the same architectures (`--random-init`; "
            "zoo CLIP random-init as well), to show what the figures are worth when nothing was learned:",
            "",
            *_SUMMARY_HEAD,
            *_summary_rows(control, " (random init)"),
        ]
    lines += ["", "## Per attribute", ""]
    for r in results:
        lines += _attribute_lines(r)
    lines += _ablation_lines(results)
    lines += ["## Definitions", "", (__doc__ or "").split("\n\n", 2)[2].strip(), ""]
    return "\n".join(lines)
