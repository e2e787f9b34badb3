"""Which score agrees best with the causal truth: the candidates of docs/validation.md on the development seed.

    python benchmarks/score_candidates.py [--models zoo:deit zoo:simclr zoo:swin zoo:maxvit] [--seed 3001]
        [--n 1000]

For each zoo model: aligner and truth probes on the ``vitdecomp analyze`` set (seed 3000, 2000 scenes, as
``vitdecomp validate``), every candidate and the causal truth (mean-ablation) on ``--n`` scenes of
``--seed`` (the development seed, never the held-out one); prints the mean Spearman over the four attributes
over the evaluated components (heads, MLPs, conv branches that vary). Candidates: the shipped ``ablation``
(scales 1, 3, 10) and ``text_probe`` scores, magnitude alone, and three text-taught probes that were not
kept (on the whole's cosines with the descriptions, on the aligned whole, and ``text_probe`` cross-fitted
on two halves of the images). One thread.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from vitdecomp.aligner_cache import get_aligner
from vitdecomp.evaluation.agreement import spearman
from vitdecomp.evaluation.components import evaluated_components
from vitdecomp.evaluation.settings import DEV_SEED, MODELS, N_TRAIN, TRAIN_SEED
from vitdecomp.evaluation.truths import ablated_wholes, causal_importance
from vitdecomp.imageset import world_source
from vitdecomp.pipeline.config import default_cache_dir
from vitdecomp.pipeline.fill import FillOptions, build_store, readable_rows
from vitdecomp.pipeline.model_pair import Models, load_model_for
from vitdecomp.probes import fit_probes
from vitdecomp.scores import embed_features, load_features, score_ablation, score_features
from vitdecomp.text import WORLD_TEMPLATES, TextEncoder
from vitdecomp.world import CORE_ATTRIBUTES


def probe_rise(x_fit: torch.Tensor, y_fit: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """A probe on the sum of ``x_fit [N, C, D]`` learns ``y_fit``; the rise of its cross-entropy on ``x``
    against ``y`` when each component is mean-ablated ``[C]``."""
    k = int(max(y_fit.max(), y.max())) + 1
    with torch.enable_grad():
        probe = fit_probes(x_fit.sum(1)[None].float(), y_fit, k)
    base = F.cross_entropy(probe.logits(x.sum(1)[None].float())[0], y)
    logits = probe.logits(ablated_wholes(x, "mean").float())  # [C, M, K]
    ce = F.cross_entropy(logits.reshape(-1, k), y.repeat(len(logits)), reduction="none").reshape(len(logits), -1)
    return (ce.mean(1) - base).numpy()


def candidates(c: torch.Tensor, aligned: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> dict[str, np.ndarray]:
    """The candidates that are not shipped, for one feature: ``c [N, C, D]`` (subject space), ``aligned
    [N, C, d]``, ``z [N, d]`` the aligned whole, ``t [K, d]`` the feature's description embeddings."""
    tn = F.normalize(t.double(), dim=-1)
    y = (z @ tn.T).argmax(1)  # the zero-shot labels
    cos = aligned @ tn.T / z.norm(dim=-1)[:, None, None]  # [N, C, K]
    cos = torch.cat([cos, (z @ tn.T / z.norm(dim=-1)[:, None] - cos.sum(1))[:, None]], 1)  # + the bias part
    h = len(c) // 2
    cross = (probe_rise(c[:h], y[:h], c[h:], y[h:]) + probe_rise(c[h:], y[h:], c[:h], y[:h])) / 2
    u = aligned @ tn.T
    out = {f"ablation, scale {s:g}": score_ablation(u, z @ tn.T, z.norm(dim=-1), s).numpy() for s in (1.0, 10.0)}
    out["magnitude alone"] = (c - c.mean(0)).norm(dim=-1).mean(0).numpy()
    out["text-taught probe on the cosines (CLIP space, K dims)"] = probe_rise(cos, y, cos, y)[:-1]
    out["text-taught probe on the aligned whole"] = probe_rise(aligned, y, aligned, y)
    out["text_probe cross-fitted on two halves"] = cross
    return out


def study(name: str, seed: int, n: int) -> dict[str, float]:
    """Mean Spearman over the attributes of every candidate with the causal truth, for one model."""
    cache = default_cache_dir()
    models = Models(load_model_for(name), load_model_for("zoo:clip"))
    src_tr, src_te = world_source(N_TRAIN, seed=TRAIN_SEED), world_source(n, seed=seed)
    train, test = (
        readable_rows(build_store(models, s, cache / "stores", FillOptions(progress=False)).store)
        for s in (src_tr, src_te)
    )
    al = get_aligner(train, cache / "aligners", progress=False, log=lambda *a, **k: None).aligner
    encoder = TextEncoder.from_loaded(models.reader, cache_dir=cache / "text")
    feats = embed_features(lambda x: encoder.encode(x, WORLD_TEMPLATES), load_features("world"))
    c_tr, c = train.batch(slice(None))["contributions"], test.batch(slice(None))["contributions"]
    keep = evaluated_components(list(train.labels), c)
    aligned = al.apply(c).double()
    z = aligned.sum(1) + al.bias.double()
    shipped = score_features(test, al, feats, methods=("ablation", "text_probe"), progress=False)
    rows: dict[str, list[float]] = {}
    for a in CORE_ATTRIBUTES:
        y_tr, y_te = (torch.from_numpy(s.attributes[a]).long() for s in (src_tr, src_te))
        truth = causal_importance(c_tr, y_tr, c, y_te, modes=("mean",))["mean"]["loss_rise"]
        scores = {m: t[a].numpy() for m, t in shipped.items()} | candidates(c.double(), aligned, z, feats[a])
        for m, s in scores.items():
            rows.setdefault(m, []).append(spearman(torch.as_tensor(s[keep]), torch.as_tensor(truth[keep])))
    return {m: float(np.mean(v)) for m, v in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--seed", type=int, default=DEV_SEED)
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {name: study(name, args.seed, args.n) for name in args.models}
    print("| candidate | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for m in next(iter(results.values())):
        print(f"| {m} | " + " | ".join(f"{r[m]:.3f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
