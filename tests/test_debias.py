"""vitdecomp debias: a planted spurious cue is found by the score and removed by mean-ablation; k is
chosen on validation only; bad metadata is one line naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitdecomp.align import identity_aligner
from vitdecomp.apps.classifiers import GroupAccuracy
from vitdecomp.apps.debias import (
    TEST,
    TRAIN,
    VAL,
    Debias,
    DebiasConfig,
    Metadata,
    Split,
    choose_k,
    choose_score,
    debias_arrays,
)
from vitdecomp.apps.mean_ablation import MeanAblation
from vitdecomp.report.outputs import write_app_outputs
from vitdecomp.results import AppSection
from vitdecomp.scores import DEFAULT_SCORE as SCORE_METHOD
from vitdecomp.scores import score_features

LABELS = ["init", "core", "spurious", "noise"]


def run_debias(cfg: DebiasConfig):
    """What ``vitdecomp debias`` does: run the application, write its files into ``cfg.out``."""
    result = Debias().run(cfg)
    write_app_outputs(result, cfg.out)
    return result


def planted(n_train: int = 400, n_val: int = 200, n_test: int = 400, seed: int = 0):
    """Contributions [N, 4, 4] of a Waterbirds-like set: component "core" writes the label (weak, noisy)
    on dim 0, "spurious" the place (strong, clean) on dim 1, "init" a constant on dim 2, "noise" noise
    on dim 3. In train place == y; val and test are group-balanced."""
    g = np.random.default_rng(seed)
    y_tr = g.integers(0, 2, n_train)
    y_va, p_va = np.arange(n_val) % 2, (np.arange(n_val) // 2) % 2
    y_te, p_te = np.arange(n_test) % 2, (np.arange(n_test) // 2) % 2
    y = np.concatenate([y_tr, y_va, y_te])
    place = np.concatenate([y_tr, p_va, p_te])
    split = np.repeat([TRAIN, VAL, TEST], [n_train, n_val, n_test])
    n = len(y)
    c = torch.zeros(n, 4, 4)
    c[:, 0, 2] = 1.0
    c[:, 1, 0] = torch.from_numpy(2.0 * y - 1).float() * 0.5 + 0.35 * torch.randn(n, generator=_gen(seed))
    c[:, 2, 1] = torch.from_numpy(2.0 * place - 1).float() * 2.0
    c[:, 3, 3] = torch.randn(n, generator=_gen(seed + 1))
    return c, Metadata([f"{i}.png" for i in range(n)], y, split, place)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def texts(direction: int) -> torch.Tensor:
    """Two unit 'descriptions' of a feature in the 4-d toy text space: +/- ``direction`` plus dim 2."""
    t = torch.zeros(2, 4)
    t[:, 2] = 1.0
    t[0, direction], t[1, direction] = 1.0, -1.0
    return torch.nn.functional.normalize(t, dim=-1)


def scores_of(c: torch.Tensor, rows: np.ndarray, method: str = SCORE_METHOD) -> dict[str, torch.Tensor]:
    """A score as `vitdecomp debias` computes it (identity aligner); by default the library's default."""
    table = score_features(
        c[rows], identity_aligner(LABELS, 4), {"spurious": texts(1), "core": texts(0)}, (method,), progress=False
    )[method]
    return {"spurious": table["spurious"], "core": table["core"]}


@pytest.mark.parametrize("method", [SCORE_METHOD, "text_probe"])
def test_the_score_finds_the_planted_spurious_component_and_ablating_it_raises_worst_group(method):
    c, meta = planted()
    split = Split.of(meta, np.arange(len(meta.y)))
    s = scores_of(c, split.rows[TRAIN], method)
    assert torch.argmax(s["spurious"] - s["core"]).item() == LABELS.index("spurious")
    ablation = MeanAblation.fit(c, LABELS, split.rows[TRAIN])
    readings, curve = debias_arrays(ablation, split, s["spurious"], s["core"], n_random=3)
    before, after = readings[0], readings[1]
    assert before.test.worst < 0.3, "the head trained where place == y follows the place"
    assert after.components[0] == "spurious"
    assert after.test.worst > before.test.worst + 0.5
    assert after.test.average >= before.test.average
    assert curve[0].test.worst == before.test.worst and curve[after.k].test.worst == after.test.worst
    core = next(r for r in readings if r.name.startswith("ablate top k by score(core)"))
    if method == "text_probe":  # flow credits the confounder for "core" too (the test below)
        assert core.components[0] == "core" and core.test.worst < after.test.worst
    dfr = readings[-1]
    assert dfr.name.startswith("DFR") and dfr.test.worst > before.test.worst + 0.5


def test_on_a_confounded_split_flow_credits_the_confounder_and_text_probe_does_not():
    """In the training split place == y, so the zero-shot labels of "core" split the images as the
    place does: the label-driven ``flow`` score (between-value means) credits the spurious part for
    "core" too, while ``text_probe`` (a probe reading the text's own direction) keeps "core" on top.
    This is why ``debias --score auto`` chooses the score on validation."""
    c, meta = planted()
    rows = Split.of(meta, np.arange(len(meta.y))).rows[TRAIN]
    flow, probe = scores_of(c, rows, "flow"), scores_of(c, rows, "text_probe")
    assert torch.argmax(flow["core"]).item() == LABELS.index("spurious")
    assert torch.argmax(probe["core"]).item() == LABELS.index("core")


