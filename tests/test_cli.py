"""The command layer and conventional outputs: ``python -m vitdecomp``, ``--version``, ``--help``
without torch and in plain words, one vocabulary of options, ``decompose --out`` readable with plain
numpy/safetensors, ``Decomposition.save/load/to_pandas/_repr_html_``, the report from templates,
random weights keyed by their seed, and ``zoo train`` writing to a user folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vitdecomp as vd
from vitdecomp.cli import main


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def test_python_dash_m_version_and_help_do_not_import_torch():
    proc = _run("-m", "vitdecomp", "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vitdecomp {vd.__version__}"
    probe = (
        "import sys, contextlib, io\n"
        "from vitdecomp.cli import main\n"
        "for argv in (['--help'], ['analyze', '--help'], ['decompose', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = _run("-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_every_subcommand_is_one_row_and_listed(capsys):
    from vitdecomp.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(c.name in text for c in COMMANDS)
    assert len({c.name for c in COMMANDS}) == len(COMMANDS)


def test_decompose_out_is_readable_with_plain_numpy_and_safetensors(tmp_path, capsys):
    from safetensors.numpy import load_file

    out = tmp_path / "dec"
    argv = ["decompose", "zoo:deit", "--random-init", "--tokens", "--n-images", "3", "--batch-size", "2"]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)  # --quiet: only where the output is
    arrays = load_file(str(out / "decomposition.safetensors"))
    labels = json.loads((out / "labels.json").read_text())
    c = arrays["contributions"]
    assert isinstance(c, np.ndarray) and c.shape[:2] == (3, len(labels["labels"]))  # every image, not a batch
    np.testing.assert_allclose(c.sum(1), arrays["representation"], rtol=1e-4, atol=1e-4)
    assert arrays["tokens.0"].shape[:2] == (3, len(labels["tokens"][0]["labels"]))
    assert labels["ids"] == [f"world-0-{i:06d}" for i in range(3)]
    assert labels["meta"]["weights_id"] == "zoo:deit@random-init:seed=0"
    # and back into vitdecomp
    d = vd.Decomposition.load(out)
    assert d.names == labels["labels"] and d.meta["ids"] == labels["ids"]
    tok = d.tokens[0]
    heads = d.index([lab.name for lab in tok.labels])
    torch.testing.assert_close(tok.values.sum(2), d.contributions[:, heads], rtol=1e-4, atol=1e-5)


def test_the_readme_numpy_snippet_runs_on_the_readme_command(tmp_path, monkeypatch, capsys):
    """The README's ``decompose --out`` command on a folder of photos, then its plain-numpy snippet,
    as written (the component it indexes exists in zoo:deit; the parts add up)."""
    import re
    import shlex
    from pathlib import Path

    from PIL import Image

    from vitdecomp.world import make_scenes

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command = re.search(r"```bash\n(vitdecomp decompose --model zoo:deit --images photos/[^\n]*)\n```", readme)
    snippet = re.search(r"```python\n(import json\nfrom safetensors\.numpy import load_file\n.*?)```", readme, re.S)
    assert command and snippet, "the README's decompose --out example moved: update this test"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for i, im in enumerate(make_scenes(3, seed=4).images):
        Image.fromarray(im).save(tmp_path / "photos" / f"p{i}.png")
    assert main([*shlex.split(command.group(1))[1:], "--device", "cpu", "--quiet"]) == 0
    exec(compile(snippet.group(1), "README.md", "exec"), {})


def test_decomposition_save_load_pandas_and_notebook_html(tmp_path):
    loaded = vd.load_model("zoo:deit", random_init=True)
    d = vd.decompose(loaded, torch.randn(2, 3, *loaded.image_size))
    d.save(tmp_path / "d", ids=["a", "b"], meta={"note": "x"})
    back = vd.Decomposition.load(tmp_path / "d")
    torch.testing.assert_close(back.contributions, d.contributions, rtol=0, atol=0)
    assert back.labels == d.labels and back.meta["ids"] == ["a", "b"] and back.meta["note"] == "x"
    df = d.to_pandas()
    assert list(df.index) == d.names and {"kind", "layer", "head", "mean_norm", "share"} <= set(df.columns)
    assert abs(df["share"].sum() - 1) < 1e-6
    page = d._repr_html_()
    assert page.startswith("<div>") and "<table>" in page and "L0.H0" in d.names


# ------------------------------------------------------------------------------------------------
# the report from templates


def _result():
    from vitdecomp.results import (
        AlignerInfo,
        Alignment,
        AnalysisResult,
        CacheInfo,
        Completeness,
        ImagesInfo,
        ModelInfo,
        Pick,
        ReaderInfo,
        StoreInfo,
        VocabularyInfo,
    )

    labels = ["init", "L0.H0", "L0.mlp"]
    scores = {m: {"color": {lab: 0.1 * i for i, lab in enumerate(labels)}} for m in ("paper", "invariant")}
    return AnalysisResult(
        model=ModelInfo("<b>m</b>", "m@x", False),
        reader=ReaderInfo("clip", "clip@y"),
        images=ImagesInfo("3 images", "k", 3),
        start_layer=0,
        labels=labels,
        features={"color": ["red"]},
        vocabulary=VocabularyInfo("v", 2, ["{}"]),
        scores=scores,
        rankings={m: {"color": labels[::-1]} for m in scores},
        descriptions={"init": [], "L0.H0": [Pick("a <red> thing", 0.5, 1.0)], "L0.mlp": []},
        mean_aligned_norm=dict.fromkeys(labels, 1.0),
        top_images={lab: [] for lab in labels},
        completeness=Completeness(1e-7, 1e-7, 1e-7),
        alignment=Alignment("compalign", 1.0, "trained", 0.42, {"val_cosine": 0.9}),
        store=StoreInfo("s", {}, "d"),
        aligner=AlignerInfo(None, None),
        cache=CacheInfo("c", 3, 0, "trained", 1),
        warnings=["only 3 images"],
        constant={"init": 1e-8},
    )


def test_report_is_rendered_from_templates_with_every_section(tmp_path):
    from vitdecomp.report import render_html
    from vitdecomp.report.html import SECTIONS, environment
    from vitdecomp.results import AnalysisResult

    r = _result()
    page = render_html(r, {"L0.H0": ["data:image/png;base64,AA"]})
    for name in SECTIONS:
        assert environment().get_template(f"sections/{name}.html.j2")  # one partial per section
    assert "&lt;b&gt;m&lt;/b&gt;" in page and "<b>m</b>" not in page  # autoescaped
    assert "a &lt;red&gt; thing" in page
    assert "only 3 images" in page  # warnings shown
    assert "rank 1" in page  # constant components marked
    assert "0.420" in page and "cosine to CLIP on the analysed images" in page
    assert "0.900" in page and "held-out cosine (on its training set)" in page  # labelled as such
    r.write(tmp_path / "results.json")
    assert render_html(AnalysisResult.load(tmp_path / "results.json")) == render_html(r)


# ------------------------------------------------------------------------------------------------
# caches keyed by what changes them; the zoo's default folder


def test_random_init_is_seeded_and_keyed_by_seed():
    from vitdecomp.pipeline.model_pair import load_model_for

    a, b, c = (load_model_for("zoo:deit", random_init=True, seed=s) for s in (1, 1, 2))
    assert a.weights_id == b.weights_id != c.weights_id
    pa, pb, pc = (next(m.model.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_zoo_train_writes_to_a_user_folder_by_default(monkeypatch, tmp_path):
    from vitdecomp.commands import zoo as zoo_cli

    monkeypatch.setenv("VITDECOMP_ZOO_DIR", str(tmp_path / "zoo"))
    assert zoo_cli.user_zoo_dir() == tmp_path / "zoo"
    seen = {}

    def fake_train(name, **kw):
        seen[name] = kw
        return {"training": {"train_time_s": 0.0}}

    monkeypatch.setattr(zoo_cli, "train_and_save", fake_train)
    assert main(["zoo", "train", "simclr", "--quiet", "--no-eval"]) == 0
    assert seen["simclr"]["weights_dir"] == tmp_path / "zoo" / "weights"
    assert main(["zoo", "train", "simclr", "--quiet", "--no-eval", "--replace-shipped"]) == 0
    assert seen["simclr"]["weights_dir"] is None  # the package's own folder


def test_low_precision_tolerance_scales_with_dtype():
    from vitdecomp.decomp.engine import COMPLETENESS_TOLERANCE

    loaded = vd.load_model("zoo:deit", random_init=True)
    x = torch.randn(2, 3, *loaded.image_size)
    for dtype in (torch.float16, torch.bfloat16):
        d = vd.decompose(loaded.model.to(dtype), x.to(dtype))  # no false "rules do not cover" alarm
        assert d.error.max() <= COMPLETENESS_TOLERANCE[dtype]
    loaded.model.float()


# ------------------------------------------------------------------------------------------------
# the command layer: help in plain words, fast; one vocabulary of options


def _subcommand_parsers():
    import argparse

    from vitdecomp.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        out |= {f"{name} {n}": q for a in nested for n, q in a.choices.items()} if nested else {name: p}
    return out


def test_every_help_is_plain_text_with_every_option_explained():
    import re

    markup = re.compile(r"``|:(func|class|mod|data|meth|attr):")
    for name, p in _subcommand_parsers().items():
        text = p.format_help()
        assert not markup.search(text), f"{name} --help shows markup: {markup.search(text).group()}"
        description = " ".join((p.description or "").split())
        assert not description or description.endswith((".", ")")), f"{name}: description cut: {description[-40:]!r}"
        for a in p._actions:
            if a.option_strings and a.help != "==SUPPRESS==":
                assert a.help and a.help.strip(), f"{name}: {a.option_strings} has no help"


def test_no_help_imports_torch():
    """``--help`` of every subcommand in well under a second (``benchmarks/help_times.py`` prints the
    times): it imports none of the heavy libraries, not even numpy (0.1-0.5 s each on a busy machine)."""
    names = [n.split(" ") for n in _subcommand_parsers()]
    probe = (
        "import sys, contextlib, io\n"
        "from vitdecomp.cli import main\n"
        f"for argv in {[[*n, '--help'] for n in names]!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "heavy = ('torch', 'timm', 'open_clip', 'matplotlib', 'numpy', 'tqdm', 'PIL', 'transformers', 'zarr')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = _run("-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_one_option_has_one_flag_and_one_help_everywhere():
    """Every option more than one command takes is the shared record's: same flag, same help (a
    command's own default is stated in it); the old spellings are accepted and not shown."""
    from dataclasses import fields

    from vitdecomp.cli import build_parser
    from vitdecomp.commands.options import SharedOptions, flag_of

    shared = {f.name: f.metadata["help"] for f in fields(SharedOptions)}
    seen: dict[str, set[str]] = {}
    for name, p in _subcommand_parsers().items():
        for a in p._actions:
            if a.dest in shared and a.help != "==SUPPRESS==" and a.option_strings:
                assert a.option_strings == [flag_of(a.dest)], (name, a.option_strings)
                assert a.help.split(" (default: ")[0] == shared[a.dest].split(" (default: ")[0], (name, a.dest)
                seen.setdefault(a.dest, set()).add(name)
    assert {"model", "reader", "checkpoint", "device", "threads", "report", "out", "quiet"} <= set(seen)
    assert seen["report"] >= {"heatmap", "retrieve", "segment", "debias", "ablate"}
    assert seen["quiet"] >= {"heatmap", "retrieve", "segment"} and seen["device"] >= {"heatmap", "retrieve", "segment"}
    assert seen["reader_checkpoint"] >= {"analyze", "debias", "ablate"}
    old = {
        "heatmap": ["heatmap", "--text", "x", "--analysis", "A"],
        "segment": ["segment", "--n", "3", "--batch", "2", "--report", "A"],
        "world": ["world", "export", "--n", "3", "--out", "W"],
        "decompose": ["decompose", "zoo:simclr"],
    }
    args = {k: build_parser(v).parse_args(v) for k, v in old.items()}
    assert args["heatmap"].report == "A" and args["segment"].n_images == 3 and args["segment"].batch_size == 2
    assert args["world"].n_images == 3 and args["decompose"].model_pos == "zoo:simclr"


