"""`vitdecomp analyze` end to end on random-init zoo models and a few generated scenes.

One module-scoped run (64 scenes, zoo:deit read through zoo:clip, both random-init) feeds most
tests; reruns, refusals, the CLIP-subject identity path and image folders get their own small runs.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vitdecomp.analyze import AnalysisConfig, run_analysis
from vitdecomp.errors import MismatchError
from vitdecomp.results import AnalysisResult
from vitdecomp.scores.registry import DEFAULT_SCORE

N = 64
RUN = dict(
    model="zoo:deit",
    reader="zoo:clip",
    n_images=N,
    random_init=True,
    batch_size=32,
    align_steps=25,
    device="cpu",
    progress=False,
    verbose=False,
)


def analysis(**options) -> AnalysisResult:
    return run_analysis(AnalysisConfig(**{**RUN, **options}))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The zoo models' many small ops run fastest on one thread on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def first_run(one_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    cache, out = root / "cache", root / "out"
    results = analysis(out=out, cache_dir=cache)
    return results, out, cache


def test_results_json_has_every_label_and_feature(first_run):
    results, out, _ = first_run
    data = json.loads((out / "results.json").read_text())
    labels = data["labels"]
    assert labels[0] == "init" and len(labels) == data["n_components"] == 32
    assert len(set(labels)) == len(labels)
    assert set(data["features"]) == {"shape", "color", "pattern", "background"}
    for method in ("paper", "invariant"):
        table = data["scores"][method]
        assert set(table) == set(data["features"])
        for feature, row in table.items():
            assert list(row) == labels, (method, feature)
            assert all(math.isfinite(v) and -1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in row.values())
            assert sorted(data["rankings"][method][feature]) == sorted(labels)
    assert set(data["descriptions"]) == set(labels)
    # rank-1 components (init, attention biases: one direction scaled by the frozen norm) are marked
    # constant and get neither descriptions nor top images; every other component gets 5 of each
    constant = data["constant"]
    assert "init" in constant and all(lab in constant for lab in labels if lab.endswith("attn_bias"))
    assert all(0 <= v < 1e-4 for v in constant.values())
    assert all(lab.endswith(("init", "bias")) for lab in constant)
    for lab in labels:
        want = 0 if lab in constant else 5
        assert len(data["descriptions"][lab]) == want, lab
        assert len(data["top_images"][lab]) == (0 if lab in constant else 4), lab
    assert data["completeness"]["max_relative_error"] < 1e-4
    assert data["images"]["n"] == N
    assert data["store"]["key"]["labels"] == labels
    assert data["aligner"]["key"]["model"] == "zoo:deit@random-init:seed=3000"  # random weights are seeded
    a = data["alignment"]
    assert a["mode"] == "compalign" and a["state"] == "trained"
    assert a["n_val"] + a["n_train"] == N and a["val_cosine"] > 0
    ids = {f"world-3000-{i:06d}" for i in range(N)}
    assert all(t["id"] in ids for lab in labels for t in data["top_images"][lab])
    assert results.cache.store_rows_computed == N


def test_results_json_is_the_typed_result(first_run):
    """results.json is the serialisation of the typed result, and reads back into it."""
    results, out, _ = first_run
    data = json.loads((out / "results.json").read_text())
    assert list(data) == list(results.to_dict())
    assert AnalysisResult.load(out / "results.json").to_dict() == data
    assert data["clip"]["name"] == results.reader.name == "zoo:clip"


def test_a_model_outside_the_zoo_read_through_the_toy_clip_is_warned_about(first_run):
    """The default reader is the zoo's small CLIP: reading any other model through it gets a warning
    naming the aligner's held-out cosine and how to give a real CLIP; a zoo subject does not."""
    import copy

    from vitdecomp.pipeline.honesty import run_warnings

    r = copy.deepcopy(first_run[0])
    assert not [w for w in run_warnings(r, None, random_init=False, seed=0) if "zoo's small CLIP" in w]
    r.model.name = "deit_base_patch16_224"
    r.alignment.metrics["val_cosine"] = 0.39
    (w,) = [w for w in run_warnings(r, None, random_init=False, seed=0) if "zoo's small CLIP" in w]
    assert "held-out cosine: 0.39" in w and "--clip open_clip:" in w and "--clip-checkpoint" in w


