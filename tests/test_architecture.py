"""The floors of docs/architecture.md hold: every module of the package sits on a floor, and imports
only from the floors it may read (parsed with ``ast``: top-level, function-local and TYPE_CHECKING
imports alike, and the ``"module:function"`` / ``"vitdecomp.x"`` strings that lazy tables import).
argparse lives in the command layer only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vitdecomp

SRC = Path(vitdecomp.__file__).parent
TOOL = "tooling"

#: Module (or package) -> its floor; the longest matching prefix wins.
FLOORS: dict[str, int | str] = {
    # 0: leaves
    "vitdecomp.errors": 0,
    "vitdecomp.fsio": 0,
    "vitdecomp.allocator": 0,
    "vitdecomp.progress": 0,
    "vitdecomp.defaults": 0,
    "vitdecomp.world": 0,
    # 1: the core (the zoo as a model source included); "vitdecomp" is the package's __init__ only
    "vitdecomp": 1,
    "vitdecomp.adapters": 1,
    "vitdecomp.testing": 1,
    "vitdecomp.components": 1,
    "vitdecomp.savefile": 1,
    "vitdecomp.api": 1,
    "vitdecomp.decomp": 1,
    "vitdecomp.models": 1,
    "vitdecomp.zoo": 1,
    "vitdecomp.zoo.models": 1,
    "vitdecomp.zoo.cards": 1,
    "vitdecomp.zoo.hub": 1,
    "vitdecomp.imageset": 1,
    "vitdecomp.store": 1,
    "vitdecomp.align": 1,
    "vitdecomp.aligner_cache": 1,
    "vitdecomp.text": 1,
    "vitdecomp.probes": 1,
    "vitdecomp.scores": 1,
    "vitdecomp.results": 1,
    "vitdecomp.figures": 1,
    "vitdecomp.index": 1,
    "vitdecomp.checks": 1,
    "vitdecomp.sae": 1,
    # 2 - 5
    "vitdecomp.pipeline": 2,
    "vitdecomp.apps": 3,
    "vitdecomp.report": 4,
    "vitdecomp.analyze": 5,
    # 6: the command layer
    "vitdecomp.commands": 6,
    "vitdecomp.cli": 6,
    "vitdecomp.__main__": 6,
    # tooling: only the command layer imports it
    "vitdecomp.evaluation": TOOL,
    "vitdecomp.zoo.train": TOOL,
    "vitdecomp.zoo.objectives": TOOL,
    "vitdecomp.zoo.recipes": TOOL,
    "vitdecomp.zoo.data": TOOL,
    "vitdecomp.zoo.evaluate": TOOL,
    "vitdecomp.zoo.freshness": TOOL,
}
#: What each floor may import (besides its own floor).
MAY_IMPORT: dict[int | str, set[int | str]] = {
    0: {0},
    1: {0, 1},
    2: {0, 1, 2},
    3: {0, 1, 2, 3},
    4: {0, 1, 4},  # the report renders the results schema: not the pipeline, not the applications
    5: {0, 1, 2, 3, 4, 5},
    6: {0, 1, 2, 3, 4, 5, 6, TOOL},
    TOOL: {0, 1, 2, 3, 4, 5, TOOL},
}
MODULE_STRING = re.compile(r"vitdecomp(\.\w+)+(:\w+)?")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int | str | None:
    """The floor of ``module``: the longest key of :data:`FLOORS` that is it or a package above it (the
    bare package name only for its own ``__init__``)."""
    keys = (p for p in FLOORS if module == p or (p != "vitdecomp" and module.startswith(p + ".")))
    best = max(keys, key=len, default=None)
    return None if best is None else FLOORS[best]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every vitdecomp module the file imports, lazily or not."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vitdecomp"):
            for alias in node.names:  # `from vitdecomp.x import y` may import the module x.y
                sub = f"{node.module}.{alias.name}"
                found.append(
                    (node.lineno, sub if (SRC.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
                )
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("vitdecomp")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value):
            found.append((node.lineno, node.value.split(":")[0]))
    return sorted(set(found))


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_sits_on_a_floor():
    unmapped = [module_name(p) for p in modules() if floor_of(module_name(p)) is None]
    assert not unmapped, f"modules on no floor (add them to FLOORS and docs/architecture.md): {unmapped}"


def violations(files: list[tuple[str, Path]]) -> list[str]:
    """Every import of ``files`` (``(module name, path)``) against the floors, one line each."""
    out = []
    for me, path in files:
        mine = floor_of(me)
        for line, target in imports_of(path):
            theirs = floor_of(target)
            if theirs is not None and theirs != mine and theirs not in MAY_IMPORT[mine]:
                out.append(f"{me} (floor {mine}) imports {target} (floor {theirs}) at line {line}")
    return out


def test_no_module_imports_a_floor_above_its_own():
    upward = violations([(module_name(p), p) for p in modules()])
    assert not upward, "imports against the floors:\n" + "\n".join(upward)


def test_argparse_lives_in_the_command_layer_only():
    found = []
    for path in modules():
        me = module_name(path)
        if floor_of(me) == 6:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if "argparse" in names or (isinstance(node, ast.ImportFrom) and node.module == "argparse"):
                found.append(f"{me} line {node.lineno}")
    assert not found, f"argparse outside vitdecomp.commands / vitdecomp.cli: {found}"


def test_a_new_top_level_module_needs_a_floor():
    assert floor_of("vitdecomp") == 1 and floor_of("vitdecomp.scores.tables") == 1
    assert floor_of("vitdecomp.something_new") is None


def test_the_rules_name_an_upward_import(tmp_path):
    """The check can fail: a core module that imported the pipeline, or the report an application, is
    named with the import and its line; a lazy table's string counts as an import."""
    core = tmp_path / "probes.py"
    core.write_text("def f():\n    from vitdecomp.pipeline.config import AnalysisConfig\n")
    report = tmp_path / "html.py"
    report.write_text('TABLE = {"x": "vitdecomp.apps.heatmap"}\n')
    found = violations([("vitdecomp.probes", core), ("vitdecomp.report.html", report)])
    assert found == [
        "vitdecomp.probes (floor 1) imports vitdecomp.pipeline.config (floor 2) at line 2",
        "vitdecomp.report.html (floor 4) imports vitdecomp.apps.heatmap (floor 3) at line 1",
    ]