#: Shared options a command may give its own default (the meaning needs it), shown in its help line.
OWN_DEFAULTS = {"out", "seed", "batch_size", "n_images", "device", "report"}


def test_a_command_s_own_default_is_one_of_few_and_its_help_says_it():
    """One default per option: where a command keeps its own (which folder --out is, the seed it draws
    from, ...), the option is one of :data:`OWN_DEFAULTS` and its help line states the value."""
    from dataclasses import fields

    from vitdecomp.commands.options import SharedOptions

    shared = {f.name: f.default for f in fields(SharedOptions)}
    for name, p in _subcommand_parsers().items():
        for a in p._actions:
            if a.dest in shared and a.option_strings and a.help != "==SUPPRESS==" and a.default != shared[a.dest]:
                assert a.dest in OWN_DEFAULTS, (name, a.dest, a.default)
                assert f"(default: {a.default})" in " ".join(a.help.split()), (name, a.dest, a.help)
            if a.dest == "device":
                assert "(default: " in a.help and a.help.count("(default") == 1, (name, a.help)


def test_ablate_labels_help_says_paths_are_relative_to_images():
    p = _subcommand_parsers()["ablate"]
    (labels,) = [a for a in p._actions if a.dest == "labels"]
    assert "relative to --images" in labels.help and "relative to --images" in " ".join(p.description.split())