def test_about_these_numbers_explains_every_score_and_names_the_default(first_run):
    """Every score of the run, the default (text_probe, the score of every bar and grid) and ablation
    included, is explained on the page in its registry record's words, and the page says which one the
    tables rank by."""
    import html
    import re

    from vitdecomp.scores.registry import score_about

    r, out, _ = first_run
    page = (out / "index.html").read_text()
    about = html.unescape(re.sub(r"<[^>]+>", "", page[page.index("<h2>About these numbers") :].split("<h2>")[1]))
    assert {"text_probe", "ablation", "paper", "invariant"} <= set(r.scores)
    for m in r.scores:
        assert score_about(m) and " ".join(score_about(m).split()) in " ".join(about.split()), m
    assert f"rank by the {DEFAULT_SCORE} score" in " ".join(about.split())


def test_cli_is_built_from_the_config():
    from vitdecomp.cli import build_parser
    from vitdecomp.commands.analyze import config_of

    argv = ["analyze", "--clip", "zoo:x", "--n-images", "7", "--quiet", "--clip-checkpoint", "w.safetensors"]
    cfg = config_of(build_parser().parse_args(argv))
    want = AnalysisConfig(reader="zoo:x", n_images=7, progress=False, verbose=False, reader_checkpoint="w.safetensors")
    assert cfg == want  # --quiet: no bars and no summary
    assert config_of(build_parser().parse_args(["analyze"])) == AnalysisConfig()


