"""Applications reach the `analyze` report: `--report DIR` adds (or replaces) a command's section in
DIR/results.json and DIR/index.html, keeps the rest of the page, and refuses a folder that is not a
report with one line."""

from __future__ import annotations

import json
import re
import threading
from typing import ClassVar  # at module level: dataclasses reads it there to tell a class variable

import pytest
import torch

from vitdecomp.analyze import AnalysisConfig, run_analysis
from vitdecomp.cli import main
from vitdecomp.errors import UsageError
from vitdecomp.report.attach import BEGIN, END, attach_section, updated_page
from vitdecomp.results import AnalysisResult, AppSection
from vitdecomp.world.export import export_world


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def report(one_thread, tmp_path_factory):
    """A small `analyze` output folder (random-init zoo:deit read by zoo:clip, 16 scenes)."""
    root = tmp_path_factory.mktemp("report")
    cfg = AnalysisConfig(
        model="zoo:deit",
        reader="zoo:clip",
        n_images=16,
        random_init=True,
        batch_size=16,
        align_steps=5,
        device="cpu",
        progress=False,
        verbose=False,
        out=root / "out",
        cache_dir=root / "cache",
    )
    run_analysis(cfg)
    return root / "out"


@pytest.fixture
def folder(report, tmp_path):
    """A fresh copy of the report folder, so that each test starts with no application section."""
    copy = tmp_path / "report"
    copy.mkdir()
    for name in ("results.json", "index.html"):
        (copy / name).write_bytes((report / name).read_bytes())
    return copy


def _outside_applications(page: str) -> str:
    return page[: page.index(BEGIN)] + page[page.index(END) :]


def _section(name: str, title: str) -> AppSection:
    return AppSection(name=name, title=title, summary=f"{title} in words.", header=["a"], rows=[["1"]])


def test_segment_report_adds_its_section_once_and_keeps_the_rest_of_the_page(folder, tmp_path, one_thread, capsys):
    world = export_world(3, seed=7100, out_dir=tmp_path / "world", progress=False)
    before = (folder / "index.html").read_text()
    assert AnalysisResult.load(folder / "results.json").applications == []
    argv = ["segment", "--world", str(world), "--methods", "decomposition", "--show", "1"]
    argv += ["--out", str(tmp_path / "seg"), "--report", str(folder)]
    for _ in range(2):  # a second run replaces the section
        assert main(argv) == 0
        apps = AnalysisResult.load(folder / "results.json").applications
        assert [a.name for a in apps] == ["segment"]
    assert "added to" in capsys.readouterr().out
    page = (folder / "index.html").read_text()
    assert page.count('id="app-segment"') == 1 and apps[0].title in page
    assert apps[0].rows[0][0] == "decomposition" and apps[0].figures[0].data_uri in page
    assert _outside_applications(page) == _outside_applications(before), "thumbnails and the rest are kept"


def test_sections_are_replaced_by_name_in_place_and_others_kept(folder):
    attach_section(folder, _section("debias", "Debias one"))
    attach_section(folder, _section("ablate", "Ablate"))
    attach_section(folder, _section("debias", "Debias two"))
    apps = AnalysisResult.load(folder / "results.json").applications
    assert [(a.name, a.title) for a in apps] == [("debias", "Debias two"), ("ablate", "Ablate")]
    page = (folder / "index.html").read_text()
    assert "Debias two" in page and "Debias one" not in page and page.index("Debias two") < page.index("Ablate")