def test_validate_writes_into_its_own_folder_not_the_checkout_s_docs(tmp_path, monkeypatch, capsys):
    """Run from a checkout, ``vitdecomp validate`` leaves ``docs/validation.md`` alone unless
    ``--out docs`` asks for it (the measurements are replaced by a stub: this is about the file)."""
    from vitdecomp.evaluation import score_document, score_validation

    def measured(run):
        return {"model": run.name, "agreement": {"text_probe": {"causal_mean": dict.fromkeys("abcd", 0.5)}}}

    monkeypatch.setattr(score_validation, "validate_model", measured)
    monkeypatch.setattr(score_document, "markdown", lambda runs, *a: f"# validation of {len(runs)} model(s)\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "validation.md"
    page.write_text("# the project's page\n\n## Notes\nkept\n")
    assert main(["validate", "--models", "zoo:deit", "--quiet"]) == 0
    assert page.read_text() == "# the project's page\n\n## Notes\nkept\n"
    assert (tmp_path / "vitdecomp-validation" / "validation.md").read_text() == "# validation of 1 model(s)\n"
    assert main(["validate", "--models", "zoo:deit", "--quiet", "--out", "docs"]) == 0
    assert page.read_text() == "# validation of 1 model(s)\n\n## Notes\nkept\n"  # asked: updated, Notes kept


def test_decompose_out_written_batch_by_batch_is_the_file_written_at_once(tmp_path):
    """RowsFile (what ``decompose --out`` writes, one batch in memory) gives the same arrays and
    labels.json as saving the whole set at once; an error before the last row leaves neither file
    nor a temporary one behind, and a file short of rows is never moved into place."""
    from safetensors.numpy import load_file

    from vitdecomp.components import ComponentLabel, SetSummary
    from vitdecomp.savefile import RowsFile

    g = torch.Generator().manual_seed(0)
    labels = [ComponentLabel("init"), ComponentLabel("head", 0, 1), ComponentLabel("mlp", 0)]
    whole = vd.Decomposition(torch.randn(5, 3, 4, generator=g), labels, torch.randn(5, 4, generator=g))
    whole.tokens = [
        vd.TokenContributions(
            torch.randn(5, 1, 6, 4, generator=g), [labels[1]], torch.arange(24).reshape(6, 4), (2, 3), 0
        )
    ]
    ids = [f"im{i}" for i in range(5)]
    whole.save(tmp_path / "once", ids=ids, meta={"model": "m"})
    summary = SetSummary()
    with RowsFile(tmp_path / "rows", 5) as out:
        for rows in (slice(0, 2), slice(2, 4), slice(4, 5)):
            part = vd.Decomposition(whole.contributions[rows], labels, whole.representation[rows])
            tok = whole.tokens[0]
            part.tokens = [vd.TokenContributions(tok.values[rows], tok.labels, tok.pixel_boxes, tok.grid_size, 0)]
            out.write(part.file_arrays(), part.file_description(ids, {"model": "m"}))
            summary.add(part)
    once, rows = (load_file(str(tmp_path / d / "decomposition.safetensors")) for d in ("once", "rows"))
    assert set(once) == set(rows) and all(np.array_equal(once[k], rows[k]) for k in once)
    assert (tmp_path / "once" / "labels.json").read_text() == (tmp_path / "rows" / "labels.json").read_text()
    assert summary.text() == whole.summary() and torch.allclose(
        summary.mean_norms(), whole.contributions.norm(dim=-1).mean(0).double()
    )
    with pytest.raises(RuntimeError), RowsFile(tmp_path / "broken", 5) as out:
        out.write(part.file_arrays(), part.file_description(ids))
        raise RuntimeError("interrupted")
    assert list((tmp_path / "broken").iterdir()) == []
    with pytest.raises(ValueError, match="1 of 5 rows"), RowsFile(tmp_path / "short", 5) as out:
        out.write(part.file_arrays(), part.file_description(ids))
    assert not (tmp_path / "short" / "decomposition.safetensors").exists()
