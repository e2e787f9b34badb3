"""zoo:planted: the roles its training planted hold on fresh scenes, what the objective plants is what
``vitdecomp.decompose`` gives for the heads, and the objective's parts do what they say."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import vitdecomp
from vitdecomp.world import CORE_ATTRIBUTES, make_scenes
from vitdecomp.zoo import ZOO_CONFIGS, build_model, load_zoo_model
from vitdecomp.zoo.cards import WEIGHTS_DIR, planted_map, read_card
from vitdecomp.zoo.data import normalize, to_tensor
from vitdecomp.zoo.objectives import between_class_share, direct_contributions, direct_labels
from vitdecomp.zoo.recipes import PLANTED_MAP, RECIPES

#: A world seed no zoo training, probe or validation uses.
FRESH_SEED = 7301
#: Thresholds from the shipped model's accuracies measured on these scenes (planted heads: shape 0.85–0.87,
#: colour and background 1.00, pattern 0.96; best other head: shape 0.66, colour 0.59, pattern 0.58,
#: background 0.75; 400 / 300 scenes), with a margin of about 0.1: every planted head decodes its
#: attribute at least this well ...
PLANTED_MIN = {"color": 0.9, "shape": 0.75, "pattern": 0.85, "background": 0.9}
#: ... no other head better than this (they are above chance, 0.20–0.27, but well below the planted) ...
OTHER_HEAD_MAX = {"color": 0.72, "shape": 0.76, "pattern": 0.7, "background": 0.85}
#: ... and the worst planted head beats the best other head by at least this much.
MIN_GAP = 0.08


def _tiny_vit() -> dict:
    cfg = copy.deepcopy(ZOO_CONFIGS["planted"])
    cfg.update(depth=2, embed_dim=32, num_heads=2)
    cfg["stem"]["channels"] = [8, 16, 32, 32]
    return cfg


def test_direct_contributions_are_what_decompose_gives():
    torch.manual_seed(0)
    model = build_model("planted", _tiny_vit()).eval()
    x = normalize(to_tensor(make_scenes(6, seed=3).images))
    with torch.no_grad():
        logits, z = direct_contributions(model, x)
        d = vitdecomp.decompose(model, x)
    labels = direct_labels(model)
    assert labels == ["L0.H0", "L0.H1", "L0.mlp", "L1.H0", "L1.H1", "L1.mlp"]
    torch.testing.assert_close(z, d.contributions[:, d.index(labels)], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model(x))


def test_between_class_share_reads_class_means_per_dimension():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    noise = torch.randn(60, 2, 8, generator=g)
    z = noise.clone()
    z[:, 1] = 0.01 * noise[:, 1] + 5 * y[:, None].float()  # component 1: every dimension is the class
    share = between_class_share(z, y, 3)
    assert share.shape == (2,)
    assert share[0] < 0.15 and share[1] > 0.99
    centred = noise.clone()
    for c in range(3):  # every class the same (zero) mean: nothing between the classes
        centred[y == c] -= centred[y == c].mean(0)
    assert between_class_share(centred, y, 3).max() < 1e-5
    # one dimension of eight carries the class: the same share whether its scale is small or large
    # (down to 1e-3 of the mean variance, below which a dimension counts as dead)
    for scale in (0.2, 30.0):
        one = centred.clone()
        one[:, :, 0] = scale * y[:, None].float()
        torch.testing.assert_close(between_class_share(one, y, 3), torch.full((2,), 1 / 8), atol=5e-3, rtol=0)


def test_planted_map_is_the_recipe_and_the_card():
    assert planted_map("zoo:planted") == PLANTED_MAP == RECIPES["planted"].planted
    assert planted_map("zoo:deit") is None and planted_map("planted") is None
    card = read_card("planted")
    assert card["planted"]["map"] == PLANTED_MAP
    acc = card["planted"]["accuracy"]
    for a, s in card["planted"]["summary"].items():
        assert s["planted_min"] == min(acc[h][a] for h in PLANTED_MAP[a])


@pytest.fixture(scope="module")
def fresh_probe_accuracy():
    """Held-out probe accuracy of every head and MLP of the shipped model on every core attribute,
    on scenes of a seed nobody used (400 to fit, 300 to test)."""
    from vitdecomp.probes import batched_probe
    from vitdecomp.zoo.evaluate import direct_branch_contributions

    assert (WEIGHTS_DIR / "planted.safetensors").is_file(), "vitdecomp zoo train planted"
    torch.manual_seed(0)
    model = load_zoo_model("planted").model
    tr, te = make_scenes(400, seed=FRESH_SEED), make_scenes(300, seed=FRESH_SEED + 1)
    labels, c_tr = direct_branch_contributions(model, tr.images)
    c_te = direct_branch_contributions(model, te.images)[1]
    x_tr, x_te = c_tr.transpose(0, 1).contiguous(), c_te.transpose(0, 1).contiguous()
    acc, chance = {}, {}
    for a in CORE_ATTRIBUTES:
        y_tr, y_te = torch.from_numpy(tr.attributes[a]).long(), torch.from_numpy(te.attributes[a]).long()
        acc[a] = dict(zip(labels, batched_probe(x_tr, y_tr, x_te, y_te).tolist(), strict=True))
        chance[a] = float(np.bincount(te.attributes[a]).max() / len(te))
    return acc, chance


@pytest.mark.parametrize("attribute", CORE_ATTRIBUTES)
def test_shipped_planted_roles_hold_on_fresh_scenes(fresh_probe_accuracy, attribute):
    acc, chance = fresh_probe_accuracy
    per = acc[attribute]
    planted = PLANTED_MAP[attribute]
    other_heads = {h: v for h, v in per.items() if h not in planted and not h.endswith("mlp")}
    assert len(other_heads) == 20 - len(planted)
    worst_planted = min(per[h] for h in planted)
    best_other = max(other_heads, key=other_heads.get)
    assert worst_planted >= PLANTED_MIN[attribute], {h: per[h] for h in planted}
    assert other_heads[best_other] <= OTHER_HEAD_MAX[attribute], (best_other, other_heads[best_other])
    # the planted heads are the ones that decode it best, by a margin; and they are far above chance
    assert worst_planted - other_heads[best_other] >= MIN_GAP, (best_other, other_heads[best_other])
    assert worst_planted > chance[attribute] + 0.5
