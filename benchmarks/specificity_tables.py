"""The wrong-prompt tables of docs/applications.md ("Text-specific maps") from the JSON files of
``python -m vitdecomp.commands.evaluate_apps specificity --report OUT_<m> --seed S --json spec_<m>.json``:

    python benchmarks/specificity_tables.py spec_deit.json spec_swin.json ... > tables.md

Heatmaps (every model): right and wrong value texts under today's rule (``specific``) and the earlier one
(the text minus the other values' mean), with the feature's chance (the object's area share; the
background's for the background); segmentation (models with the zoo's attribute heads): every method,
the model's predicted value and a wrong one, against the expected alternative and as the logit alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RULES = {"specific": "**value-specific (now)**", "mean_others": "text − other values' mean (before)"}
CONTRASTS = {"expected": "expected alternative", "none": "logit alone"}
SEG_METHODS = ("decomposition", "gradcam", "chefer")


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def heatmap_table(docs: list[dict], features: tuple[str, ...] = ("color", "shape", "background")) -> list[str]:
    """Right / wrong pointing, positive share in the target and mIoU of each rule (top heads)."""
    head = ["model", "feature (chance)", "map", "right: pointing", "right: share", "right: mIoU"]
    head += ["wrong: pointing", "wrong: share", "wrong: mIoU (object IoU)"]
    out = [_row(head), _row(["---"] * len(head))]
    for d in docs:
        for f in features:
            chance = d["mask_share"] if f != "background" else 1 - d["mask_share"]
            for rule, name in RULES.items():
                r, w = d["scores"][f"{f} top {rule} right"], d["scores"][f"{f} top {rule} wrong"]
                miou_r = f"{r['miou']:.3f}" if "miou" in r else "–"
                miou_w = f"{w['miou']:.3f} ({w['iou_object']:.3f})" if "miou" in w else "–"
                cells = [d["model"], f"{f} ({chance:.2f})", name, f"{r['pointing']:.2f}", f"{r['share']:.2f}", miou_r]
                out.append(_row([*cells, f"{w['pointing']:.2f}", f"{w['share']:.2f}", miou_w]))
    return out


def segment_table(docs: list[dict]) -> list[str]:
    """Per model with attribute heads, logit block, method and contrast: predicted and wrong value."""
    head = ["model", "logit block", "method", "contrast", "predicted: pointing", "predicted: mIoU (object IoU)"]
    head += ["wrong: pointing", "wrong: mIoU (object IoU)", "maps/s"]
    out = [_row(head), _row(["---"] * len(head))]
    for d in docs:
        seg = d.get("segment") or {}
        for f in ("color", "shape"):
            for method in SEG_METHODS:
                for c, cname in CONTRASTS.items():
                    r, w = seg.get(f"{f} {c} predicted", {}).get(method), seg.get(f"{f} {c} wrong", {}).get(method)
                    if r is None or w is None:
                        continue
                    pr = f"{r['miou']:.3f} ({r['iou_object']:.3f})"
                    wr = f"{w['miou']:.3f} ({w['iou_object']:.3f})"
                    cells = [d["model"], f, method, cname, f"{r['pointing']:.2f}", pr, f"{w['pointing']:.2f}", wr]
                    out.append(_row([*cells, f"{r['maps_per_s']:.0f}"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    docs = [json.loads(f.read_text()) for f in p.parse_args().files]
    print("\n".join(["### Heatmaps", "", *heatmap_table(docs), "", "### Segmentation", "", *segment_table(docs)]))


if __name__ == "__main__":
    main()
