"""Value-specific maps: the alternative, the null and the soft threshold by hand; on the world with a
trained zoo model, a wrong value's map is not positive on the object while the right value's map
points into it as the earlier rule did (heatmap and segmentation)."""

from __future__ import annotations

import pytest
import torch

from vitdecomp.apps.specific import ValueContext, alternatives, null_level, shrink, specific_maps


def test_alternatives_spread_the_values_own_share_over_the_others():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    a = alternatives(p, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(a, torch.tensor([[0.0, 0.55, 0.45], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]]))
    # an image that reads as the value: the other values' mean; one that reads as c: c alone
    torch.testing.assert_close(a.sum(1), torch.ones(3))


def test_null_level_is_the_median_peak_of_maps_between_values_the_image_does_not_read():
    """Values 1, 2, 3 are not read (value 0 is): ordered pairs' peaks are max(m_u - m_w)."""
    maps = torch.zeros(1, 4, 1, 2)
    maps[0, 0] = torch.tensor([[9.0, 9.0]])  # the read value: left out
    maps[0, 1] = torch.tensor([[1.0, 0.0]])
    maps[0, 2] = torch.tensor([[0.0, 3.0]])
    maps[0, 3] = torch.tensor([[0.0, 0.0]])
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    # peaks: (1,2) 1, (2,1) 3, (1,3) 1, (3,1) 0, (2,3) 3, (3,2) 0 -> sorted 0 0 1 1 3 3, torch's median: 1
    assert null_level(maps, p).item() == 1.0
    assert null_level(maps[:, :2], p[:, :2] / p[:, :2].sum()).item() == 0.0  # one other value: no pair


def test_shrink_is_a_soft_threshold_per_image():
    m = torch.tensor([[3.0, -3.0, 0.5], [1.0, -1.0, 0.0]])
    torch.testing.assert_close(shrink(m, torch.tensor([1.0, 0.0])), torch.tensor([[2.0, -2.0, 0.0], [1.0, -1.0, 0.0]]))


def test_a_value_the_image_does_not_show_gets_no_positive_map_on_its_object():
    """Three values; the object (left column) shows value 0 and every map is large there, as token
    contributions on an object are; small noise elsewhere."""
    g = torch.Generator().manual_seed(0)
    values = 0.05 * torch.randn(1, 3, 4, 4, generator=g)
    values[0, :, :, 0] += torch.tensor([3.0, 2.6, 1.0])[:, None]  # value 0 strongest on the object, 1 close
    p = torch.tensor([[0.98, 0.01, 0.01]])
    right = specific_maps(values, p, torch.tensor([0]))
    assert (right.maps[0, :, 0] > 0).all() and right.level.item() < 0.01  # the image reads 0: no bar
    for wrong in (1, 2):
        sm = specific_maps(values, p, torch.tensor([wrong]))
        assert (sm.contrast[0, :, 0] < 0).all() and (sm.maps[0, :, 0] <= 0).all(), wrong
        assert sm.alternative[0].argmax().item() == 0 and sm.level.item() > 0
    # the earlier rule (value minus the others' mean) lights the object for value 1
    assert (values[0, 1, :, 0] - (values[0, 0, :, 0] + values[0, 2, :, 0]) / 2 > 0).all()
    # a free text standing for value 1 reads like value 1
    own = specific_maps(values, p, torch.tensor([1]), own=values[:, 1])
    torch.testing.assert_close(own.maps, specific_maps(values, p, torch.tensor([1])).maps)


def test_value_context_candidates_keep_the_mapped_value_and_the_most_probable():
    p = torch.softmax(torch.arange(20.0)[None].repeat(2, 1), -1)
    ctx = ValueContext(torch.zeros(20, 4), p, torch.tensor([0, 3]))
    cand = ctx.candidates()
    assert {0, 3, 19, 11}.issubset(set(cand.tolist())) and 10 not in cand.tolist()
    assert ctx.rows(1, 2).value.tolist() == [3]


# ---------------------------------------------------------------------------- on the world, trained zoo models


@pytest.fixture(scope="module")
def clip_analysis(tmp_path_factory):
    """A small analysis of the trained zoo:clip (it reads itself: no aligner to train)."""
    from vitdecomp.analyze import AnalysisConfig, run_analysis
    from vitdecomp.apps.analysis import load_analysis

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("clip")
    cfg = dict(model="zoo:clip", n_images=16, batch_size=16, device="cpu", progress=False, verbose=False)
    run_analysis(AnalysisConfig(**cfg, out=root / "out", cache_dir=root / "cache"))
    yield load_analysis(root / "out")
    torch.set_num_threads(n)


