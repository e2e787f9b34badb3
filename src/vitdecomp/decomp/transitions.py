"""Stage transitions: linear maps (frozen statistics) from one token grid's stream to the next one's.

Each pulls a readout of the next stream back onto the previous stream, and reads out the constants it
adds (``(label, [B, D_out])``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitdecomp.components import ComponentLabel
from vitdecomp.decomp.capture import Capture, grid_of, take_positions, to_stream
from vitdecomp.decomp.plan import Merge, Shortcut, StreamNorm, Tap
from vitdecomp.decomp.readout import ChainedReadoutMap, NormRule, ReadoutMap
from vitdecomp.errors import VitDecompError

Consts = list[tuple[ComponentLabel, Tensor]]


class MergeStep:
    """Patch merging: ``out[t] = W (concat_k x[j(t, k)])`` with a frozen norm before or after ``W``."""

    def __init__(self, spec: Merge) -> None:
        self.spec, self.path = spec, spec.path
        self.norm = NormRule.of(spec.norm, f"{spec.path}.norm")
        self.labels = [ComponentLabel("transition_bias", stage=spec.stage)]
        self.inv_sigma: Tensor | None = None  # [B, N_out]
        self.index: Tensor | None = None  # [N_out, K]
        self.n_in = 0

    def attach(self, cap: Capture) -> None:
        def keep_grid(x: Tensor) -> None:
            grid = grid_of(x, self.spec.grid.layout)
            self.n_in, self.index = grid[0] * grid[1], self.spec.index(grid)

        cap.tap(self.spec.grid, keep_grid)
        cap.norm_stats(self.spec.norm, self.norm.inv_sigma, lambda s: setattr(self, "inv_sigma", s))

    def pull_back(self, ro: ReadoutMap) -> tuple[ReadoutMap, Consts]:
        if ro.positions is not None or ro.dense:
            raise VitDecompError(f"'{self.path}': patch merging needs a per-token readout at every position")
        idx = self.index.to(ro.weight.device)  # [N_out, K]
        n_out, k_in = idx.shape
        w_red = self.spec.reduction.weight.to(ro.like)  # [D_next, K*C]
        m = self.norm.left(w_red) if self.spec.norm_after else self.norm.right(w_red)
        c = w_red.shape[1] // k_in
        m = m.view(m.shape[0], k_in, c).transpose(0, 1)  # [K_in, D_next, C]
        wt = ro.weight * self.inv_sigma.to(ro.weight)  # [B, N_out]
        slot_out = ro.slot if ro.slot is not None else torch.zeros(n_out, dtype=torch.long, device=idx.device)
        flat = idx.reshape(-1)
        keep = flat >= 0
        weight = wt.new_zeros(wt.shape[0], self.n_in)
        weight[:, flat[keep]] = wt.repeat_interleave(k_in, 1)[:, keep]
        slot = torch.zeros(self.n_in, dtype=torch.long, device=idx.device)
        slot[flat[keep]] = (slot_out[:, None] * k_in + torch.arange(k_in, device=idx.device)).reshape(-1)[keep]
        return ChainedReadoutMap(ro, m, weight, slot), self._consts(ro, w_red)

    def _consts(self, ro: ReadoutMap, w_red: Tensor) -> Consts:
        beta, bias = self.norm.bias, self.spec.reduction.bias
        total = None
        if self.spec.norm_after:  # norm(W u + b): beta at every token, b scaled per token
            if beta is not None:
                total = ro.const(beta)
            if bias is not None:
                scaled = ro.scaled(self.inv_sigma).const(self.norm.apply_vec(bias.to(ro.like)))
                total = scaled if total is None else total + scaled
        else:  # W norm(u) + b: W beta + b at every token
            const = None if beta is None else beta.to(ro.like) @ w_red.T
            if bias is not None:
                const = bias.to(ro.like) + (0 if const is None else const)
            total = None if const is None else ro.const(const)
        return [] if total is None else [(self.labels[0], total)]


class ShortcutStep:
    """Average pooling then a linear/1x1-conv map (MaxViT's downsampling shortcut)."""

    def __init__(self, spec: Shortcut) -> None:
        self.spec, self.path = spec, spec.path
        self.labels = [ComponentLabel("transition_bias", stage=spec.stage)]
        self.matrix: Tensor | None = None

    def attach(self, cap: Capture) -> None:
        layout = self.spec.grid.layout
        cap.tap(self.spec.grid, lambda x: setattr(self, "matrix", self.spec.pool_matrix(grid_of(x, layout))))

    def pull_back(self, ro: ReadoutMap) -> tuple[ReadoutMap, Consts]:
        if ro.positions is not None or ro.slot is not None or ro.dense:
            raise VitDecompError(f"'{self.path}': pooling transition needs a slot-free full readout")
        p = self.matrix.to(ro.weight)  # [N_out, N_in], dense or sparse COO (made inside the pass)
        weight = torch.mm(p.t(), ro.weight.t()).t()
        w = self.spec.weight
        mats = ro.mats if w is None else torch.einsum("kod,di->koi", ro.mats, w.to(ro.mats))
        consts = [] if self.spec.bias is None else [(self.labels[0], ro.const(self.spec.bias))]
        return ReadoutMap(weight, mats), consts


class StreamNormStep:
    """A norm of the whole stream between blocks: ``y_t = gamma * C x_t / sigma_t + beta`` per token, with
    frozen statistics; its beta (if any) is the component ``label``."""

    def __init__(self, spec: StreamNorm, path: str, label: ComponentLabel) -> None:
        self.spec, self.path = spec, path
        self.norm = NormRule.of(spec.norm, path)
        self.labels = [label]
        self.inv_sigma: Tensor | None = None  # [B, N]

    def attach(self, cap: Capture) -> None:
        layout = self.spec.layout
        cap.tap(
            Tap(self.spec.norm, "input", layout),
            lambda u: setattr(self, "inv_sigma", self.norm.inv_sigma(to_stream(u, layout))),
        )

    def pull_back(self, ro: ReadoutMap) -> tuple[ReadoutMap, Consts]:
        consts = [] if self.norm.bias is None else [(self.labels[0], ro.const(self.norm.bias))]
        scale = take_positions(self.inv_sigma, ro.positions)
        return ro.scaled(scale).normed(self.norm), consts


def transition_step(spec: Merge | Shortcut) -> MergeStep | ShortcutStep:
    return MergeStep(spec) if isinstance(spec, Merge) else ShortcutStep(spec)
