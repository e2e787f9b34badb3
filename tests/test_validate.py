"""`vitdecomp.evaluation.alignment` (the first validation): its ground-truth probe, its figures on a tiny
random-init run, and (with the shipped zoo checkpoints) guards on the §6 figures of docs/validation.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitdecomp.evaluation.alignment import match_rate, retrieval_precision
from vitdecomp.probes import batched_probe
from vitdecomp.store import ArrayRows


@pytest.fixture(autouse=True)
def one_thread():
    """L-BFGS on small problems is thousands of tiny ops: on a shared 2-core machine a second
    intra-op thread only adds synchronisation stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planted(c: int = 5, n: int = 400, m: int = 300, d: int = 16, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y, yt = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (m,), generator=g)
    strength = torch.linspace(0.0, 2.0, c)[:, None, None]  # component i carries the label with strength i
    proto = torch.randn(c, k, d, generator=g) * strength
    x = proto[:, y] + torch.randn(c, n, d, generator=g)
    xt = proto[:, yt] + torch.randn(c, m, d, generator=g)
    return x, y, xt, yt


def test_batched_probe_equals_separate_probes_and_ranks_planted_strength():
    from vitdecomp.zoo.evaluate import linear_probe

    x, y, xt, yt = _planted()
    x[1], xt[1] = 3.0, 3.0  # a constant component: majority-class accuracy
    acc = batched_probe(x, y, xt, yt)
    sep = np.array([linear_probe(x[i], y, xt[i], yt) for i in range(len(x))])
    np.testing.assert_allclose(acc, sep, atol=0.01)
    assert acc[1] == pytest.approx((yt == torch.mode(y).values).float().mean().item())
    assert acc[0] < 0.4 and acc[-1] > 0.9
    assert np.all(np.diff(acc[2:]) >= -0.02)  # stronger planted signal, better probe


def test_retrieval_precision_prefers_the_components_that_carry_the_attribute():
    from vitdecomp.align import identity_aligner
    from vitdecomp.scores import ScoreTable

    g = torch.Generator().manual_seed(0)
    n, d, k = 300, 12, 3
    y = torch.randint(0, k, (n,), generator=g)
    t = torch.linalg.qr(torch.randn(d, k, generator=g)).Q.T  # class texts, orthonormal
    c = 0.3 * torch.randn(n, 6, d, generator=g)
    c[:, :2] += 2 * t[y][:, None]  # components 0 and 1 carry the class, the others are noise
    c[:, 2:] += 3 * torch.randn(n, 1, d, generator=g)  # and the noise dominates the whole
    labels = [f"L{i}" for i in range(6)]
    table = ScoreTable(torch.tensor([[1.0, 0.9, 0.0, 0.0, 0.0, 0.0]]), ["a"], labels, "invariant")
    p = retrieval_precision(
        identity_aligner(labels, d),
        ArrayRows(c.numpy(), labels=labels),
        {"a": t},
        {"a": y.numpy()},
        {"invariant": table},
        k=2,
    )
    assert p["top"]["a"] == 1.0
    assert p["random"]["a"] < 0.8 and p["full"]["a"] < p["top"]["a"]


def test_match_rate_counts_overlaps():
    g = torch.Generator().manual_seed(0)
    words = ["a", "b", "c", "d", "e", "f"]
    t = torch.eye(6)
    c = torch.zeros(200, 2, 6)
    c[:, 0, :3] = torch.randn(200, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])  # varies along a, b, c
    c[:, 1, 3:] = torch.randn(200, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])  # along d, e, f
    labels = ["L0", "L1"]
    from vitdecomp.align import identity_aligner

    al = identity_aligner(labels, 6)
    store = ArrayRows(c.numpy(), labels=labels)
    assert match_rate(al, store, t, words, {"L0": ["a", "b", "c"], "L1": ["d", "e", "f"]}) == 1.0
    assert match_rate(al, store, t, words, {"L0": ["a", "x", "y"], "L1": ["x", "y", "z"]}) == pytest.approx(1 / 6)


@pytest.mark.slow
def test_validate_runs_and_writes_the_document(tmp_path):
    from vitdecomp.commands.validate_alignment import main

    out = tmp_path / "validation.md"
    argv = ["--models", "zoo:deit", "--control", "--n-train", "64", "--n-test", "48", "--align-steps", "10"]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "c"), "--quiet", "--json", str(tmp_path / "v.json")]
    assert main(argv) == 0
    text = out.read_text()
    for part in ("Summary against the targets", "zoo:deit", "CompAlign ablation", "P@20", "Spearman", "(random init)"):
        assert part in text
    import json

    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["control"][0]["weights_id"].endswith("@random-init")
    assert not saved["results"][0]["weights_id"].endswith("@random-init")
    r = saved["results"][0]
    assert set(r["spearman_probe"]["invariant"]) == {"shape", "color", "pattern", "background"}
    assert set(r["ablation"]) == {"shared", "lambda=0", "compalign"}
    assert all(0.0 <= v <= 1.0 for v in r["probe_accuracy"]["shape"].values())


# ---------------------------------------------------------------------------------------- shipped zoo
def _have(*names: str) -> bool:
    from vitdecomp.zoo.hub import WEIGHTS_DIR

    return all((WEIGHTS_DIR / f"{n}.safetensors").is_file() for n in names)


@pytest.mark.slow
@pytest.mark.skipif(not _have("deit", "clip"), reason="zoo weights deit/clip not shipped yet (vitdecomp zoo train)")
def test_zoo_deit_figures_hold(tmp_path):
    """A smaller version of docs/validation.md's zoo:deit row (600 / 300 scenes, ~25 s) must stay
    above floors: the issue's Spearman target itself, and margins below the measured figures
    (2026-11-22: test cosine 0.923, Spearman 0.869, P@20 top-3 0.833 vs random-3 0.559)."""
    from vitdecomp.evaluation.alignment import AlignmentRun, _mean, validate_alignment

    r = validate_alignment(
        AlignmentRun(
            name="zoo:deit",
            n_train=600,
            n_test=300,
            align_steps=1500,
            cache_dir=tmp_path,
            progress=False,
            log=lambda *a: 0,
        )
    )
    assert r["alignment"]["test_cosine"] > FLOORS["test_cosine"]
    assert _mean(r["spearman_probe"]["invariant"]) > FLOORS["spearman_probe"]
    p = r["retrieval_p20"]
    assert _mean(p["top"]) > _mean(p["random"]) + FLOORS["top_minus_random"]


#: Floors for test_zoo_deit_figures_hold (measured figures minus a margin; see docs/validation.md).
FLOORS = {"test_cosine": 0.85, "spearman_probe": 0.6, "top_minus_random": 0.15}
