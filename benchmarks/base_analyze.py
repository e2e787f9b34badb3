"""``vitdecomp analyze`` on a base-size timm ViT, as a new user runs it (issue 22 point 3).

    python benchmarks/base_analyze.py --n-images 64 1000

Writes a checkpoint of ``vit_base_patch16_224`` with random weights (safetensors, seed 0) and a world
export of the largest ``--n-images`` scenes (images/ + masks/, so the automatic segment step runs),
then runs ``vitdecomp analyze --model vit_base_patch16_224 --checkpoint CKPT --images DIR/images
--n-images N`` in a child process per N and prints one table row per N: wall time, the stage timings
(results.json), the share of decomposition + alignment, the longest console silence (seconds without
a byte on stdout or stderr: a stage with no progress bar or message), the report's size (index.html +
results.json) and the child's peak RSS. The load average before and after is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "vit_base_patch16_224"


def write_checkpoint(path: Path) -> Path:
    """Random weights of the real timm class, saved as safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_quietly_timed(argv: list[str], env: dict[str, str]) -> tuple[int, float, float, str, str]:
    """Run ``argv``; ``(return code, wall s, longest silence s, last output, where)``: the silence is
    the longest time without a byte on stdout or stderr (tqdm redraws a bar at least every second
    while it moves); ``where``: the last line written before it."""
    t0 = last = time.perf_counter()
    silence, tail, where = 0.0, b"", ""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    sel = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        sel.register(stream, selectors.EVENT_READ)
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            chunk = os.read(key.fileobj.fileno(), 65536)
            now = time.perf_counter()
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            if now - last > silence:
                lines = [w for w in tail.decode(errors="replace").replace("\r", "\n").split("\n") if w.strip()]
                silence, where = now - last, (lines[-1].strip() if lines else "(start)")[:120]
            last = now
            tail = (tail + chunk)[-4000:]
    rc = proc.wait()
    return rc, time.perf_counter() - t0, silence, tail.decode(errors="replace"), where


def bench(n: int, work: Path, ckpt: Path, images: Path) -> dict:
    out = work / f"out-{n}"
    argv = [sys.executable, "-m", "vitdecomp", "analyze", "--model", MODEL, "--checkpoint", str(ckpt)]
    argv += ["--images", str(images), "--n-images", str(n), "--out", str(out), "--cache-dir", str(work / "cache")]
    rc, wall, silence, tail, where = run_quietly_timed(argv, dict(os.environ))
    if rc != 0:
        raise SystemExit(f"analyze failed ({rc}):\n{tail}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    timings = json.loads((out / "results.json").read_text())["timings_s"]
    page, js = ((out / f).stat().st_size / 1e6 for f in ("index.html", "results.json"))
    core = timings.get("decompose_store", 0) + timings.get("align", 0)
    return dict(
        n=n, wall=wall, timings=timings, core=core / wall, silence=silence, where=where, page=page, js=js, rss=rss
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, nargs="+", default=[64, 1000])
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vitdecomp-base-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{MODEL}.safetensors"
    if not ckpt.exists():
        write_checkpoint(ckpt)
    export = work / "world"
    if not (export / "images").is_dir():
        n = str(max(args.n_images))
        subprocess.run(
            [sys.executable, "-m", "vitdecomp", "world", "export", "--n-images", n, "--out", str(export)], check=True
        )
    print(f"load average before: {os.getloadavg()}", flush=True)
    print("| images | wall s | decompose + align | stages (s) | longest silence s | page + json MB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for n in args.n_images:
        r = bench(n, work, ckpt, export / "images")
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items() if k != "total")
        print(
            f"| {n} | {r['wall']:.0f} | {r['core']:.0%} | {stages} | {r['silence']:.1f} (after: {r['where']}) | "
            f"{r['page'] + r['js']:.2f} ({r['page']:.2f} + {r['js']:.2f}) | "
            f"{r['rss']:.0f} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
