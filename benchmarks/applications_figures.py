"""The world heatmap figure of docs/applications.md: per analysed zoo model (rows), the top colour heads'
map for "a(n) <true colour> object" on the same fresh scenes (columns), read as `vitdecomp heatmap` reads
a feature's value (the text minus the mean of the other values' texts); red positive, blue negative.

    python benchmarks/applications_figures.py --analyses DIR [DIR ...] --out docs/figures/heatmaps_world.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from vitdecomp.apps.analysis import auto_heads, load_analysis
from vitdecomp.apps.heatmap import contrastive
from vitdecomp.apps.token_maps import token_maps
from vitdecomp.evaluation.app_heatmaps import phrase
from vitdecomp.world import make_scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analyses", nargs="+", required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--seed", type=int, default=7100)
    ap.add_argument("--feature", default="color")
    ap.add_argument("--text", default="a {} object")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    scenes = make_scenes(args.n, seed=args.seed)
    fig, axes = plt.subplots(len(args.analyses), args.n, figsize=(1.7 * args.n, 1.9 * len(args.analyses)), dpi=110)
    axes = axes.reshape(len(args.analyses), args.n)
    for row, folder in enumerate(args.analyses):
        a = load_analysis(folder)
        values = list(a.result.features[args.feature])
        emb = a.embed([phrase(args.text, v) for v in values])
        emb = contrastive(emb, emb)
        x = torch.stack([a.subject.preprocess(scenes.pil(i)) for i in range(args.n)])
        heads = auto_heads(a.scores(args.feature), a.result.labels)
        px = token_maps(a.subject, x, emb, aligner=a.aligner).pixels(heads)
        truth = scenes.labels(args.feature)
        for i in range(args.n):
            m = px[i, int(truth[i])].numpy()
            lim = abs(m).max() or 1.0
            ax = axes[row, i]
            ax.imshow(scenes.images[i])
            ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(phrase(args.text, values[int(truth[i])]), fontsize=6)
            if i == 0:
                ax.set_ylabel(f"{a.result.model.name}\n{len(heads)} heads", fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
