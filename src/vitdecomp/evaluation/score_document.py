"""The Markdown page of ``vitdecomp validate`` (docs/validation.md): tables built from the results of
:func:`vitdecomp.evaluation.score_validation.validate_model`."""

from __future__ import annotations

from typing import Any

import numpy as np

from vitdecomp.evaluation import counterfactual
from vitdecomp.evaluation import truths as truths_module
from vitdecomp.evaluation.agreement import spearman as spearman_of
from vitdecomp.evaluation.components import CONSTANT_RTOL
from vitdecomp.evaluation.settings import (
    DEV_SEED,
    PAIR_SEED_OFFSET,
    TARGET_FLOW,
    TARGET_PLANTED,
    TARGET_SPEARMAN,
    TRUTHS,
)
from vitdecomp.scores.registry import DEFAULT_SCORE
from vitdecomp.world import CORE_ATTRIBUTES


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _mean(d: dict[str, float]) -> float:
    return float(np.mean(list(d.values())))


def _scores(results: list[dict[str, Any]]) -> list[str]:
    return list(results[0]["agreement"]) if results else []


def summary_table(
    results: list[dict[str, Any]], truth: str = "causal_mean", target: float | None = TARGET_SPEARMAN
) -> list[str]:
    """One row per model: each score's Spearman with ``truth``, mean over the attributes, and the
    magnitude baseline's; the default score's ``target`` met or missed (``None``: no target)."""
    scores = _scores(results)
    head = "| model | evaluated / all components | " + " | ".join(f"`{m}`" for m in scores) + " | magnitude alone |"
    lines = [head, "|---|---|" + "---|" * (len(scores) + 1)]
    for r in results:
        tag = " (random init)" if r["random_init"] else ""
        cells = []
        for m in scores:
            v = _mean(r["agreement"][m][truth])
            mark = ""
            if target is not None and m == DEFAULT_SCORE and not r["random_init"]:
                mark = " (met)" if v >= target else f" (**missed** by {target - v:.2f})"
            cells.append(f"{_f(v)}{mark}")
        cells.append(_f(_mean(r["magnitude"][truth])) if "magnitude" in r else "-")
        lines.append(f"| {r['model']}{tag} | {len(r['evaluated'])} / {len(r['labels'])} | " + " | ".join(cells) + " |")
    return lines


def control_table(control: list[dict[str, Any]]) -> list[str]:
    """One row per random-init model: each score's Spearman with the *trained* model's causal truth
    (the control), then with its own (a faithfulness check, not a control); means over the attributes."""
    rows = [r for r in control if "control_agreement" in r]
    if not rows:
        return []
    scores = _scores(rows)
    lines = [
        "| random-init model | "
        + " | ".join(f"`{m}` vs trained truth" for m in scores)
        + " | random truth vs trained truth | "
        + " | ".join(f"`{m}` vs own truth" for m in scores)
        + " |",
        "|---|" + "---|" * (2 * len(scores) + 1),
    ]
    for r in rows:
        ctrl = " | ".join(_f(_mean(r["control_agreement"][m])) for m in scores)
        own = " | ".join(_f(_mean(r["agreement"][m]["causal_mean"])) for m in scores)
        lines.append(f"| {r['model']} | {ctrl} | {_f(_mean(r['control_agreement']['truth']))} | {own} |")
    return lines


def attribute_table(results: list[dict[str, Any]], truth: str = "causal_mean") -> list[str]:
    """One row per model and attribute: each score's Spearman with ``truth``."""
    scores = _scores(results)
    lines = ["| model | attribute | " + " | ".join(f"`{m}`" for m in scores) + " |", "|---|---|" + "---|" * len(scores)]
    for r in results:
        for a in CORE_ATTRIBUTES:
            cells = " | ".join(_f(r["agreement"][m][truth][a]) for m in scores)
            lines.append(f"| {r['model']} | {a} | {cells} |")
    return lines


