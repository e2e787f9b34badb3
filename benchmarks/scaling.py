"""Scaling measurements of issue 13 (docs/benchmarks.md, "Dataset scale").

    python benchmarks/scaling.py faiss --rows 10000 100000 1000000      # index latency + recall@20
    python benchmarks/scaling.py analyze --n-images 1000 10000 100000  # analyze end to end: time, RSS, store
    python benchmarks/scaling.py throughput --n-images 256              # in-process vs Ray 1 / 2 workers
    python benchmarks/scaling.py store-bytes --n-images 1000            # store bytes on disk vs rows

Every timing here was taken on a 2-core machine shared with other jobs: "measured under load".
Recall does not depend on load. One thread per process (``OMP_NUM_THREADS=1``, torch and FAISS).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch


def clustered(n: int, d: int, centres: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows around ``centres`` Gaussian centres (noise 0.5) and 100 queries drawn the same way."""
    g = np.random.default_rng(seed)
    c = g.standard_normal((centres, d), dtype=np.float32)
    x = c[g.integers(0, centres, n)] + 0.5 * g.standard_normal((n, d), dtype=np.float32)
    q = c[g.integers(0, centres, 100)] + 0.5 * g.standard_normal((100, d), dtype=np.float32)
    return x, q


def bench_faiss(rows: list[int], dim: int) -> None:
    import faiss

    from vitdecomp.index import build_index, plan_index, recall_at_k
    from vitdecomp.store import ArrayRows

    faiss.omp_set_num_threads(1)
    print("| rows | dim | index | build s | ms / query (batch of 100) | ms (one query) | recall@20 vs exact |")
    print("|---|---|---|---|---|---|---|")
    for n in rows:
        x, q = clustered(n, dim, 1000, seed=n)
        data = ArrayRows(torch.from_numpy(x)[:, None], labels=["all"])
        found = {}
        for kind in ("flat", "ivfpq"):
            t0 = time.perf_counter()
            idx = build_index(data, None, plan=plan_index(n, dim, exact_max_rows=n if kind == "flat" else 0))
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            found[kind] = idx.search(q, 20)[1]
            batch_ms = (time.perf_counter() - t0) / len(q) * 1e3
            t0 = time.perf_counter()
            for i in range(10):
                idx.search(q[i : i + 1], 20)
            one_ms = (time.perf_counter() - t0) / 10 * 1e3
            recall = 1.0 if kind == "flat" else recall_at_k(found["ivfpq"], found["flat"], 20)
            cells = [f"{n:.0e}", dim, idx.plan.factory(), f"{build:.1f}", f"{batch_ms:.2f}", f"{one_ms:.2f}"]
            print("| " + " | ".join(str(c) for c in cells) + f" | {recall:.3f} |")
            sys.stdout.flush()
        del data, x


def bench_analyze(sizes: list[int], keep: bool) -> None:
    """``vitdecomp analyze --n-images N`` in a child process per N (each its own cache): wall time,
    the child's CPU seconds (user + system, ``wait4``: what a shared machine's load does not inflate
    as much as the wall), its own peak RSS (``wait4``), the store on disk and the load average beside
    each row."""
    print("| images | wall s | CPU s (user+sys) | peak RSS MiB | store MiB | store bytes / image | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for n_images in sizes:
        work = Path(tempfile.mkdtemp(prefix="vitdecomp-scale-"))
        argv = [sys.executable, "-m", "vitdecomp", "analyze", "--n-images", str(n_images), "--quiet"]
        argv += ["--out", str(work / "out"), "--cache-dir", str(work / "cache"), "--threads", "1"]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        err = proc.stderr.read() if proc.stderr else b""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            raise SystemExit(err.decode(errors="replace")[-2000:])
        rss, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
        store = sum(p.stat().st_size for p in (work / "cache" / "stores").rglob("*") if p.is_file())
        load = f"{load:.1f} -> {os.getloadavg()[0]:.1f}"
        cells = f"{n_images} | {wall:.0f} | {cpu:.0f} | {rss:.0f} | {store / 2**20:.1f} | {store / n_images:.0f}"
        print(f"| {cells} | {load} |")
        sys.stdout.flush()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def bench_throughput(n_images: int, chunk_rows: int) -> None:
    import ray

    from vitdecomp.imageset import world_source
    from vitdecomp.pipeline.fill import FillOptions, build_store
    from vitdecomp.pipeline.model_pair import load_models
    from vitdecomp.pipeline.ray_fill import RayRunner

    torch.set_num_threads(1)
    models = load_models("zoo:deit", "zoo:clip")
    source = world_source(n_images, seed=11)
    work = Path(tempfile.mkdtemp(prefix="vitdecomp-ray-"))
    print("| runner | images | wall s | images / s |")
    print("|---|---|---|---|")
    kw = dict(chunk_rows=chunk_rows)
    options = FillOptions(batch_size=32, progress=False)
    t0 = time.perf_counter()
    build_store(models, source, work / "local", options, **kw)
    wall = time.perf_counter() - t0
    print(f"| in-process | {n_images} | {wall:.1f} | {n_images / wall:.1f} |")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    for workers in (1, 2):
        t0 = time.perf_counter()
        build_store(models, source, work / f"ray{workers}", options, fill=RayRunner(workers=workers), **kw)
        wall = time.perf_counter() - t0
        print(f"| ray, {workers} worker(s) | {n_images} | {wall:.1f} | {n_images / wall:.1f} |")
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


def bench_store_bytes(n_images: int) -> None:
    """Bytes on disk of the store of ``n_images`` world scenes against the exact bytes of its rows."""
    from vitdecomp.imageset import world_source
    from vitdecomp.pipeline.fill import FillOptions, build_store
    from vitdecomp.pipeline.model_pair import load_models

    torch.set_num_threads(1)
    models = load_models("zoo:deit", "zoo:clip")
    print("| dtype | images | chunk rows | bytes on disk | bytes of rows | overhead |")
    print("|---|---|---|---|---|---|")
    for dtype, size in (("float32", 4), ("float16", 2)):
        work = Path(tempfile.mkdtemp(prefix="vitdecomp-bytes-"))
        store = build_store(models, world_source(n_images), work, FillOptions(progress=False), dtype=dtype).store
        disk = sum(p.stat().st_size for p in Path(store.path).rglob("*") if p.is_file())
        (c, d), (k,) = store.shapes["contributions"], store.shapes["clip"]
        rows = n_images * (c * d * size + d * 4 + k * 4)
        print(f"| {dtype} | {n_images} | {store.chunk_rows} | {disk:,} | {rows:,} | {disk / rows - 1:+.1%} |")
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("faiss")
    f.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    f.add_argument("--dim", type=int, default=128)
    a = sub.add_parser("analyze")
    a.add_argument("--n-images", type=int, nargs="+", default=[1000])
    a.add_argument("--keep", action="store_true")
    t = sub.add_parser("throughput")
    t.add_argument("--n-images", type=int, default=256)
    t.add_argument("--chunk-rows", type=int, default=32)
    b = sub.add_parser("store-bytes")
    b.add_argument("--n-images", type=int, default=1000)
    args = p.parse_args()
    if args.what == "faiss":
        bench_faiss(args.rows, args.dim)
    elif args.what == "store-bytes":
        bench_store_bytes(args.n_images)
    elif args.what == "analyze":
        bench_analyze(args.n_images, args.keep)
    else:
        bench_throughput(args.n_images, args.chunk_rows)


if __name__ == "__main__":
    main()
