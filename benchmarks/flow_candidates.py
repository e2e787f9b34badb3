"""Which label-free score follows where a feature flows: the candidates of docs/validation.md on the
development seeds.

    python benchmarks/flow_candidates.py [--models zoo:deit zoo:simclr zoo:swin zoo:maxvit zoo:planted]
        [--seed 9100] [--n 1000] [--pairs 512]

For each zoo model: aligner and causal-truth probes on the ``vitdecomp analyze`` set (seed 3000, 2000
scenes, as ``vitdecomp validate``); every candidate and the causal truth (mean-ablation) on ``--n``
scenes of ``--seed``; the counterfactual flow share on ``--pairs`` pairs per attribute of seed
``--seed + 1`` (development seeds, never the held-out ones). Prints, per candidate, the mean Spearman
over the four attributes with the flow share, with the causal truth, and the planted heads' top-k
precision (zoo:planted), over the evaluated components (heads, MLPs, conv branches that vary).

Candidates (all read every part's mean contribution per value in the subject's own space, centred over
the values, as a share of the whole's; they differ in where the images' values come from and in the
metric): the shipped ``flow`` (hard zero-shot labels of the reader's own image embedding, one feature
at a time); the labels of the aligned whole instead; soft labels (softmax of 100 x cosine); a joint
additive least-squares fit of every feature's labels at once (against labels that leak other
attributes); the true attributes (an oracle, for reference); the shipped flow in a whitened metric
(the whole's covariance + 0.1 x its mean eigenvalue); and the other shipped scores. One thread.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from vitdecomp.evaluation.agreement import spearman
from vitdecomp.evaluation.components import evaluated_components
from vitdecomp.evaluation.counterfactual import counterfactual_truths
from vitdecomp.evaluation.settings import DEV_SEED, MODELS, N_PAIRS, N_TRAIN, PAIR_SEED_OFFSET, TRAIN_SEED
from vitdecomp.evaluation.truths import causal_importance, top_k_precision
from vitdecomp.evaluation.world_runs import WorldRun, prepare
from vitdecomp.scores import score_features, score_names
from vitdecomp.world import CORE_ATTRIBUTES
from vitdecomp.zoo.cards import planted_map


def between(c: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """Each part's share of the whole's between-value variation: ``c [N, C, D]``, label weights
    ``w [N, K]`` (one-hot or soft) -> ``[C]`` (values that no image reads left out)."""
    n = w.sum(0)
    used = n > 1e-9
    mu = torch.einsum("nk,ncd->kcd", w[:, used], c) / n[used][:, None, None]
    mu = mu - mu.mean(0)
    whole = mu.sum(1)
    return ((mu * whole[:, None]).sum((0, 2)) / whole.square().sum()).numpy()


def joint(c: torch.Tensor, onehots: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every feature's value effects fitted at once (least squares on all features' one-hot labels),
    then each feature's between-value share of the fitted effects."""
    x = torch.cat([torch.ones(len(c), 1, dtype=torch.float64), *onehots.values()], 1)
    b = torch.linalg.lstsq(x, c.reshape(len(c), -1), driver="gelsd").solution.reshape(x.shape[1], *c.shape[1:])
    out, start = {}, 1
    for a, w in onehots.items():
        mu = b[start : start + w.shape[1]]
        mu = mu - mu.mean(0)
        whole = mu.sum(1)
        out[a] = ((mu * whole[:, None]).sum((0, 2)) / whole.square().sum()).numpy()
        start += w.shape[1]
    return out


def whitened(c: torch.Tensor, ridge: float = 0.1) -> torch.Tensor:
    """The parts in the whitening metric of the whole's covariance (+ ``ridge`` x its mean eigenvalue)."""
    ev, v = torch.linalg.eigh(torch.cov(c.sum(1).T))
    return c @ (v / (ev + ridge * ev.mean()).sqrt())


