"""``vitdecomp debias`` with every score of :mod:`vitdecomp.scores` on one split, in one process.

The same run as the command (cached store and aligner, head, k chosen on validation), once per
score method, printing test worst-group / average accuracy before -> after::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/debias_scores.py --images /tmp/debias/wb1.0 \
        --cache-dir /tmp/debias/cache [--models deit dino swin maxvit clip]
"""

from __future__ import annotations

import argparse

import torch

from vitdecomp.apps.debias import (
    TRAIN,
    DebiasConfig,
    Split,
    debias_arrays,
    default_features,
    read_metadata,
    rows_in_source,
)
from vitdecomp.apps.mean_ablation import MeanAblation, analysed_components
from vitdecomp.imageset import folder_source
from vitdecomp.scores import embed_features, score_features, score_names

METHODS = score_names()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--models", nargs="+", default=["deit", "simclr", "swin", "maxvit", "clip"])
    a = p.parse_args()
    torch.set_num_threads(1)
    print("| model | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    for m in a.models:
        cfg = DebiasConfig(images=a.images, model=f"zoo:{m}", cache_dir=a.cache_dir, progress=False)
        meta = read_metadata(cfg.metadata_path)
        source = folder_source(cfg.images)
        split = Split.of(meta, rows_in_source(meta, source, cfg.metadata_path))
        comps = analysed_components(cfg.analysis(), source)
        emb = embed_features(comps.embed, default_features(source))
        train = comps.contributions[split.rows[TRAIN]]
        tables = score_features(train, comps.aligner, emb, methods=METHODS, progress=False)
        ablation = MeanAblation.fit(comps.contributions, comps.labels, split.rows[TRAIN])
        cells = []
        for method in METHODS:
            t = tables[method]
            readings, _ = debias_arrays(ablation, split, t["spurious"], t["core"], n_random=1)
            b, r = readings[0].test, readings[1].test
            cells.append(f"k={readings[1].k}: {b.worst:.2f} → {r.worst:.2f} / {b.average:.2f} → {r.average:.2f}")
        print(f"| zoo:{m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
