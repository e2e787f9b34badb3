"""Plug-in adapters: a tiny package (tests/plugin/toyvit_plugin, installed into a temporary folder with
a ``*.dist-info`` holding its ``entry_points.txt``) registers an adapter for its own ViT class through
the ``vitdecomp.adapters`` entry point, and vitdecomp decomposes that model exactly, unchanged."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import vitdecomp as vd
from vitdecomp import testing
from vitdecomp.errors import UnsupportedModuleError, UsageError, VitDecompError
from vitdecomp.models import registry
from vitdecomp.testing import check_adapter, unchecked_adapters

PLUGIN = Path(__file__).parent / "plugin" / "toyvit_plugin"
ENTRY = "toyvit_plugin.model.ToyViT"


def _install(root: Path, entry_value: str = "toyvit_plugin.adapter:ToyAdapter") -> None:
    """The package and its distribution metadata, as pip would leave them in site-packages."""
    shutil.copytree(PLUGIN, root / "toyvit_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    info = root / "toyvit_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyvit-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vitdecomp.adapters]\n{ENTRY} = {entry_value}\n")


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A fresh plug-in table and a site folder on sys.path; the package's modules are forgotten after."""
    monkeypatch.setattr(registry, "_PLUGINS", {})
    monkeypatch.setattr(testing, "_CHECKED", set())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "toyvit_plugin" or m.startswith("toyvit_plugin.")]:
        del sys.modules[name]


def _toy(seed: int = 0):
    from toyvit_plugin.model import ToyViT

    torch.manual_seed(seed)
    model = ToyViT().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape))
    return model


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_an_entry_point_adapter_decomposes_its_package_model_exactly(plugin_site):
    _install(plugin_site)
    model = _toy()
    assert "toyvit_plugin.adapter" not in sys.modules  # the entry point is read only when needed
    x = images()
    d = vd.decompose(model, x)
    assert "toyvit_plugin.adapter" in sys.modules and d.meta["family"] == "toy-vit"
    with torch.no_grad():
        torch.testing.assert_close(d.representation, model(x), rtol=0, atol=0)
    assert d.error.max().item() <= 1e-5
    assert sum(lab.kind == "attn_head" for lab in d.labels) == 2 * 4
    report = check_adapter(model, x)  # the standard every shipped adapter is held to
    assert report.family == "toy-vit" and report.heads == 8
    assert report.error["default float64"] <= 1e-12 and report.token_error <= 1e-12
    assert not unchecked_adapters()


def test_check_adapter_fails_a_wrong_adapter(plugin_site):
    _install(plugin_site)
    from toyvit_plugin.adapter import ToyAdapter
    from toyvit_plugin.model import ToyViT

    class Halved(ToyAdapter):  # a rule that forgets half of the last block's attention
        def plan(self, model, **kw):
            plan = ToyAdapter.plan(self, model, **kw)
            heads = plan.stages[0].blocks[-1].branches[0]
            heads.proj_weight = heads.proj_weight / 2
            return plan

    vd.register_adapter(ToyViT, Halved)
    assert ENTRY in unchecked_adapters()
    with pytest.raises(AssertionError, match="relative error"):
        check_adapter(_toy(), images())


def test_a_run_time_registration_and_its_refusals(plugin_site):
    _install(plugin_site)
    from toyvit_plugin.adapter import ToyAdapter
    from toyvit_plugin.model import ToyViT

    class MyViT(ToyViT):  # a subclass has no adapter until one is registered for it
        pass

    with pytest.raises(UnsupportedModuleError, match=r"MyViT.*adding-a-family"):
        vd.decompose(MyViT().eval(), images())
    vd.register_adapter(MyViT, ToyAdapter())
    assert vd.decompose(MyViT().eval(), images()).error.max() <= 1e-5
    assert MyViT in registry.registered_types()
    with pytest.raises(UsageError, match="not an adapter"):
        vd.register_adapter(MyViT, object())
    with pytest.raises(UsageError, match=r"not an nn\.Module class"):
        vd.register_adapter(int, ToyAdapter)


def test_a_broken_entry_point_is_named_in_one_line(plugin_site):
    _install(plugin_site, entry_value="toyvit_plugin.missing:Nothing")
    with pytest.raises(VitDecompError) as err:
        vd.decompose(_toy(), images())
    message = str(err.value)
    assert "\n" not in message and "toyvit-plugin" in message and "toyvit_plugin.missing:Nothing" in message


def test_the_worked_example_of_the_docs_is_exact(monkeypatch):
    """docs/adding-a-family.md's adapter for transformers' ViTModel, run as written, registered at run
    time: it passes check_adapter and gives the shipped adapter's parts."""
    import re

    import transformers

    from small_models import SMALL_MODELS

    text = (Path(__file__).parents[1] / "docs" / "adding-a-family.md").read_text()
    section = text.split("## 2. Declare it", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/adding-a-family.md", "exec"), namespace)
    model, size = SMALL_MODELS["hf-vit"]()
    x = images(seed=1)[:, :, :size, :size]
    shipped = vd.decompose(model.double(), x.double())
    monkeypatch.setattr(registry, "_PLUGINS", {})
    vd.register_adapter(transformers.ViTModel, namespace["MyViTModelAdapter"])
    report = check_adapter(model.float(), x)
    assert report.family == "my-hf-vit" and report.heads == 3 * 3
    mine = vd.decompose(model.double(), x.double())
    assert mine.names == shipped.names
    torch.testing.assert_close(mine.contributions, shipped.contributions, rtol=0, atol=1e-12)