def test_a_wrong_colour_text_is_not_positive_on_the_object_and_the_right_one_still_points(clip_analysis):
    """12 fresh scenes, the command's rule (top heads): "a <wrong colour> object" puts next to no positive
    relevance on the object (the earlier rule put a third of it there), and "a <right colour> object"
    points into the object on as many scenes as the earlier rule."""
    from vitdecomp.apps.analysis import auto_heads
    from vitdecomp.apps.heatmap import heatmaps
    from vitdecomp.apps.token_maps import token_maps
    from vitdecomp.evaluation.app_heatmaps import phrase
    from vitdecomp.world import make_scenes

    a, n = clip_analysis, 12
    scenes = make_scenes(n, seed=11)
    colours = list(a.result.features["color"])
    truth = scenes.labels("color")
    masks = torch.from_numpy(scenes.masks)
    heads = auto_heads(a.scores("color"), a.result.labels)
    with torch.no_grad():
        emb = a.embed([phrase("a {} object", c) for c in colours])
        x = torch.stack([a.subject.preprocess(scenes.pil(i)) for i in range(n)])
        px = token_maps(a.subject, x, emb).pixels(heads)  # [n, V, H, W]
    hits = {"right": 0, "earlier": 0, "wrong": 0}
    inside_pos = {"wrong": 0.0, "earlier wrong": 0.0}
    for i in range(n):
        v, w = int(truth[i]), (int(truth[i]) + 1 + i % 5) % len(colours)
        with torch.no_grad():
            right = heatmaps(a, [scenes.pil(i)], text=phrase("a {} object", colours[v]), heads=heads)[0].input
            wrong = heatmaps(a, [scenes.pil(i)], text=phrase("a {} object", colours[w]), heads=heads)[0].input
        right, wrong = torch.as_tensor(right), torch.as_tensor(wrong)
        earlier = {u: px[i, u] - (px[i].sum(0) - px[i, u]) / (len(colours) - 1) for u in (v, w)}
        m = masks[i]
        hits["right"] += int(bool(m.flatten()[right.flatten().argmax()]))
        hits["earlier"] += int(bool(m.flatten()[earlier[v].flatten().argmax()]))
        hits["wrong"] += int(wrong.max() > 0 and bool(m.flatten()[wrong.flatten().argmax()]))
        for name, mp in (("wrong", wrong), ("earlier wrong", earlier[w])):
            inside_pos[name] += float(mp[m].clamp_min(0).sum() / mp.clamp_min(0).sum().clamp_min(1e-12)) / n
    assert hits["right"] >= hits["earlier"] and hits["right"] >= 10, hits
    assert hits["wrong"] <= 2, hits
    assert inside_pos["wrong"] < 0.1 < inside_pos["earlier wrong"], inside_pos


def test_segmentation_of_a_value_the_model_does_not_predict_leaves_the_object_dark():
    """zoo:deit's colour head on 20 fresh scenes: against the expected alternative, the decomposition's
    map of a colour the model does not predict covers almost none of the object (the logit alone, as the
    published methods read a class, covers a quarter of it); the predicted colour still points into it."""
    from vitdecomp.apps.masks import world_set
    from vitdecomp.apps.segment import DecompositionMap, Explained, segment
    from vitdecomp.models.loading import load_model

    model, data = load_model("zoo:deit"), world_set(20, 12)
    run = {
        (t, c): segment(model, data, explained=Explained(t, "color", c, 0), methods=[DecompositionMap()], show=1)
        for t in ("predicted", "wrong")
        for c in ("expected", "none")
    }
    score = {k: r.methods[0].metrics for k, r in run.items()}
    assert score["wrong", "expected"].iou_object < 0.05 < 0.15 < score["wrong", "none"].iou_object
    assert score["wrong", "expected"].pointing <= 0.15 < 0.5 < score["wrong", "none"].pointing
    assert score["predicted", "expected"].pointing >= score["predicted", "none"].pointing - 0.1
    assert score["predicted", "expected"].iou_object > 0.3


def test_a_text_that_matches_no_feature_is_read_against_every_value_and_says_so(clip_analysis, monkeypatch):
    """No value reads the text with probability MATCH: the map is the text minus the mean of every
    feature's value texts, with no alternative and no null, and its record says so."""
    import vitdecomp.apps.heatmap as hm
    from vitdecomp.apps.token_maps import token_maps
    from vitdecomp.world import make_scenes

    a, image = clip_analysis, make_scenes(1, seed=5).pil(0)
    heads = ["L0.H0", "L1.H1"]
    assert hm.text_value(a, a.embed(["a red object"])[0])[0] == "color"
    monkeypatch.setattr(hm, "MATCH", 1.01)
    assert hm.text_value(a, a.embed(["a red object"])[0]) == (None, -1)
    with torch.no_grad():
        got = hm.heatmaps(a, [image], text="a red object", heads=heads)[0]
        every = [v for values in a.result.features.values() for v in values]
        d = a.embed(["a red object"]) - a.embed(every).mean(0, keepdim=True)
        want = token_maps(a.subject, a.subject.preprocess(image)[None], d).pixels(heads)[0, 0]
    assert got.against.startswith("every feature's values") and got.reading is None
    torch.testing.assert_close(torch.as_tensor(got.input), want.float())


def test_a_caption_says_which_value_a_text_stands_for_when_the_text_does_not_name_it():
    """The world's reader reads "a dog" as the background "sky" (its vocabulary has no dogs): the map is
    that value's, and its caption says so; a text that names its value is captioned as before."""
    import numpy as np

    from vitdecomp.apps.heatmap import Heatmap, caption

    blank = np.zeros((2, 2))
    dog = Heatmap(blank, blank, "a dog", ["L0.H0"], "water", 0.0, 0.01, 1.0, "background: sky")
    red = Heatmap(blank, blank, "a red object", ["L0.H0"], "blue", 0.0, 0.01, 1.0, "color: red")
    assert caption(dog) == ' (as background: sky) vs "water" (reads 0.01)'
    assert caption(red) == ' vs "blue" (reads 0.01)'


def test_the_tolerant_pointing_game_counts_a_peak_within_near_pixels_of_the_object():
    """A peak one token-width below the object counts for ``pointing_near`` only; a far one for neither."""
    from vitdecomp.evaluation.app_heatmaps import NEAR, MapScores

    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:16, 8:16] = True
    scores = MapScores(inside=True)
    for r, c in ((10, 10), (15 + NEAR, 10), (16 + NEAR, 10), (31, 31)):
        m = torch.zeros(32, 32)
        m[r, c] = 1.0
        scores.add(m, mask)
    scores.add(-torch.ones(32, 32), mask)  # no positive value: points nowhere
    got = scores.result()
    assert got["pointing"] == 1 / 5 and got["pointing_near"] == 2 / 5
