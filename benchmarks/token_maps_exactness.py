"""Directional token maps against the full per-token contributions projected, on every family's small
test model (tests/small_models.py), in float64 and float32 (prints a table).

    python benchmarks/token_maps_exactness.py

Error: max |maps - projected full contributions| / max |projected full contributions|, over every
head, token and direction (3 random directions, 2 random images).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import vitdecomp as vd
from small_models import SMALL_MODELS


def error(model: torch.nn.Module, size: int, dtype: torch.dtype) -> float:
    model = model.to(dtype)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    full = vd.decompose(model, x, tokens=True)
    u = torch.randn(3, full.representation.shape[-1], generator=torch.Generator().manual_seed(1)).to(dtype)
    maps = vd.decompose(model, x, token_directions=u)
    worst = 0.0
    for t_full, t_dir in zip(full.tokens, maps.tokens, strict=True):
        want = t_full.values @ u.T
        worst = max(worst, ((t_dir.values - want).abs().max() / want.abs().max()).item())
    return worst


def main() -> None:
    torch.set_num_threads(1)
    print("| small model | max relative error, float64 | float32 |")
    print("|---|---|---|")
    for name, make in SMALL_MODELS.items():
        if name.endswith("-padded"):
            continue
        model, size = make()
        e64, e32 = error(model, size, torch.float64), error(model, size, torch.float32)
        print(f"| {name} | {e64:.1e} | {e32:.1e} |", flush=True)


if __name__ == "__main__":
    main()