def test_the_projection_baseline_removes_the_spurious_text_direction():
    c, meta = planted()
    split = Split.of(meta, np.arange(len(meta.y)))
    s = scores_of(c, split.rows[TRAIN])
    ablation = MeanAblation.fit(c, LABELS, split.rows[TRAIN])
    readings, _ = debias_arrays(ablation, split, s["spurious"], s["core"], spurious_text=texts(1)[:1] - texts(1)[1:])
    projection = next(r for r in readings if r.name.startswith("project"))
    assert projection.test.worst > readings[0].test.worst + 0.5


def test_k_is_chosen_on_validation_and_never_reads_test_labels():
    c, meta = planted()
    split = Split.of(meta, np.arange(len(meta.y)))
    s = scores_of(c, split.rows[TRAIN])
    ablation = MeanAblation.fit(c, LABELS, split.rows[TRAIN])
    first, curve1 = debias_arrays(ablation, split, s["spurious"], s["core"], n_random=1)
    scrambled = Split(split.rows, {**split.y, TEST: 1 - split.y[TEST]}, split.place)
    second, curve2 = debias_arrays(ablation, scrambled, s["spurious"], s["core"], n_random=1)
    assert first[1].k == second[1].k
    assert [p.val.worst for p in curve1] == [p.val.worst for p in curve2]
    assert [p.test.worst for p in curve1] != [p.test.worst for p in curve2]


def test_auto_score_picks_the_ranking_that_works_on_validation_only():
    c, meta = planted()
    split = Split.of(meta, np.arange(len(meta.y)))
    s = scores_of(c, split.rows[TRAIN])
    ablation = MeanAblation.fit(c, LABELS, split.rows[TRAIN])
    swapped = (s["core"], s["spurious"])  # a score that ranks the core component as spurious
    pairs = {"wrong": swapped, "right": (s["spurious"], s["core"])}
    assert choose_score(ablation, split, pairs) == "right"
    scrambled = Split(split.rows, {**split.y, TEST: 1 - split.y[TEST]}, split.place)
    assert choose_score(ablation, scrambled, pairs) == "right"
    assert choose_score(ablation, split, {"wrong": swapped}) == "wrong"


def test_choose_k_rule_worst_group_then_average_then_smallest():
    def acc(worst: float, average: float) -> GroupAccuracy:
        return GroupAccuracy({}, worst, average)

    assert choose_k([acc(0.1, 0.5), acc(0.8, 0.9), acc(0.8, 0.95), acc(0.8, 0.95)]) == 2
    assert choose_k([acc(0.5, 0.5)]) == 0


def test_group_accuracy_worst_and_average():
    y, place = np.array([0, 0, 1, 1, 0, 1]), np.array([0, 1, 0, 1, 0, 1])
    acc = GroupAccuracy.of(np.array([0, 1, 1, 1, 1, 1]), y, place)
    assert acc.groups == {"y=0,place=0": 0.5, "y=0,place=1": 0.0, "y=1,place=0": 1.0, "y=1,place=1": 1.0}
    assert acc.worst == 0.0 and acc.average == pytest.approx(0.625)


# ---------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory):
    from vitdecomp.world.export import export_waterbirds

    root = tmp_path_factory.mktemp("wb")
    return export_waterbirds(root / "wb", n_train=40, n_val=12, n_test=20, corr=1.0, progress=False)


