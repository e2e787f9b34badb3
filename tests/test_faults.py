"""The fault suite: bad inputs, damaged caches, a full disk, a held lock and kill -9, each meeting
the error contract — exit status 2, one line on stderr naming what is wrong — and losing nothing
that an earlier good run wrote (every file of its report and cache is still there, unchanged).

One good run (16 scenes, random-init zoo models, 3 aligner steps) makes the state that every case
must leave intact; most cases fail before a model is loaded, a few after; only the kill -9 cases
and the entry-point checks start a process of their own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitdecomp.cli import main
from vitdecomp.world import make_scenes

BASE = ["--random-init", "--n-images", "16", "--align-steps", "3", "--batch-size", "16", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (lock files aside: their content is the holder)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name != "lock":
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_nothing_lost(before: dict[str, str]) -> None:
    now = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in before if Path(p).is_file()}
    lost = sorted(set(before) - set(now))
    changed = sorted(p for p in now if now[p] != before[p])
    assert not lost and not changed, f"lost {lost[:3]}, changed {changed[:3]}"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A finished good run: its report folder, its cache and the snapshot of both."""
    root = tmp_path_factory.mktemp("good")
    out, cache = root / "out", root / "cache"
    assert main(["analyze", *BASE, "--out", str(out), "--cache-dir", str(cache)]) == 0
    files = _fixture_files(root / "files")
    return {"out": out, "cache": cache, "files": files, "before": snapshot(out, cache)}


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _fixture_files(root: Path) -> dict[str, Path]:
    """Files the cases point at: bad JSON, empty vocabulary, garbage weights, broken folders, a bomb."""
    root.mkdir(parents=True)
    scenes = make_scenes(3, seed=7).images
    f = {
        "file": root / "file.txt",
        "bad_json": root / "bad.json",
        "empty_json": root / "empty.json",
        "empty_vocab": root / "empty.txt",
        "garbage": root / "garbage.safetensors",
        "no_images": root / "no_images",
        "broken": root / "broken",
        "all_broken": root / "all_broken",
        "bomb": root / "bomb",
        "no_aligner": root / "no_aligner",
        "model_dir": root / "model_dir",
    }
    f["file"].write_text("a file, not a folder\n")
    f["bad_json"].write_text("{not json")
    f["empty_json"].write_text("{}")
    f["empty_vocab"].write_text("# nothing but a comment\n\n")
    f["garbage"].write_bytes(b"\x00garbage, not a safetensors file" * 10)
    for name in ("no_images", "no_aligner", "model_dir"):
        f[name].mkdir()
    (f["no_images"] / "notes.txt").write_text("no images here")
    for i, im in enumerate(scenes[:2]):
        _png(f["broken"] / f"ok{i}.png", im)
        _png(f["bomb"] / f"ok{i}.png", im)
    (f["broken"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    f["all_broken"].mkdir()
    for i in range(2):
        (f["all_broken"] / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    Image.new("1", (8000, 8000)).save(f["bomb"] / "huge.png")  # 64 M pixels in a few kB
    return f


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *expect: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert "error:" in lines[0] and "Traceback" not in err
    for e in expect:
        assert e.lower() in lines[0].lower(), (e, lines[0])


# ------------------------------------------------------------------------------------------------
# analyze: options, names and files refused before any heavy work (or right after loading)

#: In a case's options: run with pretrained weights (drop ``--random-init`` from :data:`BASE`).
PRETRAINED = "<pretrained>"

ANALYZE_CASES = [
    ("n-images-1", ["--n-images", "1"], ["--n-images 1", "at least 2"]),
    ("n-images-0", ["--n-images", "0"], ["--n-images 0"]),
    ("n-images-not-int", ["--n-images", "many"], ["--n-images", "invalid int"]),
    ("batch-size-0", ["--batch-size", "0"], ["--batch-size 0"]),
    ("align-batch-size-0", ["--align-batch-size", "0"], ["--align-batch-size 0"]),
    ("align-steps-negative", ["--align-steps", "-1"], ["--align-steps -1"]),
    ("val-fraction-0", ["--val-fraction", "0"], ["--val-fraction"]),
    ("val-fraction-above-1", ["--val-fraction", "1.5"], ["--val-fraction"]),
    ("top-k-0", ["--top-k", "0"], ["--top-k 0"]),
    ("start-layer-negative", ["--start-layer", "-1"], ["--start-layer -1"]),
    ("lam-negative", ["--lam", "-1"], ["--lam"]),
    ("threads-0", ["--threads", "0"], ["--threads 0"]),
    ("dtype-unknown", ["--dtype", "float8"], ["--dtype", "float8"]),
    ("unknown-option", ["--colour", "red"], ["unrecognized arguments"]),
    ("images-missing", ["--images", "{tmp}/nowhere"], ["nowhere", "no such folder"]),
    ("images-is-a-file", ["--images", "{file}"], ["file.txt"]),
    ("checkpoint-missing", ["--checkpoint", "{tmp}/w.safetensors"], ["--checkpoint", "w.safetensors"]),
    ("clip-checkpoint-missing", ["--clip-checkpoint", "{tmp}/c.safetensors"], ["--clip-checkpoint"]),
    ("aligner-folder-empty", ["--aligner", "{no_aligner}"], ["--aligner", "aligner.json"]),
    ("device-unknown", ["--device", "tpu9"], ["--device tpu9"]),
    ("out-is-a-file", ["--out", "{file}"], ["--out", "not a folder"]),
    ("out-under-a-file", ["--out", "{file}/report"], ["file.txt"]),
    ("cache-dir-is-a-file", ["--cache-dir", "{file}"], ["--cache-dir"]),
    ("features-unknown", ["--features", "smells"], ["smells"]),
    ("features-bad-json", ["--features", "{bad_json}"], ["bad.json"]),
    ("features-empty-inline", ["--features", "{{}}"], ["--features {}", "no features"]),
    ("features-empty-file", ["--features", "{empty_json}"], ["empty.json", "no features"]),
    ("seed-negative", ["--seed", "-1"], ["--seed -1"]),
    ("vocabulary-unknown", ["--vocabulary", "klingon"], ["klingon"]),
    ("vocabulary-empty", ["--vocabulary", "{empty_vocab}"], ["no entries"]),
    ("model-unknown", ["--model", "not_a_model_at_all"], ["not_a_model_at_all"]),
    ("model-zoo-unknown", ["--model", "zoo:nosuch"], ["zoo:nosuch", "zoo:deit"]),
    ("open-clip-without-tag", [PRETRAINED, "--clip", "open_clip:ViT-B-16"], ["TAG", "--random-init"]),
    ("open-clip-unknown-tag", [PRETRAINED, "--clip", "open_clip:ViT-B-16/nosuchtag"], ["nosuchtag"]),
    ("open-clip-unknown-arch", ["--clip", "open_clip:NoSuchArch/x"], ["NoSuchArch"]),
    ("local-dir-missing", ["--model", "local-dir:{tmp}/nowhere"], ["no such folder"]),
    ("hf-hub-without-org", ["--model", "hf-hub:justaname"], ["hf-hub:ORG/REPO"]),
    ("images-without-images", ["--images", "{no_images}"], ["no images"]),
    ("images-broken-file", ["--images", "{broken}"], ["broken.png", "--skip-bad-images"]),
    ("images-all-broken-skipped", ["--images", "{all_broken}", "--skip-bad-images"], ["at least 2 images"]),
    ("images-decompression-bomb", ["--images", "{bomb}"], ["huge.png", "pixels"]),
    ("clip-is-not-a-clip", ["--model", "zoo:swin", "--clip", "zoo:deit"], ["--clip zoo:deit", "not a CLIP"]),
    ("subject-is-not-a-clip", ["--clip", "zoo:deit"], ["zoo:deit is not a CLIP", "--clip"]),
    ("start-layer-past-depth", ["--start-layer", "99"], ["--start-layer 99"]),
]
if not torch.cuda.is_available():
    ANALYZE_CASES.append(("device-cuda-missing", ["--device", "cuda"], ["--device cuda", "no CUDA"]))


@pytest.mark.parametrize(("extra", "expect"), [c[1:] for c in ANALYZE_CASES], ids=[c[0] for c in ANALYZE_CASES])
def test_analyze_refuses_with_one_line(good, tmp_path, capsys, extra, expect):
    names = {k: str(v) for k, v in good["files"].items()} | {"tmp": str(tmp_path)}
    base = [x for x in BASE if x != "--random-init"] if PRETRAINED in extra else BASE
    extra = [x.format(**names) for x in extra if x != PRETRAINED]
    argv = ["analyze", *base, "--out", str(good["out"]), "--cache-dir", str(good["cache"]), *extra]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, *expect)
    assert_nothing_lost(good["before"])


# ------------------------------------------------------------------------------------------------
# decompose

DECOMPOSE_CASES = [
    ("out-is-a-file", ["--out", "{file}"], ["--out", "not a folder"]),
    ("batch-size-0", ["--batch-size", "0"], ["--batch-size 0"]),
    ("unknown-option", ["--no-such-option", "zoo:deit"], ["unrecognized arguments"]),
    ("start-layer-past-depth", ["--start-layer", "99"], ["--start-layer 99"]),
    ("images-missing", ["--images", "{tmp}/nowhere"], ["no such folder"]),
    ("images-broken-file", ["--images", "{broken}"], ["broken.png", "--skip-bad-images"]),
]


@pytest.mark.parametrize(("extra", "expect"), [c[1:] for c in DECOMPOSE_CASES], ids=[c[0] for c in DECOMPOSE_CASES])
def test_decompose_refuses_with_one_line(good, tmp_path, capsys, extra, expect):
    names = {k: str(v) for k, v in good["files"].items()} | {"tmp": str(tmp_path)}
    extra = [x.format(**names) for x in extra]
    argv = ["decompose", "zoo:deit", "--random-init", "--n-images", "2", "--device", "cpu", "--quiet", *extra]
    assert_one_line_error(*run_cli(argv, capsys), *expect)
    assert_nothing_lost(good["before"])


@pytest.mark.parametrize(
    ("model", "expect"),
    [("not_a_model_at_all", ["not_a_model_at_all"]), ("open_clip:ViT-B-16", ["TAG"]), ("zoo:nope", ["zoo:nope"])],
    ids=["timm-unknown", "open-clip-no-tag", "zoo-unknown"],
)
def test_decompose_refuses_bad_model_names(good, capsys, model, expect):
    assert_one_line_error(*run_cli(["decompose", model, "--quiet", "--device", "cpu"], capsys), *expect)
    assert_nothing_lost(good["before"])


@pytest.mark.parametrize("model", ["zoo:deit", "vit_tiny_patch16_224"])
def test_corrupt_checkpoint_is_named(good, capsys, model):
    garbage = str(good["files"]["garbage"])
    code, err = run_cli(["decompose", model, "--checkpoint", garbage, "--quiet", "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "garbage.safetensors")
    assert_nothing_lost(good["before"])


def test_offline_pretrained_fails_fast_naming_repo_file_and_flag(good, capsys, monkeypatch):
    import time

    from vitdecomp.models import loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loading.hub_offline.cache_clear()
    t0 = time.time()
    code, err = run_cli(["decompose", "vit_tiny_patch16_224", "--quiet", "--device", "cpu"], capsys)
    loading.hub_offline.cache_clear()
    assert time.time() - t0 < 20
    assert_one_line_error(code, err, "timm/vit_tiny_patch16_224", "model.safetensors", "--checkpoint", "offline")
    assert "pretrained=False" not in err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model is loaded (the input must be refused before)."""
    from vitdecomp.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    import vitdecomp
    from vitdecomp.pipeline import model_pair

    for module in (vitdecomp, model_pair, loading):  # vitdecomp's lazy attribute read before loading's is patched
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.mark.parametrize("command", ["analyze", "decompose"])
def test_a_broken_image_is_refused_before_any_model_loads(good, tmp_path, capsys, no_model_loads, command):
    argv = [command, "--images", str(good["files"]["broken"]), "--out", str(tmp_path / "o"), "--quiet"]
    assert_one_line_error(*run_cli(argv, capsys), "broken.png", "--skip-bad-images")


def test_offline_open_clip_reader_is_one_line_naming_its_own_flag(tmp_path):
    """open_clip logs its failed download on the root logger (naming another file it tried): that line
    is held back, and the one error names the reader's flag, --clip-checkpoint."""
    argv = ["analyze", "--clip", "open_clip:ViT-B-16/laion2b_s34b_b88k", "--n-images", "16", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITDECOMP_CACHE": str(tmp_path / "c")}
    proc = subprocess.run(
        [sys.executable, "-m", "vitdecomp", *argv, "--out", str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "open_clip_model.safetensors", "--clip-checkpoint FILE")
    assert "ERROR:root" not in proc.stderr and "open_clip_pytorch_model.bin" not in proc.stderr


def test_non_finite_images_are_named_not_blamed_on_the_model():
    import vitdecomp as vd
    from vitdecomp.errors import NonFiniteInputError

    loaded = vd.load_model("zoo:deit", random_init=True)
    x = torch.zeros(3, 3, *loaded.image_size)
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="batch position 2") as info:
        vd.decompose(loaded, x)
    assert "rules do not cover" not in str(info.value) and "\n" not in str(info.value)


WORLD_EXPORT_CASES = [
    ("n-negative", ["--n", "-5"], ["--n-images -5", "at least 1"]),
    ("n-zero", ["--n-images", "0"], ["--n-images 0"]),
    ("size-8", ["--size", "8"], ["--size 8", "at least 16"]),
    ("seed-negative", ["--seed", "-1"], ["--seed -1"]),
    ("distractors-negative", ["--distractors", "-1"], ["--distractors -1"]),
    ("corr-above-1", ["--waterbirds", "--n-images", "7", "--corr", "2"], ["--corr 2.0"]),
    ("waterbirds-too-few", ["--waterbirds", "--n-images", "3"], ["--n-images 3", "at least 7"]),
]


@pytest.mark.parametrize(
    ("extra", "expect"), [c[1:] for c in WORLD_EXPORT_CASES], ids=[c[0] for c in WORLD_EXPORT_CASES]
)
def test_world_export_refuses_with_one_line(tmp_path, capsys, extra, expect):
    argv = ["world", "export", "--n-images", "3", "--out", str(tmp_path / "w"), "--quiet", *extra]
    assert_one_line_error(*run_cli(argv, capsys), *expect)
    assert not (tmp_path / "w").exists()  # refused before writing anything


SEGMENT_CASES = [
    ("n-images-negative", ["--n-images", "-1"], ["--n-images -1"]),
    ("batch-size-0", ["--batch-size", "0"], ["--batch-size 0"]),
    ("show-negative", ["--show", "-1"], ["--show -1"]),
    ("seed-negative", ["--seed", "-1"], ["--seed -1"]),
    ("method-unknown", ["--methods", "decomposition,magic"], ["magic"]),
]


@pytest.mark.parametrize(("extra", "expect"), [c[1:] for c in SEGMENT_CASES], ids=[c[0] for c in SEGMENT_CASES])
def test_segment_refuses_with_one_line_before_any_model_loads(tmp_path, capsys, no_model_loads, extra, expect):
    argv = ["segment", "--out", str(tmp_path / "s"), "--quiet", *extra]
    assert_one_line_error(*run_cli(argv, capsys), *expect)


def test_an_untrained_aligner_gives_a_report_and_a_clear_refusal(good, tmp_path, capsys):
    """``--align-steps 0``: the run finishes with its report (no figures that need a saved aligner, and
    a warning saying so); heatmap and retrieve on that folder refuse in one line, before loading."""
    out = tmp_path / "out"
    argv = ["analyze", *[a for a in BASE if a != "3"], "--out", str(out), "--cache-dir", str(good["cache"])]
    argv[argv.index("--align-steps") + 1 : argv.index("--align-steps") + 1] = ["0"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["alignment"]["state"] == "untrained" and data["views"] is None
    assert any("trained aligner" in w for w in data["warnings"])
    for command in (["heatmap", "--text", "red"], ["retrieve", "--text", "red"]):
        argv = [*command, "--report", str(out), "--out", str(tmp_path / command[0]), "--quiet"]
        with pytest.MonkeyPatch.context() as m:
            m.setattr("vitdecomp.pipeline.model_pair.load_model", lambda *a, **k: pytest.fail("a model loaded"))
            assert_one_line_error(*run_cli(argv, capsys), "untrained aligner", "--align-steps")


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("empty", "empty batch"),
        ("size", "72x64 pixels"),
        ("channels", "1 channel(s)"),
        ("rank-3", "images[None]"),
        ("rank-5", "give a batch [B, 3, 64, 64]"),
        ("list", "not a list"),
        ("meta", "meta device"),
    ],
)
def test_decompose_names_the_input_it_expects(case, expect):
    import vitdecomp as vd
    from vitdecomp.errors import InputError

    loaded = vd.load_model("zoo:deit", random_init=True)
    h, w = loaded.image_size
    images = {
        "empty": torch.zeros(0, 3, h, w),
        "size": torch.zeros(2, 3, h + 8, w),
        "channels": torch.zeros(2, 1, h, w),
        "rank-3": torch.zeros(3, h, w),
        "rank-5": torch.zeros(1, 2, 3, h, w),
        "list": [torch.zeros(3, h, w)],
    }.get(case, torch.zeros(2, 3, h, w))
    if case == "meta":
        loaded.model.to("meta")
    with pytest.raises(InputError, match=re.escape(expect)) as info:
        vd.decompose(loaded, images)
    assert "[B, 3, 64, 64]" in str(info.value) or case == "meta"
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# a world export out of step with its attributes.csv; --skip-bad-images everywhere


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    """A world export of 18 scenes, one PNG converted to JPEG by hand (attributes.csv still lists it)."""
    from vitdecomp.world import export_world

    root = export_world(18, seed=11, out_dir=tmp_path_factory.mktemp("drift") / "w", progress=False)
    png = root / "images" / "000003.png"
    Image.open(png).convert("RGB").save(png.with_suffix(".jpg"))
    png.unlink()
    return root


def test_a_world_export_out_of_step_with_its_csv_is_named(drifted, tmp_path, capsys, no_model_loads):
    for argv in (
        ["analyze", *BASE, "--images", str(drifted), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path)],
        ["segment", "--world", str(drifted), "--out", str(tmp_path / "s"), "--quiet"],
    ):
        assert_one_line_error(*run_cli(argv, capsys), "attributes.csv", "000003.png", "000003.jpg", "--skip-bad-images")


def test_skip_bad_images_reaches_the_automatic_segment_step(drifted, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["analyze", *BASE, "--images", str(drifted), "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    code, err = run_cli([*argv, "--skip-bad-images"], capsys)
    assert code == 0 and "Traceback" not in err, err[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["images"]["n"] == 15 and len(data["images"]["skipped"]) == 2  # 16 listed, 1 missing; 1 unlisted
    assert [a["name"] for a in data["applications"]] == ["segment"]
    assert not [w for w in data["warnings"] if "segment" in w]
    seg = ["segment", "--world", str(drifted), "--n-images", "6", "--out", str(tmp_path / "s"), "--quiet"]
    assert run_cli([*seg, "--skip-bad-images"], capsys)[0] == 0
    assert any("000003" in name for name in json.loads((tmp_path / "s" / "segment.json").read_text())["skipped"])


def test_a_failing_application_is_a_warning_of_the_run(drifted, tmp_path, capsys, monkeypatch):
    from vitdecomp.apps import automatic

    def broken(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "somewhere.png")

    monkeypatch.setattr(automatic, "run_segment", broken)
    out = tmp_path / "out"
    argv = ["analyze", *BASE, "--images", str(drifted), "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert run_cli([*argv, "--skip-bad-images"], capsys)[0] == 0 and (out / "index.html").is_file()
    data = json.loads((out / "results.json").read_text())
    assert data["applications"] == [] and any(w.startswith("segment failed") for w in data["warnings"])


@pytest.mark.parametrize(
    ("heads", "expect"),
    [
        ("L9.H1", ["no head L9.H1", "L0.H0 ... L4.H3"]),
        ("L2.H9", ["no head L2.H9"]),
        ("L3H1", ["no head L3H1"]),
        ("L2.mlp", ["L2.mlp is a component, not an attention head"]),
        (",", ["give head names"]),
    ],
)
def test_heatmap_refuses_heads_that_do_not_exist(good, tmp_path, capsys, no_model_loads, heads, expect):
    argv = ["heatmap", "--report", str(good["out"]), "--text", "a red object", "--heads", heads]
    assert_one_line_error(*run_cli([*argv, "--out", str(tmp_path / "h"), "--quiet"], capsys), "--heads", *expect)
    assert not (tmp_path / "h").exists()


RETRIEVE_CASES = [
    ("k-0", ["--text", "red", "--k", "0"], ["--k 0"]),
    ("k-above-components", ["--text", "red", "--k", "999"], ["--k 999", "32 components"]),
    ("n-results-0", ["--text", "red", "--n-results", "0"], ["--n-results 0"]),
    ("feature-unknown", ["--text", "red", "--feature", "smell"], ["--feature smell", "color"]),
    ("image-nowhere", ["--image", "nowhere.png", "--feature", "color"], ["--image nowhere.png"]),
    ("image-without-feature", ["--image", "nowhere.png"], ["--image needs --feature"]),
    ("report-missing", ["--text", "red", "--report", "{tmp}/nothing"], ["no analysis at"]),
]


@pytest.mark.parametrize(("extra", "expect"), [c[1:] for c in RETRIEVE_CASES], ids=[c[0] for c in RETRIEVE_CASES])
def test_retrieve_refuses_bad_arguments_before_any_model_loads(good, tmp_path, capsys, no_model_loads, extra, expect):
    argv = ["retrieve", "--report", str(good["out"]), *[x.format(tmp=tmp_path) for x in extra]]
    assert_one_line_error(*run_cli([*argv, "--out", str(tmp_path / "r"), "--quiet"], capsys), *expect)


def test_heatmap_checks_its_images_up_front_and_can_skip(good, tmp_path, capsys, monkeypatch):
    files = good["files"]["broken"]
    argv = ["heatmap", str(files / "ok0.png"), str(files / "broken.png"), "--report", str(good["out"])]
    argv += ["--text", "a red object", "--heads", "L0.H1", "--out", str(tmp_path / "h"), "--quiet"]
    with monkeypatch.context() as m:
        m.setattr("vitdecomp.apps.contract.load_analysis", lambda *a, **k: pytest.fail("models loaded first"))
        assert_one_line_error(*run_cli(argv, capsys), "broken.png", "--skip-bad-images")
    code, err = run_cli([*argv, "--skip-bad-images"], capsys)
    assert code == 0 and "broken.png" in err
    maps = json.loads((tmp_path / "h" / "heatmaps.json").read_text())["maps"]
    assert [m["image"] for m in maps] == ["ok0"] and maps[0]["heads"] == ["L0.H1"]


def test_debias_and_ablate_skip_unreadable_images(good, tmp_path):
    """Both read their images through ComponentApplication: refused with the hint, or skipped."""
    from vitdecomp.apps.contract import AnalysedConfig, ComponentApplication
    from vitdecomp.errors import ImageReadError

    class Sets(ComponentApplication):
        name = "sets"

        def measure(self, cfg, source, analyse):
            return source

    folder = good["files"]["broken"]
    with pytest.raises(ImageReadError, match="--skip-bad-images"):
        Sets().run(AnalysedConfig(images=folder, out=tmp_path))
    source = Sets().run(AnalysedConfig(images=folder, out=tmp_path, skip_bad_images=True))
    assert source.ids == ["ok0.png", "ok1.png"] and "broken.png" in source.errors[0]
    for command in ("debias", "ablate", "segment", "heatmap", "analyze", "decompose"):
        from vitdecomp.cli import build_parser

        argv = [command, "--skip-bad-images", "--images", "I", *(["--text", "x"] if command == "heatmap" else [])]
        argv = [a for a in argv if command != "heatmap" or a not in ("--images", "I")]
        assert build_parser(argv).parse_args(argv).skip_bad_images is True


# ------------------------------------------------------------------------------------------------
# damaged caches, a held lock, a full disk


def _copy(good, tmp_path) -> tuple[Path, Path]:
    out, cache = tmp_path / "out", tmp_path / "cache"
    shutil.copytree(good["out"], out)
    shutil.copytree(good["cache"], cache)
    return out, cache


def _store_path(good, cache: Path) -> Path:
    data = json.loads((good["out"] / "results.json").read_text())
    return cache / Path(data["store"]["path"]).relative_to(good["cache"])


@pytest.mark.parametrize("damage", ["manifest.json", "zarr.json", "contributions/zarr.json", "ids"])
def test_damaged_store_is_named_with_the_fix(good, tmp_path, capsys, damage):
    out, cache = _copy(good, tmp_path)
    store = _store_path(good, cache)
    if damage == "ids":
        shutil.rmtree(store / "ids" / "c")  # the ids' chunks are gone
    else:
        (store / damage).write_text('{"chunks": ')  # a write cut short
    before = snapshot(out)
    argv = ["analyze", *BASE, "--out", str(out), "--cache-dir", str(cache)]
    assert_one_line_error(*run_cli(argv, capsys), str(store), "rm -r")
    assert_nothing_lost(before)
    assert_nothing_lost(good["before"])


def test_damaged_aligner_is_named_with_the_fix(good, tmp_path, capsys):
    out, cache = _copy(good, tmp_path)
    (aligner,) = [p.parent for p in (cache / "aligners").rglob("aligner.json")]
    (aligner / "aligner.json").write_text('{"mode": "compalign", "lam"')
    before = snapshot(out)
    argv = ["analyze", *BASE, "--out", str(out), "--cache-dir", str(cache)]
    assert_one_line_error(*run_cli(argv, capsys), str(aligner), "rm -r")
    assert_nothing_lost(before)


def test_a_held_store_lock_names_its_holder(good, tmp_path, capsys):
    from vitdecomp.store import StoreLock

    out, cache = _copy(good, tmp_path)
    before = snapshot(out, cache)
    with StoreLock(_store_path(good, cache)):
        argv = ["analyze", *BASE, "--out", str(out), "--cache-dir", str(cache)]
        assert_one_line_error(*run_cli(argv, capsys), "another run", f"pid {os.getpid()}")
    assert_nothing_lost(before)


def test_full_disk_while_the_store_grows(good, tmp_path, capsys, monkeypatch):
    from vitdecomp.store import ContributionStore

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ContributionStore, "write_rows", full)
    out, cache = _copy(good, tmp_path)
    before = snapshot(out, cache)
    argv = ["analyze", *BASE, "--out", str(out), "--cache-dir", str(cache), "--start-layer", "2"]  # a new store
    assert_one_line_error(*run_cli(argv, capsys), "no space left", str(cache / "stores"))
    assert_nothing_lost(before)


def test_full_disk_while_writing_the_report(good, tmp_path, capsys, monkeypatch):
    out, cache = _copy(good, tmp_path)
    before = snapshot(out, cache)
    real_fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(out)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    argv = ["analyze", *BASE, "--out", str(out), "--cache-dir", str(cache)]
    # the report folder's first file (results.json, written before index.html) is the one named
    assert_one_line_error(*run_cli(argv, capsys), "no space left", str(out / "results.json"))
    assert_nothing_lost(before)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half files left behind


# ------------------------------------------------------------------------------------------------
# kill -9 at injected points (a process of its own)


def _cli_process(argv: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "VITDECOMP_WORKERS": "0"}
    if kill_at:
        env["VITDECOMP_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "vitdecomp", *argv], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("point", ["before-replace:results.json", "store-before-commit"])
def test_kill_9_leaves_the_previous_good_state(good, tmp_path, capsys, point):
    from vitdecomp.store import ContributionStore

    out, cache = _copy(good, tmp_path)
    before = snapshot(out, cache)
    argv = ["analyze", *BASE, "--out", str(out), "--cache-dir", str(cache), "--threads", "1"]
    if point == "store-before-commit":
        argv += ["--start-layer", "3"]  # rows to write: a new store
    proc = _cli_process(argv, kill_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert_nothing_lost(before)
    # the next run finishes, and the interrupted store holds every row exactly once
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    ids = ContributionStore(data["store"]["path"]).ids
    assert len(ids) == len(set(ids)) == 16
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # what the killed run left is gone


def test_kill_9_between_results_and_page_is_told_apart_and_healed(good, tmp_path, capsys):
    """results.json is written first, then index.html, each carrying the run's id: a kill between the
    two leaves a complete new results.json and the previous page (ids differ, so a reader can tell);
    adding a section renders the page again from results.json; no temporary file survives."""
    from vitdecomp.report import page_run_id
    from vitdecomp.report.attach import attach_section
    from vitdecomp.results import AnalysisResult, AppSection

    out, cache = _copy(good, tmp_path)
    old_page = (out / "index.html").read_text()
    old_id = json.loads((out / "results.json").read_text())["run_id"]
    assert old_id and page_run_id(old_page) == old_id
    argv = ["analyze", *BASE, "--out", str(out), "--cache-dir", str(cache), "--threads", "1", "--top-k", "2"]
    proc = _cli_process(argv, kill_at="before-replace:index.html")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    new = AnalysisResult.load(out / "results.json")  # complete, and the killed run's
    assert new.run_id != old_id and (out / "index.html").read_text() == old_page
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the kill left its page's temp file
    attach_section(out, AppSection("toy", "Toy", "a toy section", ["a"], [["1"]]))
    page = (out / "index.html").read_text()
    assert page_run_id(page) == new.run_id and "a toy section" in page
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".report")]


def test_a_killed_writer_s_store_lock_is_free_while_it_is_unreaped(tmp_path):
    """The store lock is the kernel's (flock): a writer killed with -9 and not yet reaped (a zombie)
    holds nothing; while it lived, a second writer was refused naming its pid."""
    from vitdecomp.errors import LockedError
    from vitdecomp.store import StoreLock

    hold = "import sys, time; from vitdecomp.store import StoreLock; StoreLock(sys.argv[1]).__enter__(); "
    hold += "print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {proc.pid} "):
            StoreLock(tmp_path).__enter__()
        os.kill(proc.pid, signal.SIGKILL)
        for _ in range(600):  # dead, not reaped: its state is Z (zombie); dying takes seconds under load
            if Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1].startswith("Z"):
                break
            time.sleep(0.05)
        assert Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1].startswith("Z")
        # The leader shows Z while its other threads may still be exiting (the fd table goes with the last
        # one): allow seconds. A pid-named lock would stay held however long one waits for an unreaped pid.
        with StoreLock(tmp_path, timeout=20):
            assert f"pid {os.getpid()} " in (tmp_path / "lock").read_text()
    finally:
        proc.kill()
        proc.wait()