def test_concurrent_attaches_lose_no_section(folder):
    threads = [
        threading.Thread(target=attach_section, args=(folder, _section(f"app{i}", f"App {i}"))) for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = {a.name for a in AnalysisResult.load(folder / "results.json").applications}
    assert names == {f"app{i}" for i in range(6)}
    page = (folder / "index.html").read_text()
    assert all(f'id="app-app{i}"' in page for i in range(6))


def test_a_page_without_markers_is_rendered_whole_from_results_json(folder):
    result = AnalysisResult.load(folder / "results.json")
    result.applications = [_section("segment", "Zero-shot")]
    page = updated_page("<html>an older page</html>", result)
    assert "an older page" not in page and 'id="app-segment"' in page and BEGIN in page


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such folder"),
        ("empty", "no results.json in it"),
        ("no-page", "no index.html in it"),
        ("not-json", "results.json is not an analyze result"),
    ],
)
@pytest.mark.parametrize("command", ["segment", "debias", "ablate"])
def test_a_bad_report_folder_is_one_line_naming_it_before_any_work(command, case, message, folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    if case != "missing":
        bad.mkdir()
    if case in ("no-page", "not-json"):
        (bad / "results.json").write_text("{}" if case == "no-page" else '{"format_version": 1}')
    if case == "not-json":
        (bad / "index.html").write_text("<html></html>")
    argv = [command, "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--report", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and re.search(message, err), err
    assert not (tmp_path / "o").exists(), "refused before any work"
    with pytest.raises(UsageError, match="--report"):
        attach_section(bad, _section("x", "X"))
    assert json.loads((folder / "results.json").read_text())["applications"] == []


# ------------------------------------------------------------------ analyze runs the applications it finds


def _analyze(images, out, cache, **options) -> AnalysisResult:
    cfg = dict(model="zoo:deit", reader="zoo:clip", batch_size=16, align_steps=5, device="cpu", progress=False)
    return run_analysis(AnalysisConfig(images=images, out=out, cache_dir=cache, verbose=False, **{**cfg, **options}))


def test_analyze_adds_a_segment_section_for_a_folder_with_masks(one_thread, tmp_path):
    from vitdecomp.apps.automatic import AUTO_SEGMENT_IMAGES, AUTO_SEGMENT_METHODS

    world = export_world(8, seed=7100, out_dir=tmp_path / "world", progress=False)
    result = _analyze(world / "images", tmp_path / "out", tmp_path / "cache", random_init=True)
    assert [a.name for a in result.applications] == ["segment"]
    section = result.applications[0]
    assert [r[0] for r in section.rows] == list(AUTO_SEGMENT_METHODS) == ["decomposition"]  # baselines on demand
    assert f"--methods {','.join(AUTO_SEGMENT_METHODS)}" in section.command
    assert f"--masks {world / 'masks'}" in section.command
    assert f"--n-images {AUTO_SEGMENT_IMAGES}" in section.command  # analyze maps a bounded number of images
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count('id="app-segment"') == 1 and section.title in page
    saved = AnalysisResult.load(tmp_path / "out" / "results.json")
    assert saved.applications == result.applications and "applications" in saved.timings_s
    skipped = _analyze(world / "images", tmp_path / "out2", tmp_path / "cache", random_init=True, apps=False)
    assert skipped.applications == [] and 'id="app-' not in (tmp_path / "out2" / "index.html").read_text()


def test_detection_finds_masks_inside_or_beside_and_waterbirds_metadata_only(tmp_path):
    from vitdecomp.apps.automatic import Found, detect_applications

    (tmp_path / "a" / "masks").mkdir(parents=True)
    (tmp_path / "b" / "images").mkdir(parents=True)
    (tmp_path / "b" / "masks").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metadata.csv").write_text("img_filename,y,split,place\nx.png,0,0,0\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metadata.csv").write_text("file,label\nx.png,0\n")
    assert detect_applications(tmp_path / "a").masks == tmp_path / "a" / "masks"
    assert detect_applications(tmp_path / "b" / "images").masks == tmp_path / "b" / "masks"
    assert detect_applications(tmp_path / "c").metadata == tmp_path / "c" / "metadata.csv"
    assert detect_applications(tmp_path / "d") == detect_applications(None) == Found(None, None)


@pytest.mark.slow
def test_analyze_adds_a_debias_section_for_a_waterbirds_folder(one_thread, tmp_path):
    from vitdecomp.world.export import export_waterbirds

    wb = export_waterbirds(tmp_path / "wb", n_train=40, n_val=12, n_test=20, corr=1.0, progress=False)
    result = _analyze(wb, tmp_path / "out", tmp_path / "cache", align_steps=10)
    assert [a.name for a in result.applications] == ["segment", "debias"], "the export has masks too"
    assert (tmp_path / "out" / "debias" / "debias.json").is_file()
    assert result.applications[0].title in (tmp_path / "out" / "index.html").read_text()
    refused = _analyze(wb, tmp_path / "out2", tmp_path / "cache", random_init=True)
    assert [a.name for a in refused.applications] == ["segment"] and any(
        "debias not run: --random-init" in w for w in refused.warnings
    )


@pytest.mark.parametrize("command", ["debias", "ablate"])
def test_debias_and_ablate_report_through_the_same_attach(command, folder, tmp_path, monkeypatch):
    """The commands' wiring, with their (tested elsewhere, slow) runs replaced by a result stub."""
    from types import SimpleNamespace as NS

    from vitdecomp.apps.debias import Debias
    from vitdecomp.apps.layer_ablation import LayerAblation

    section = _section(command, f"{command} title")
    acc = NS(test=NS(worst=0.5, average=0.7))
    stub = NS(model="zoo:deit", k=1, before=acc, after=acc, reading=lambda name: acc, section=lambda: section)
    stub.benchmark = ""  # not the official Waterbirds folder: no published figures to print
    stub.layers = [NS(probe={"shape": 1.0})]
    stub.name = stub.json_name = command  # the rest of the result contract the command writes
    stub.to_dict, stub.figures, stub.files = (lambda: {}), (lambda: []), (lambda: {})
    monkeypatch.setattr(Debias, "run", lambda self, cfg: stub)
    monkeypatch.setattr(LayerAblation, "run", lambda self, cfg: stub)
    argv = [command, "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--report", str(folder)]
    for _ in range(2):
        assert main(argv) == 0
    assert AnalysisResult.load(folder / "results.json").applications == [section]
    assert (folder / "index.html").read_text().count(f'id="app-{command}"') == 1


# ------------------------------------------------------------------ adding an application


def test_an_application_is_two_modules_and_one_row(folder, tmp_path, capsys):
    """A toy application written here, as a user would: its algorithm (an AnalysisApplication with a
    typed config and result), its command (parser + run) and one row of COMMANDS. Nothing else is
    edited, and it shows in the CLI, in its own files, in results.json and in the report."""
    from collections import Counter
    from dataclasses import dataclass

    from vitdecomp.apps.contract import AnalysisApplication
    from vitdecomp.commands import COMMANDS, Command
    from vitdecomp.commands._apps import run_application
    from vitdecomp.commands.options import add_shared
    from vitdecomp.results import ResultBase

    # -- the algorithm module: config, result, application
    @dataclass
    class KindsConfig:
        analysis: str
        out: str
        checkpoint: str | None = None
        device: str | None = None

    @dataclass
    class KindsResult(ResultBase):
        name: ClassVar[str] = "kinds"
        model: str
        counts: dict[str, int]

        def section(self) -> AppSection:
            rows = [[k, str(v)] for k, v in self.counts.items()]
            return AppSection("kinds", f"Components by kind ({self.model})", "How many of each.", ["kind", "n"], rows)

    class Kinds(AnalysisApplication[KindsConfig, KindsResult]):
        name = "kinds"

        def measure(self, cfg: KindsConfig, analysis) -> KindsResult:
            counts = Counter("head" if ".H" in lab else lab.split(".")[-1] for lab in analysis.result.labels)
            return KindsResult(analysis.result.model.name, dict(counts))

    # -- the command module
    def configure(p):
        add_shared(p, "checkpoint", "device", "report", "out", "quiet", report=str(folder), out=str(tmp_path / "k"))
        p.set_defaults(func=run)

    def run(args) -> int:
        cfg = KindsConfig(analysis=args.report, out=args.out, checkpoint=args.checkpoint, device=args.device)
        return run_application(Kinds(), cfg, args, lambda result, paths: f"{result.counts} in {paths[0]}")

    # -- one row
    COMMANDS.append(Command("kinds", "count the analysed components by kind", configure))
    try:
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "count the analysed components by kind" in capsys.readouterr().out
        assert main(["kinds", "--report", str(folder)]) == 0
    finally:
        COMMANDS.pop()
    saved = json.loads((tmp_path / "k" / "kinds.json").read_text())
    assert sum(saved["counts"].values()) == len(AnalysisResult.load(folder / "results.json").labels)
    sections = AnalysisResult.load(folder / "results.json").applications
    assert [s.name for s in sections] == ["kinds"] and sections[0].rows
    assert 'id="app-kinds"' in (folder / "index.html").read_text()