def test_top_images_are_the_largest_projections(first_run):
    """The listed images really are where the component points most along its top description."""
    from vitdecomp.align import aligned_component, load_aligner
    from vitdecomp.store import ContributionStore
    from vitdecomp.text import WORLD_TEMPLATES, TextEncoder

    results, _, cache = first_run
    store = ContributionStore(results.store.path)
    al = load_aligner(results.aligner.path)
    lab = next(lab for lab in results.labels if lab.endswith(".mlp"))
    c = results.labels.index(lab)
    from vitdecomp.pipeline.model_pair import load_model_for

    reader = load_model_for("zoo:clip", random_init=True, seed=3001)  # the run's reader: seed + 1
    assert reader.weights_id == results.reader.weights_id
    enc = TextEncoder.from_loaded(reader, cache_dir=cache / "text")
    t = enc.encode([results.descriptions[lab][0].text], WORLD_TEMPLATES)[0]
    proj = (aligned_component(store, al, c) @ t).numpy()
    rows = [store.ids.index(x.id) for x in results.top_images[lab]]
    # the four largest projections, in order (ids of near-equal ones may swap with the batching: compare values)
    np.testing.assert_allclose(proj[rows], np.sort(proj)[::-1][:4], rtol=1e-5, atol=1e-6)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _headless(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def test_report_is_one_self_contained_file(first_run):
    _, out, _ = first_run
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched
    assert re.search(r"<(script|img|link)[^>]+(src|href)=\"(?!data:|#)", html) is None
    assert html.count("<script>") == 1  # the table's own inline script
    assert html.count("data:image/jpeg;base64,") >= 10  # thumbnails and maps: pictures, as JPEG


def test_report_renders_in_headless_chromium(first_run, tmp_path):
    _, out, _ = first_run
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium / chrome on PATH: cannot screenshot the report (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    _headless(
        browser, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", (out / "index.html").resolve().as_uri()
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    from PIL import Image

    px = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert px.shape[:2] == (2000, 1280)
    assert px.std() > 20, "the screenshot is blank"
    # the header band is the page's blue gradient, not the browser's white
    top = px[10:60, 10:600].reshape(-1, 3).mean(0)
    assert top[2] > 150 and top[2] - top[0] > 60, top
    # the heat table and thumbnails put many saturated pixels on the page
    sat = (px.max(-1) - px.min(-1)) > 60
    assert sat[200:].mean() > 0.02


class _Rows(HTMLParser):
    """The component table's header sort kinds and, per body row, its id, whether it is hidden and its
    score cells' ``data-v``; the images in every ``data-images-of`` slot."""

    def __init__(self) -> None:
        super().__init__()
        self.head: list[str] = []
        self.rows: list[dict] = []
        self.slots: dict[str, int] = {}
        self._where, self._slot = "", None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._where = "table" if a.get("id") == "component-table" else ""
        elif self._where and tag == "tr" and "id" in a:
            self.rows.append({"id": a["id"], "hidden": "hidden" in a, "v": []})
        elif self._where and tag == "th":
            self.head.append(a.get("data-sort", ""))
        elif self._where and tag == "td" and self.rows and "data-v" in a:
            self.rows[-1]["v"].append(a["data-v"])
        if "data-images-of" in a:
            self._slot = a["data-images-of"]
            self.slots[self._slot] = 0
        elif tag == "img" and self._slot:
            self.slots[self._slot] += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._where = ""
        if tag == "div":
            self._slot = None


#: What a user does, scripted: sort by the colour column, then type "mlp" in the filter box.
_SORT_AND_FILTER = """<script>
var th = Array.from(document.querySelectorAll('#component-table thead th'))
  .find(function (t) { return t.textContent.trim() === 'color'; });
th.click();
var box = document.getElementById('component-filter');
box.value = 'mlp';
box.dispatchEvent(new Event('input'));
</script>"""


def test_report_table_sorts_filters_and_opens_a_view_in_chromium(first_run, tmp_path):
    """Clicking the colour column sorts the rows by their colour score, largest first; typing "mlp"
    hides every row but the MLPs'; opening a head's view (#view-<label>) copies its top images in."""
    results, out, _ = first_run
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium / chrome on PATH: cannot run the report's script (apt-get install chromium)")
    page = tmp_path / "index.html"
    page.write_text((out / "index.html").read_text().replace("</body>", _SORT_AND_FILTER + "</body>"))
    head = next(lab for lab in results.labels if lab.split(".")[-1] == "H0" and results.top_images[lab])
    done = _headless(browser, tmp_path, "--dump-dom", page.resolve().as_uri() + f"#view-{head}")
    dom = _Rows()
    dom.feed(done.stdout)
    assert len(dom.rows) == len(results.labels), done.stderr[-2000:]
    col = list(results.scores[DEFAULT_SCORE]).index("color")
    got = [float(r["v"][col]) for r in dom.rows]
    want = sorted((results.scores[DEFAULT_SCORE]["color"][lab] for lab in results.labels), reverse=True)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-12)  # the new order (sort keys: 6 significant digits)
    shown = [r["id"] for r in dom.rows if not r["hidden"]]
    assert shown and shown == [r["id"] for r in dom.rows if r["id"].endswith(".mlp")]
    assert dom.slots[f"row-{head}"] == len(results.top_images[head]) > 0
    assert all(n == 0 for slot, n in dom.slots.items() if slot != f"row-{head}")  # only the opened view


def test_report_shows_head_grids_maps_views_and_galleries(first_run):
    """analyze fills the report's views: a head grid and the top heads' maps per feature, each
    viewed head's maps along its top description, and per feature its value texts' galleries."""
    from vitdecomp.apps.report_figures import N_VIEW_IMAGES

    results, out, _ = first_run
    v = results.views
    assert [f.feature for f in v.features] == list(results.features)
    for f in v.features:
        assert f.grid.startswith("data:image/svg+xml;base64,") and len(f.heads) == 10  # 2 ceil(sqrt(20 heads))
        svg = base64.b64decode(f.grid.split(",", 1)[1]).decode()
        assert svg.count("<rect") == 20 and f.feature in svg  # zoo:deit: 5 layers x 4 heads, every cell drawn
        assert len(f.maps) == 4 and all(m.data_uri.startswith("data:image/jpeg") and m.heads == f.heads for m in f.maps)
        assert all(m.text in results.features[f.feature] for m in f.maps)  # the value the model reads
    assert v.components and all(lab.split(".")[-1].startswith("H") for lab in v.components)
    for lab, c in v.components.items():
        assert c.text == results.descriptions[lab][0].text
        assert [m.image for m in c.maps] == [t.id for t in results.top_images[lab][:N_VIEW_IMAGES]]
    assert {g.feature for g in v.galleries} == set(results.features)
    for g in v.galleries:
        assert len(g.hits) == 8 and g.text in results.features[g.feature]
        assert [h.score for h in g.hits] == sorted((h.score for h in g.hits), reverse=True)
    html = (out / "index.html").read_text()
    assert all(f.grid in html for f in v.features) and all(g.hits[0].id in html for g in v.galleries)
    assert "report_views" in results.timings_s
    assert AnalysisResult.load(out / "results.json").views == v


def test_applications_render_from_their_sections(first_run):
    """Any AppSection in the result is drawn: title, summary, table, figures, command and notes;
    results.json keeps it, and a results.json without views or applications still loads."""
    from vitdecomp.report import render_html
    from vitdecomp.results import AppFigure, AppSection

    results, out, _ = first_run
    fig = results.views.features[0].grid
    app = AppSection(
        name="debias",
        title="Debiasing <by> ablation",
        summary="Worst-group accuracy rises from 0.11 to 0.74.",
        header=["split", "worst group"],
        rows=[["before", "0.11"], ["after", "0.74"]],
        figures=[AppFigure(fig, "groups before and after")],
        command="vitdecomp debias --analysis out",
        notes=["one seed"],
    )
    data = results.to_dict()
    data["applications"] = [app.to_dict()]
    again = AnalysisResult.from_dict(json.loads(json.dumps(data)))
    assert again.applications == [app]
    html = render_html(again)
    assert 'id="app-debias"' in html and "Debiasing &lt;by&gt; ablation" in html
    assert "<td>0.74</td>" in html and "vitdecomp debias --analysis out" in html and "<li>one seed</li>" in html
    assert html.count(fig) >= 2  # the feature's grid and the application's figure
    old = {
        k: v for k, v in json.loads((out / "results.json").read_text()).items() if k not in ("views", "applications")
    }
    plain = AnalysisResult.from_dict(old)
    assert plain.views is None and plain.applications == []
    assert "Heads by layer" in render_html(plain)  # the score grid without the figures


def test_rerun_reuses_store_aligner_and_text(first_run, monkeypatch):
    from vitdecomp import aligner_cache as stages

    results, out, cache = first_run

    def boom(*a, **k):
        raise AssertionError("the aligner was retrained")

    monkeypatch.setattr(stages, "train_aligner", boom)
    again = analysis(out=out, cache_dir=cache)
    assert again.cache.store_rows_computed == 0
    assert again.cache.store_rows_reused == N
    assert again.cache.aligner == "loaded"
    assert again.cache.text_encoder_batches == 0
    assert again.store.path == results.store.path
    assert again.scores == results.scores
    assert again.timings_s["decompose_store"] < max(2.0, 0.5 * results.timings_s["decompose_store"])


def test_other_start_layer_does_not_reuse_the_store(first_run, tmp_path):
    results, _, cache = first_run
    r = analysis(out=tmp_path / "o", cache_dir=cache, n_images=8, start_layer=3)
    assert r.store.path != results.store.path
    assert r.cache.store_rows_computed == 8
    assert r.aligner.path != results.aligner.path
    assert r.labels[0] == "init" and not any(lab.startswith(("L0.", "L1.", "L2.")) for lab in r.labels)


def test_mismatched_cached_aligner_is_refused(first_run, tmp_path):
    results, _, cache = first_run
    src = Path(results.aligner.path)
    # a cache folder whose aligner was trained for another model: copy the cache, tamper the key
    cache2 = tmp_path / "cache"
    shutil.copytree(cache, cache2)
    bad = cache2 / src.relative_to(cache)
    meta = json.loads((bad / "aligner.json").read_text())
    meta["key"]["model"] = "zoo:swin@random-init"
    (bad / "aligner.json").write_text(json.dumps(meta))
    with pytest.raises(MismatchError, match="does not fit"):
        analysis(out=tmp_path / "o", cache_dir=cache2)
    # an aligner given explicitly that was trained for another component layout
    meta["key"]["model"] = results.aligner.key["model"]
    meta["labels"] = [*meta["labels"][:-1], "L9.mlp"]
    (bad / "aligner.json").write_text(json.dumps(meta))
    with pytest.raises(MismatchError):
        analysis(out=tmp_path / "o2", cache_dir=cache, aligner=bad)


def test_clip_subject_uses_identity(tmp_path):
    r = analysis(out=tmp_path / "o", cache_dir=tmp_path / "c", model="zoo:clip", n_images=16)
    assert r.alignment.mode == "identity" and r.aligner.path is None
    # the CLIP subject's parts sum to its own embedding of the same preprocessed image
    assert r.alignment.cosine_all_images > 0.9999


def test_cli_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    from vitdecomp.cli import main
    from vitdecomp.world import make_scenes

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(make_scenes(10, seed=5).images):
        Image.fromarray(im).save(folder / f"im{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    argv = ["analyze", "--random-init", "--images", str(folder), "--out", str(out)]
    argv += ["--cache-dir", str(tmp_path / "c"), "--align-steps", "5", "--quiet", "--device", "cpu"]
    assert main(argv) == 2  # the unreadable file stops the run with a clear error
    assert "broken.png" in capsys.readouterr().err
    assert main([*argv, "--skip-bad-images"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(out / "index.html")  # --quiet: only where the report is
    assert "skipped 1 unreadable file(s)" in printed.err and "broken.png" in printed.err
    data = json.loads((out / "results.json").read_text())
    assert data["images"]["n"] == 10 and len(data["images"]["skipped"]) == 1
    assert set(data["features"]) >= {"color", "texture", "animal", "location"}  # the paper's set
    assert data["vocabulary"]["name"] == "general"
    assert (out / "index.html").is_file()
    assert main([a for a in argv if a != "--quiet"] + ["--skip-bad-images"]) == 0
    printed = capsys.readouterr()
    assert "top components per feature" in printed.out
    # stdout says what each stage starts (no stage silent; stderr is for errors); the summary gives each stage's time
    for said in ("checking the options", "loading the subject", "decomposing 10 images", "confidence of the flow"):
        assert f"vitdecomp: {said}" in printed.out or f"vitdecomp: analyze: {said}" in printed.out, said
    timed = json.loads((out / "results.json").read_text())["timings_s"]
    line = next(x for x in printed.out.splitlines() if x.strip().startswith("time (s)"))
    assert all(f"{stage} " in line for stage in timed if stage != "total")


def test_report_ranks_by_flow_marks_suppressors_and_absent_features(first_run):
    """results.json names the default score it ranks by (``flow``), tests every feature's presence and
    marks each confidence cell significant or not; the page shows a feature's suppressors (negative
    scores) below its carriers, and a feature the images do not show with a warning and no
    significant component."""
    import copy

    from vitdecomp.report.html import render_html

    results, out, _ = first_run
    data = json.loads((out / "results.json").read_text())
    assert data["ranked_by"] == "flow" and "flow" in data["scores"]
    assert set(data["presence"]["features"]) == set(data["features"])
    assert all("significant" in cell for row in data["confidence"]["flow"]["scores"].values() for cell in row.values())
    assert "real texts" in data["confidence"]["flow"]["null"]
    assert set(data["confidence"]) == {"flow"}  # the default: only the ranked score's intervals (the page's)
    assert "--confidence all" in (out / "index.html").read_text()  # the report says how to get the others
    r = copy.deepcopy(results)
    ranking = r.rankings["flow"]["shape"]
    r.scores["flow"]["shape"][ranking[-1]] = -0.25  # a suppressor
    r.presence["features"]["color"]["present"] = False
    page = render_html(r)
    card = page.split("<h3>shape")[1].split('<div class="card">')[0]
    assert "suppresses" in card and ranking[-1] in card, card
    row = r.scores["flow"]["shape"]
    row[ranking[0]], row[ranking[-2]], row[ranking[-1]] = 0.3, 0.0, -1e-6  # rounding noise beside a 0.3 carrier
    card = render_html(r).split("<h3>shape")[1].split('<div class="card">')[0]
    assert "suppresses" not in card, card  # a negative score under 1 % of the best carrier's is not a suppressor
    colour = page.split("<h3>color")[1].split('<div class="card">')[0]
    assert "not in these images" in colour and colour.count("opacity:.45") == colour.count('<div class="rank') >= 5


def test_rank_one_screen_by_gram_matrices_gives_the_svd_answer():
    """The batched Gram screen of ``rank_one_components`` returns exactly what one SVD per component
    returns: the same labels and ratios, including components just above and just below the threshold."""
    import torch

    from vitdecomp.pipeline.honesty import RANK1_THRESHOLD, _svd_ratio, rank_one_components
    from vitdecomp.store import ArrayRows

    g = torch.Generator().manual_seed(0)
    n, d = 40, 24
    u, v = torch.randn(n, 1, generator=g), torch.randn(1, d, generator=g)
    u2, v2 = torch.randn(n, 1, generator=g), torch.randn(1, d, generator=g)
    comps = [torch.randn(n, d, generator=g) for _ in range(20)]  # full rank
    comps += [u @ v, torch.zeros(n, d), 3 * torch.ones(n, 1) @ v]  # rank 1, zero, constant
    for ratio in (0.5, 0.9, 1.1, 1.5, 3.0):  # s2 / s1 around the threshold
        a = u / u.norm() @ (v / v.norm())
        b = (u2 - (u2.T @ u) / (u.T @ u) * u) @ (v2 - (v2 @ v.T) / (v @ v.T) * v)
        comps.append(a + ratio * RANK1_THRESHOLD * b / torch.linalg.svdvals(b)[0])
    x = torch.stack(comps, 1)  # [n, C, D]
    labels = [f"c{i}" for i in range(x.shape[1])]
    want = {lab: r for lab, c in zip(labels, comps, strict=True) if (r := _svd_ratio(c.double())) < RANK1_THRESHOLD}
    got = rank_one_components(ArrayRows(x, labels=labels))
    assert got == want
    assert {"c20", "c21", "c22", "c23", "c24"} <= set(got) and not {"c26", "c27"} & set(got)


def test_maps_of_many_jobs_from_one_decomposition_match_one_heatmaps_call_each(first_run):
    """The report's maps come from one token-map decomposition per batch (every feature's maps on the
    same images; a few heads' views on their top images together): each job's maps equal what
    ``heatmaps`` gives for that job's images, text or feature and heads alone (float rounding apart)."""
    from vitdecomp.apps.analysis import analysis_of, auto_heads
    from vitdecomp.apps.heatmap import MapJob, heatmap_batch, heatmaps
    from vitdecomp.apps.report_figures import view_heads
    from vitdecomp.imageset import world_source
    from vitdecomp.pipeline.model_pair import configured_models

    results, out, _ = first_run
    cfg = AnalysisConfig(**RUN)
    models = configured_models(cfg, "cpu")
    a = analysis_of(results, models.subject, models.reader, out=out)
    source = world_source(N, seed=cfg.seed)
    rows = {i: j for j, i in enumerate(source.ids)}
    heads = view_heads(results)[:3]
    ids = {h: [t.id for t in results.top_images[h][:3]] for h in heads}
    union = list(dict.fromkeys(i for h in heads for i in ids[h]))
    images = [source.image(rows[i]) for i in union]
    jobs = [MapJob([union.index(i) for i in ids[h]], [h], results.descriptions[h][0].text) for h in heads]
    features = list(results.features)[:2]
    jobs += [MapJob([0, 1], auto_heads(a.scores(f), results.labels), feature=f) for f in features]
    batched = heatmap_batch(a, images, jobs)
    assert len({len(union), *(len(j.rows) for j in jobs)}) > 1  # the jobs read different image sets
    for job, got in zip(jobs, batched, strict=True):
        alone = heatmaps(a, [images[i] for i in job.rows], text=job.text, feature=job.feature, heads=job.heads)
        assert len(got) == len(alone) == len(job.rows)
        for g, w in zip(got, alone, strict=True):
            assert (g.text, g.heads, g.against, g.read_as) == (w.text, w.heads, w.against, w.read_as)
            scale = max(float(np.abs(w.input).max()), 1e-12)
            assert (
                np.abs(g.input - w.input).max() <= 1e-4 * scale
                and np.abs(g.original - w.original).max() <= 1e-4 * scale
            )
            assert math.isclose(g.level, w.level, rel_tol=1e-4, abs_tol=1e-6 * scale)
