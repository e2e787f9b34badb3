"""The Ray runner on a local cluster started by the test (2 CPUs, loopback): it fills the same store
as the in-process runner, a worker killed mid-run costs nothing (no row lost or written twice), a
finished store is not recomputed, and without Ray ``--runner ray`` says what to install."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from vitdecomp.errors import UsageError
from vitdecomp.imageset import world_source
from vitdecomp.pipeline.fill import FillOptions, build_store
from vitdecomp.pipeline.model_pair import load_models
from vitdecomp.pipeline.ray_fill import KILL_ONCE_ENV, RayRunner, require_ray

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster whose workers kill themselves once, after writing chunk 1's rows."""
    marker = tmp_path_factory.mktemp("kill") / "killed"
    os.environ[KILL_ONCE_ENV] = f"ray-chunk-written:1={marker}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield marker
    ray.shutdown()
    os.environ.pop(KILL_ONCE_ENV, None)


def test_ray_fills_the_same_store_even_when_a_worker_is_killed(cluster, tmp_path):
    torch.set_num_threads(1)
    models = load_models("zoo:deit", "zoo:clip", random_init=True, seed=0)
    source = world_source(10, seed=5)
    options, kw = FillOptions(batch_size=4, progress=False), dict(chunk_rows=4)
    local = build_store(models, source, tmp_path / "local", options, **kw).store
    built = build_store(models, source, tmp_path / "ray", options, fill=RayRunner(workers=2, cpus_per_worker=1), **kw)
    assert cluster.exists()  # an actor really died after writing chunk 1 (its chunk was redone)
    store = built.store
    assert store.ids == source.ids and len(set(store.ids)) == 10 and built.rows_computed == 10
    assert store.manifest["chunks"] == {"0": 4, "1": 4, "2": 2}
    a, b = local.batch(slice(None)), store.batch(slice(None))
    for name in ("contributions", "representation", "clip"):
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
    again = build_store(models, source, tmp_path / "ray", options, fill=RayRunner(workers=2), **kw)
    assert again.rows_computed == 0 and again.store.ids == source.ids


def test_without_ray_the_runner_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r"pip install 'vitdecomp\[scale\]'") as err:
        require_ray()
    assert "\n" not in str(err.value)


def test_analyze_runner_ray_without_ray_is_one_line(monkeypatch, tmp_path, capsys):
    from vitdecomp.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    argv = ["analyze", "--runner", "ray", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'vitdecomp[scale]'" in err[0]


def test_decompose_with_ray_equals_in_process(cluster, tmp_path, capsys):
    """``vitdecomp decompose --runner ray`` gathers the actors' chunks in row order: the same file."""
    from safetensors.numpy import load_file

    from vitdecomp.cli import main

    base = ["decompose", "zoo:deit", "--random-init", "--n-images", "5", "--batch-size", "2", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "here")]) == 0
    assert main([*base, "--out", str(tmp_path / "ray"), "--runner", "ray", "--workers", "1"]) == 0
    here, there = (load_file(str(tmp_path / d / "decomposition.safetensors")) for d in ("here", "ray"))
    assert here["contributions"].shape == there["contributions"].shape == (5, 32, 96)
    for name in ("contributions", "representation"):
        np.testing.assert_allclose(there[name], here[name], rtol=1e-5, atol=1e-5)
    assert main([*base, "--runner", "ray", "--tokens"]) == 2  # token splits stay in-process
    assert "--tokens with --runner ray" in capsys.readouterr().err
