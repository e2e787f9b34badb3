"""Zero-shot segmentation on the built-in world: the decomposition against GradCAM and Chefer et al.,
every zoo vision model, the same target for all methods (prints Markdown tables, writes JSON).

    python benchmarks/segment_world.py --n 200 --seed 7100 --json segment_world.json
    python benchmarks/segment_world.py --n 200 --seed 7100 --target wrong     # the wrong-prompt test
    python benchmarks/segment_world.py --n 200 --seed 7100 --contrast none    # the logit alone (published)
    python benchmarks/segment_world.py --ablation --n 100 --seed 7200   # the design choices

The first is what ``vitdecomp segment --model zoo:<m> --world W --feature <f>`` gives per row on
``vitdecomp world export --n 200 --seed 7100 --out W`` (the same scenes, generated in memory here).
The ablation compares the decomposition's variants (where the positive part is taken; which layers)
on a seed the main table does not use (7200): the rule was chosen there.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from vitdecomp.apps.chefer import CheferMap
from vitdecomp.apps.masks import world_set
from vitdecomp.apps.relevance import RelevanceMap
from vitdecomp.apps.segment import DecompositionMap, Explained, default_methods, segment
from vitdecomp.models.loading import load_model

#: What each model explains: zoo heads' predicted colour / shape; zoo:simclr has no classifier (self).
RUNS = [
    ("zoo:deit", "color"),
    ("zoo:deit", "shape"),
    ("zoo:simclr", "self"),
    ("zoo:swin", "color"),
    ("zoo:swin", "shape"),
    ("zoo:maxvit", "color"),
    ("zoo:maxvit", "shape"),
    ("zoo:planted", "color"),
    ("zoo:planted", "shape"),
]
#: The published code's layers scaled to the zoo's depth: from ~40-60 % of the depth on
#: (ViT-B blocks 5-11 of 12; Swin-B from stage 2 block 10 = block 14 of 24; MaxViT-S from block 4 of 11).
LATER = {
    "zoo:deit": [2, 3, 4],
    "zoo:simclr": [2, 3, 4],
    "zoo:swin": [2, 3],
    "zoo:maxvit": [1, 2],
    "zoo:planted": [2, 3, 4],
}


def _variants(model: str) -> list[RelevanceMap]:
    out: list[RelevanceMap] = []
    for name, layers, positive in [
        ("all layers, positive per (head, token) [default]", None, "per_head"),
        ("all layers, positive part of the sum [published]", None, "sum"),
        ("all layers, signed", None, "none"),
        ("later layers, positive part of the sum [published]", LATER[model], "sum"),
        ("later layers, positive per (head, token)", LATER[model], "per_head"),
        ("first block only, positive per (head, token)", [0], "per_head"),
    ]:
        m = DecompositionMap(layers, positive)
        m.name = name
        out.append(m)
    return [*out, CheferMap()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=7100)
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--target", choices=("predicted", "wrong"), default="predicted", help="models with a classifier")
    p.add_argument("--contrast", choices=("expected", "none"), default="expected")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    data = world_set(args.n, args.seed)
    rows, dump = [], []
    for model_name, what in RUNS:
        if args.ablation and what == "shape":
            continue
        model = load_model(model_name)
        methods = _variants(model_name) if args.ablation else default_methods()
        if what == "self" and args.target == "wrong":
            continue  # no classifier, no wrong value
        target = "self" if what == "self" else args.target
        explained = Explained(target, "color" if what == "self" else what, args.contrast, args.seed)
        res = segment(model, data, explained=explained, methods=methods)
        dump.append({"model": model_name, "explains": what, **res.to_dict()})
        for m in res.methods:
            s = m.metrics
            cells = (
                ["n/a"] * 4 if s is None else [f"{v:.3f}" for v in (s.pixel_accuracy, s.miou, s.iou_object, s.mean_ap)]
            )
            speed = "-" if m.maps_per_s is None else f"{m.maps_per_s:.0f}"
            rows.append(f"| {model_name} | {what} | {m.name} | " + " | ".join(cells) + f" | {speed} |")
        print(rows[-1], file=sys.stderr)
    print(f"\n{args.n} scenes of seed {args.seed}, --target {args.target} --contrast {args.contrast}\n")
    print("| model | explains | method | pixel acc. | mIoU | cum. foreground IoU | mAP | maps/s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)


if __name__ == "__main__":
    main()