def test_debias_command_writes_json_png_and_a_report_section(waterbirds, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = DebiasConfig(
            images=waterbirds,
            model="zoo:deit",
            out=tmp_path / "out",
            cache_dir=tmp_path / "cache",
            align_steps=10,
            n_random=2,
            progress=False,
        )
        result = run_debias(cfg)
    finally:
        torch.set_num_threads(n)
    doc = json.loads((tmp_path / "out" / "debias.json").read_text())
    assert doc["n_images"] == {"train": 40, "val": 12, "test": 20}
    assert doc["k"] == result.k and len(doc["curve"]) == len(result.ranking) + 1
    assert (tmp_path / "out" / "debias.png").stat().st_size > 0
    section = result.section()
    assert isinstance(section, AppSection) and section.figures[0].data_uri.startswith("data:image/png;base64,")
    assert [r[0] for r in section.rows][-1].startswith("DFR") and len(section.rows) == 5  # no projection: not CLIP
    assert AppSection.from_dict(json.loads((tmp_path / "out" / "debias.section.json").read_text())) == section
    assert section.command == f"vitdecomp debias --images {waterbirds} --model zoo:deit --align-steps 10"


def test_debias_runs_on_a_plain_folder_with_its_own_features(waterbirds, tmp_path):
    import shutil

    folder = tmp_path / "birds"
    shutil.copytree(waterbirds / "images", folder / "photos")
    text = (waterbirds / "metadata.csv").read_text().replace("images/", "photos/")
    (folder / "metadata.csv").write_text(text)
    features = tmp_path / "features.json"
    features.write_text(json.dumps({"spurious": ["water", "sky", "grass"], "core": ["circle", "square"]}))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = DebiasConfig(
            images=folder,
            features=features,
            model="zoo:clip",
            out=tmp_path / "out",
            cache_dir=tmp_path / "cache",
            n_random=1,
            progress=False,
        )
        result = run_debias(cfg)
    finally:
        torch.set_num_threads(n)
    assert result.corr is None and result.features["core"] == ["circle", "square"]
    assert result.score.endswith("(auto: chosen on validation)")
    assert [r.name.split(" ")[0] for r in result.readings] == [
        "linear",
        "ablate",
        "ablate",
        "ablate",
        "project",
        "DFR:",
    ]


def test_skipped_images_leave_the_splits(waterbirds, tmp_path):
    """With --skip-bad-images an unreadable image leaves its split (the metadata still lists it);
    without it, the folder is refused naming the file before anything is analysed."""
    import csv
    import shutil

    from vitdecomp.apps.debias import Debias
    from vitdecomp.errors import ImageReadError
    from vitdecomp.imageset import image_source

    folder = tmp_path / "wb"
    shutil.copytree(waterbirds, folder)
    with open(folder / "metadata.csv", newline="") as f:
        first = next(csv.DictReader(f))["img_filename"]
    (folder / first).write_bytes(b"not an image any more")
    with pytest.raises(ImageReadError, match="--skip-bad-images"):
        image_source(folder)

    class Analysed(Exception):
        pass

    def analyse():
        raise Analysed  # the checks before the analysis passed

    source = image_source(folder, skip_bad=True)
    assert first not in source.ids and len(source.errors) == 1
    with pytest.raises(Analysed):
        Debias().measure(DebiasConfig(images=folder, skip_bad_images=True, out=tmp_path / "o"), source, analyse)


def _write(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")


def _balanced_rows(files):
    return [[f, i % 2, [0, 1, 2][min(i // 4, 2)], (i // 2) % 2] for i, f in enumerate(files)]


@pytest.mark.parametrize(
    "case, expect",
    [
        ("no file", "no metadata file"),
        ("no column", "missing column(s) place"),
        ("bad value", "split=7"),
        ("not an integer", "y='bird'"),
        ("empty group", "no image with y="),
        ("missing image", "not found under the images folder: images/missing.png"),
        ("one label in train", "train split has only"),
    ],
)
def test_bad_metadata_is_one_line_naming_the_file(waterbirds, tmp_path, capsys, case, expect):
    from vitdecomp.cli import main

    files = [f"images/{i:06d}.png" for i in range(12)]
    header = ["img_filename", "y", "split", "place"]
    rows = _balanced_rows(files)
    meta = tmp_path / "metadata.csv"
    if case == "no column":
        _write(meta, header[:3], [r[:3] for r in rows])
    elif case == "bad value":
        rows[5][2] = 7
        _write(meta, header, rows)
    elif case == "not an integer":
        rows[3][1] = "bird"
        _write(meta, header, rows)
    elif case == "empty group":
        _write(meta, header, [r for r in rows if not (r[2] == 2 and r[1] == 1 and r[3] == 0)])
    elif case == "missing image":
        rows[0][0] = "images/missing.png"
        _write(meta, header, rows)
    elif case == "one label in train":
        _write(meta, header, [r for r in rows if not (r[2] == 0 and r[1] == 1)])
    elif case != "no file":
        raise AssertionError(case)
    code = main(
        [
            "debias",
            "--images",
            str(waterbirds),
            "--metadata",
            str(meta),
            "--out",
            str(tmp_path / "o"),
            "--cache-dir",
            str(tmp_path / "c"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("vitdecomp: error:")
    assert expect in err and "metadata.csv" in err


def test_the_result_follows_the_application_contract():
    """JSON both ways (nested readings and curve included), a section with the k curve as a figure, and
    the files ``vitdecomp debias`` writes: debias.json, debias.png, debias.section.json."""
    import json

    from vitdecomp.apps.debias import K_RULE, DebiasResult

    c, meta = planted(n_train=200, n_val=100, n_test=100)
    split = Split.of(meta, np.arange(len(meta.y)))
    s = scores_of(c, split.rows[TRAIN])
    ablation = MeanAblation.fit(c, LABELS, split.rows[TRAIN])
    readings, curve = debias_arrays(ablation, split, s["spurious"], s["core"], n_random=2)
    ranking = [(lab, float(v)) for lab, v in zip(LABELS, (s["spurious"] - s["core"]).tolist(), strict=True)]
    result = DebiasResult(
        "toy", "arrays", None, SCORE_METHOD, {}, {"train": 200}, readings[1].k, K_RULE, readings, curve, ranking
    )
    back = DebiasResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result and back.reading("DFR").test.groups == result.reading("DFR").test.groups
    (fig,) = result.figures()
    assert fig.name == "debias" and fig.png[:4] == b"\x89PNG"
    assert result.section().figures == [fig.for_section()]