def unsigned_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per model and score: mean Spearman of ``|score|`` with ``|flow share|`` and with the
    causal truth, beside the signed score's."""
    lines = [
        "| model | score | signed vs flow | \\|score\\| vs \\|flow\\| | signed vs causal | \\|score\\| vs causal |",
        "|---|---|---|---|---|---|",
    ]
    for r in (r for r in results if "unsigned_agreement" in r):
        for m in _scores(results):
            u, g = r["unsigned_agreement"][m], r["agreement"][m]
            cells = (g["flow"], u["flow"], g["causal_mean"], u["causal_mean"])
            lines.append(f"| {r['model']} | `{m}` | " + " | ".join(_f(_mean(c)) for c in cells) + " |")
    return lines


def flow_truth_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per model: the counterfactual pairs per attribute (dropped by the pixel check) and the
    flow share's split-half Spearman; how the flow share and the causal truth agree with each other."""
    lines = [
        "| model | pairs per attribute (dropped) | split-half Spearman (shape / colour / pattern / background) "
        "| flow share vs causal truth |",
        "|---|---|---|---|",
    ]
    for r in (r for r in results if "flow_truth" in r):
        info = r["flow_truth"]
        pairs = " / ".join(f"{v['n_pairs']} ({v['dropped']})" for v in info.values())
        split = " / ".join(_f(v["split_half"], 2) for v in info.values())
        versus = _f(_mean(_truth_vs(r, "flow", "causal_mean")))
        lines.append(f"| {r['model']} | {pairs} | {split} | {versus} |")
    return lines


def _truth_vs(r: dict[str, Any], a: str, b: str) -> dict[str, float]:
    keep = r["evaluated"]
    ta, tb = r["truths"][a], r["truths"][b]
    return {x: spearman_of([ta[x][lab] for lab in keep], [tb[x][lab] for lab in keep]) for x in ta}


def truths_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per model and score: its mean Spearman with every truth."""
    lines = ["| model | score | " + " | ".join(TRUTHS) + " |", "|---|---|" + "---|" * len(TRUTHS)]
    for r in results:
        for m in _scores(results):
            cells = " | ".join(_f(_mean(r["agreement"][m][t])) for t in TRUTHS)
            lines.append(f"| {r['model']} | `{m}` | {cells} |")
    return lines


def planted_table(results: list[dict[str, Any]]) -> list[str]:
    """Top-k precision of every score against the planted heads, per attribute."""
    planted = [r for r in results if r.get("planted")]
    if not planted:
        return []
    scores = _scores(results)
    lines = [
        "| model | attribute | planted heads | " + " | ".join(f"`{m}`" for m in scores) + " |",
        "|---|---|---|" + "---|" * len(scores),
    ]
    truths = list(planted[0].get("planted_truths", {}))
    lines[0] += "".join(f" {t} truth |" for t in truths)
    lines[1] += "---|" * len(truths)
    for r in planted:
        for a, heads in r["planted_map"].items():
            cells = " | ".join(_f(r["planted"][m][a], 2) for m in scores)
            cells += "".join(f" | {_f(r['planted_truths'][t][a], 2)}" for t in truths)
            lines.append(f"| {r['model']} | {a} | {', '.join(heads)} | {cells} |")
    return lines


def control_null_table(control: list[dict[str, Any]]) -> list[str]:
    """One row per random-init model: each score's control figure with its permutation null (95 % range
    of the mean Spearman with the components shuffled) and two-sided p."""
    rows = [r for r in control if "control_null" in r]
    if not rows:
        return []
    scores = list(rows[0]["control_null"])
    lines = ["| random-init model | " + " | ".join(f"`{m}`" for m in scores) + " |", "|---|" + "---|" * len(scores)]
    for r in rows:
        cells = []
        for m in scores:
            c = r["control_null"][m]
            cells.append(f"{_f(c['observed'])} (null {_f(c['low'], 2)} … {_f(c['high'], 2)}, p {_f(c['p'], 3)})")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return lines


def _doc(module: Any, skip: int) -> str:
    """A module's docstring without its first ``skip`` paragraphs."""
    return "\n\n".join((module.__doc__ or "").split("\n\n")[skip:]).strip()