def candidates(c: torch.Tensor, reads: dict[str, dict[str, torch.Tensor]], truth: dict) -> dict[str, dict]:
    """``{candidate: {attribute: [C]}}``; ``reads[source][attribute]``: cosines ``[N, K]`` with the
    value texts of the reader's embedding (``clip``) and of the aligned whole (``aligned``)."""
    hard = {s: {a: F.one_hot(r.argmax(1), r.shape[1]).double() for a, r in rs.items()} for s, rs in reads.items()}
    cw = whitened(c)
    soft = {a: torch.softmax(100 * r, -1) for a, r in reads["clip"].items()}
    out = {
        "labels of the aligned whole": {a: between(c, w) for a, w in hard["aligned"].items()},
        "soft labels (softmax 100 x cosine)": {a: between(c, w) for a, w in soft.items()},
        "joint fit of every feature's labels": joint(c, hard["clip"]),
        "true attributes (oracle)": {a: between(c, w) for a, w in truth.items()},
        "whitened metric (ridge 0.1)": {a: between(cw, w) for a, w in hard["clip"].items()},
    }
    return out


def study(name: str, seed: int, n: int, n_pairs: int) -> dict[str, dict[str, float]]:
    """Per candidate: mean Spearman with the flow share and with the causal truth, planted top-k."""
    run = WorldRun(name=name, n_train=N_TRAIN, n_test=n, train_seed=TRAIN_SEED, test_seed=seed, progress=False)
    p = prepare(run)
    al = p.aligned.aligner
    b = p.test.batch(slice(None))
    c, labels = b["contributions"].double(), list(p.test.labels)
    keep = evaluated_components(labels, c)
    whole = al.apply(b["contributions"]).double().sum(1) + al.bias.double()
    unit = {a: F.normalize(t.double(), dim=-1) for a, t in p.features.items()}
    embeddings = {"clip": b["clip"].double(), "aligned": whole}
    reads = {s: {a: F.normalize(z, dim=-1) @ t.T for a, t in unit.items()} for s, z in embeddings.items()}
    truth = {a: F.one_hot(torch.from_numpy(p.test_source.attributes[a]), len(t)).double() for a, t in unit.items()}
    shipped = score_features(p.test, al, p.features, methods=score_names(), progress=False)
    scores = {m: {a: t[a].numpy() for a in CORE_ATTRIBUTES} for m, t in shipped.items()} | candidates(c, reads, truth)
    flow = {a: t.flow for a, t in counterfactual_truths(p.models.subject, n_pairs, seed + PAIR_SEED_OFFSET).items()}
    c_tr = p.train.batch(slice(None))["contributions"]
    causal = {}
    for a in CORE_ATTRIBUTES:
        y_tr, y_te = (torch.from_numpy(s.attributes[a]).long() for s in (p.train_source, p.test_source))
        causal[a] = causal_importance(c_tr, y_tr, c.float(), y_te, modes=("mean",))["mean"]["loss_rise"]
    scores["(the flow share itself)"] = flow
    planted = planted_map(name)
    out = {}
    for m, s in scores.items():
        row = {
            "flow": np.mean([spearman(s[a][keep], flow[a][keep]) for a in CORE_ATTRIBUTES]),
            "causal": np.mean([spearman(s[a][keep], causal[a][keep]) for a in CORE_ATTRIBUTES]),
        }
        if planted:
            row["planted"] = np.mean([top_k_precision(s[a], labels, heads) for a, heads in planted.items()])
        out[m] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--seed", type=int, default=DEV_SEED)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--pairs", type=int, default=N_PAIRS)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {name: study(name, args.seed, args.n, args.pairs) for name in args.models}
    print("| candidate | " + " | ".join(f"{m} flow / causal" for m in results) + " | planted top-k |")
    print("|---|" + "---|" * (len(results) + 1))
    for cand in next(iter(results.values())):
        cells = [f"{r[cand]['flow']:.3f} / {r[cand]['causal']:.3f}" for r in results.values()]
        top = [f"{r[cand]['planted']:.2f}" for r in results.values() if "planted" in r[cand]]
        print(f"| {cand} | " + " | ".join(cells) + f" | {' '.join(top) or '-'} |")


if __name__ == "__main__":
    main()
