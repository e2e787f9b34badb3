"""The world heatmap figure of docs/applications.md: per analysed zoo model, two rows on the same fresh
scenes (columns) — `vitdecomp heatmap --text "a(n) <true colour> object"` and the same with a colour the
object does not have — exactly as the command maps them (value-specific maps, the top colour heads);
red positive, blue negative, each map on the command's scale (that of the map before the null).

    python benchmarks/applications_figures.py --analyses DIR [DIR ...] --out docs/figures/heatmaps_world.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from vitdecomp.apps.analysis import load_analysis
from vitdecomp.apps.heatmap import heatmaps
from vitdecomp.evaluation.app_heatmaps import phrase
from vitdecomp.world import make_scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analyses", nargs="+", required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--seed", type=int, default=7500)
    ap.add_argument("--text", default="a {} object")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    scenes = make_scenes(args.n, seed=args.seed)
    rows = 2 * len(args.analyses)
    fig, axes = plt.subplots(rows, args.n, figsize=(1.7 * args.n, 1.9 * rows), dpi=85, squeeze=False)
    truth = scenes.labels("color")
    shift = np.random.default_rng(args.seed).integers(1, 6, size=args.n)
    for k, folder in enumerate(args.analyses):
        a = load_analysis(folder)
        colours = list(a.result.features["color"])
        for r, values in enumerate((truth, (truth + shift) % len(colours))):
            for i in range(args.n):
                text = phrase(args.text, colours[int(values[i])])
                hm = heatmaps(a, [scenes.pil(i)], text=text)[0]
                ax = axes[2 * k + r, i]
                lim = hm.scale or float(np.abs(hm.original).max()) or 1.0
                ax.imshow(scenes.images[i])
                ax.imshow(hm.original, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"{text} ({hm.reading:.2f})", fontsize=5.5)
                if i == 0:
                    ax.set_ylabel(f"{a.result.model.name}\n{'right' if r == 0 else 'wrong'}", fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