def _intro(results: list[dict[str, Any]], command: str, meta: dict) -> list[str]:
    """The page's title, the command that wrote it, the machine and what the data are."""
    r0 = results[0] if results else {"train_seed": "-", "test_seed": "-", "n_train": "-", "n_test": "-"}
    return [
        "# Validation: do the scores find the parts that matter?",
        "",
        "Written by `vitdecomp validate` (rerun it to refresh; stores and aligners are cached):",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {meta.get('machine')}, torch {meta.get('torch')}, {meta.get('threads')} thread(s); "
        f"{meta.get('time_s', 0) / 60:.1f} min.",
        "",
        f"Data: aligner and truth probes fitted on world seed {r0['train_seed']} ({r0['n_train']} scenes, the "
        f"`vitdecomp analyze` set); every score and truth computed on {r0['n_test']} held-out scenes of seed "
        f"{r0['test_seed']}, the counterfactual pairs drawn from seed {_pair_seed(r0)}, both used for nothing else "
        "(zoo training: 1000, 1001, 1500; zoo probes: 2001, 2002; the scores were developed on seeds "
        f"{DEV_SEED} and {DEV_SEED + PAIR_SEED_OFFSET}, earlier rounds on 3001). Every figure is over the "
        "*evaluated* components only: attention heads, MLPs and convolutional branches whose contribution varies "
        f"over the images (relative second singular value s2/s1 >= {CONSTANT_RTOL:g}); `init`, biases and norm "
        f"betas are left out. The default score is `{DEFAULT_SCORE}`; targets: Spearman with the counterfactual "
        f"flow share >= {TARGET_FLOW} and with the causal truth >= {TARGET_SPEARMAN} for every model, planted "
        f"heads recovered with top-k precision >= {TARGET_PLANTED}, random-init control near 0.",
    ]


def _agreement_sections(results: list[dict[str, Any]]) -> list[str]:
    """The flow share's and the causal truth's tables, signed and unsigned, and the flow truth's own."""
    return [
        "## Agreement with the counterfactual flow share, mean of the four attributes",
        "",
        *summary_table(results, "flow", TARGET_FLOW),
        "",
        "## Per attribute (counterfactual flow share)",
        "",
        *attribute_table(results, "flow"),
        "",
        "## Agreement with the causal truth (mean-ablation), mean of the four attributes",
        "",
        *summary_table(results),
        "",
        "## Per attribute (causal truth, mean-ablation)",
        "",
        *attribute_table(results),
        "",
        "## Signed and unsigned (mean of the four attributes)",
        "",
        "The flow share is signed (a part that works against the change is negative); the causal truth is a "
        "loss rise. Each score as it is and its magnitude `|score|`, against the flow share, its magnitude, and "
        "the causal truth.",
        "",
        *unsigned_table(results),
        "",
        "## The counterfactual truth itself",
        "",
        *flow_truth_table(results),
        "",
    ]


def _pair_seed(r: dict[str, Any]) -> Any:
    return r.get("pair_seed", "-")


def markdown(results: list[dict[str, Any]], control: list[dict[str, Any]], command: str, meta: dict) -> str:
    """The whole page (a hand-written ``## Notes`` section is appended by the caller)."""
    lines = [
        *_intro(results, command, meta),
        "",
        *_agreement_sections(results),
        "## Every score against every truth (mean of the four attributes)",
        "",
        *truths_table(results),
        "",
    ]
    ctrl = control_table(control)
    if ctrl:
        lines += [
            "## Random-init control: the scores of a random-weight subject against the trained model's truth",
            "",
            "Same architecture, same reader CLIP, texts and images; only the subject's weights are random. "
            "A score that finds what the trained model uses cannot be reproduced without its weights: the first "
            "columns should be near 0. The last columns (the random model's scores against its own causal truth) "
            "are a faithfulness check, not a control: a random network's parts matter to it too.",
            "",
            *ctrl,
            "",
        ]
    null = control_null_table(control)
    if null:
        lines += [
            "How far from 0 is noise: each control figure (score of the random-weight subject vs the trained "
            "truth, mean over the attributes) beside a permutation null (the components shuffled, one "
            "permutation for every attribute, 2000 draws): its 95 % range and the two-sided p.",
            "",
            *null,
            "",
        ]
    planted = planted_table(results)
    if planted:
        lines += ["## Planted roles: top-k precision (k = number of planted heads)", "", *planted, ""]
    lines += ["## Truths", "", _doc(counterfactual, 1), "", _doc(truths_module, 1), ""]
    return "\n".join(lines)
