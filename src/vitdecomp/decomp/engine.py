"""The engine: one forward pass with hooks, then every declared part read out through the frozen readout.

It knows no model family: an adapter's :class:`~vitdecomp.decomp.plan.Plan` says where the parts are.
Each stage's stream is read out where each branch is added; walking the stages from the last one
back, every transition pulls the readout back onto the previous grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vitdecomp.components import ComponentLabel, Decomposition, TokenContributions
from vitdecomp.decomp.branches import FieldPart, HeadsPart, Part
from vitdecomp.decomp.capture import Capture, grid_of, take_positions, to_stream
from vitdecomp.decomp.directional import TokenDirections, head_token_projections
from vitdecomp.decomp.plan import Block, Field, Plan, Stage, Tap
from vitdecomp.decomp.readout import ReadoutMap
from vitdecomp.decomp.steps import Consts, ReadoutBuilder
from vitdecomp.decomp.transitions import MergeStep, ShortcutStep, StreamNormStep, transition_step
from vitdecomp.errors import NonFiniteInputError, VitDecompError

#: Default completeness tolerance per dtype of the representation: about 1000 float32 / 10 float16 /
#: 6 bfloat16 machine epsilons (a deep model's rounding adds up); float64 is checked tightly.
COMPLETENESS_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class _BlockRun:
    spec: Block
    parts: list[Part]
    transition: MergeStep | ShortcutStep | None
    after: StreamNormStep | None = None


@dataclass
class _StageRun:
    spec: Stage
    blocks: list[_BlockRun]
    transition: MergeStep | ShortcutStep | None
    grid: tuple[int, int] | None = None


class _Run:
    """One decomposition call's live objects: parts per block, transitions, the readout builder."""

    def __init__(
        self, plan: Plan, heads: bool, tokens: bool | Iterable[int], directions: TokenDirections | None = None
    ) -> None:
        self.plan, self.directions = plan, directions
        self.readout = ReadoutBuilder(plan.readout)
        self.init = FieldPart(plan.init, ComponentLabel("init"))
        token_layers = None if isinstance(tokens, bool) else set(tokens)
        self.want_tokens = (lambda layer: tokens) if token_layers is None else (lambda layer: layer in token_layers)
        self.stages: list[_StageRun] = []
        for st in plan.stages:
            if st.index < plan.init_stage:
                continue
            blocks = [
                _BlockRun(b, [_part(br, b, heads) for br in b.branches], _step(b.transition), _after(b))
                for b in st.blocks
            ]
            trans = _step(st.transition) if st.index > plan.init_stage else None
            self.stages.append(_StageRun(st, blocks, trans))

    def attach(self, cap: Capture, streams: dict | None = None) -> None:
        last = self.plan.stages[-1].index
        for st in self.stages:
            if st.transition is not None:
                st.transition.attach(cap)
            cap.tap(st.spec.grid, lambda x, st=st: setattr(st, "grid", _grid(x, st.spec)))
            positions = self.readout.positions if st.spec.index == last else None
            for blk in st.blocks:
                if blk.transition is not None and st.spec.index > self.plan.init_stage:
                    blk.transition.attach(cap)
                if blk.after is not None:
                    blk.after.attach(cap)
                for part in blk.parts:
                    part.attach(cap, positions, self.want_tokens(blk.spec.layer) and isinstance(part, HeadsPart))
                if streams is not None:
                    _attach_streams(cap, blk, positions, streams)
        init_positions = self.readout.positions if self.plan.init_stage == last else None
        self.init.attach(cap, init_positions, False)
        self.readout.attach(cap)


def _part(spec: Field | object, block: Block, heads: bool) -> Part:
    base = {"layer": block.layer, "stage": block.stage, "block": block.block}
    if isinstance(spec, Field):
        return FieldPart(spec, ComponentLabel(spec.kind, sublayer=spec.sublayer, **base))
    return HeadsPart(spec, base, heads)


def _step(spec) -> MergeStep | ShortcutStep | None:
    return None if spec is None else transition_step(spec)


def _after(block: Block) -> StreamNormStep | None:
    """The step of a norm at the block's end; its beta is ``<block>.norm_bias``."""
    if block.after is None:
        return None
    label = ComponentLabel("norm_bias", layer=block.layer, stage=block.stage, block=block.block)
    return StreamNormStep(block.after, f"{block.path} stream norm", label)


def _grid(x: Tensor, stage: Stage) -> tuple[int, int] | None:
    """The stage's token grid, or ``None`` when the tensor is a sequence of patches with no 2-D layout
    (NaFlex's pre-patchified input)."""
    if x.ndim != 4:
        return None
    h, w = grid_of(x, stage.grid.layout)
    return (h // stage.grid_divisor[0], w // stage.grid_divisor[1])


def _attach_streams(cap: Capture, blk: _BlockRun, positions: Tensor | None, streams: dict) -> None:
    """Keep the block's input and output streams (for the per-block diagnosis)."""
    layout = blk.spec.layout

    def keep(key, pos):
        return lambda x: streams.__setitem__(key, take_positions(to_stream(x, layout), pos))

    cap.tap(Tap(blk.spec.module, "input"), keep((blk.spec.path, "in"), None if blk.transition else positions))
    cap.tap(Tap(blk.spec.module, "output"), keep((blk.spec.path, "out"), positions))


@contextlib.contextmanager
def _captured(run: _Run, target: nn.Module, streams: dict | None = None) -> Iterator[Capture]:
    """Every hook of ``run`` attached, in eval mode; all removed and restored on exit, error or not."""
    cap = Capture()
    was_training = target.training
    target.eval()
    cap.restore.append(lambda: target.train(was_training))
    try:
        run.attach(cap, streams)
        yield cap
    finally:
        cap.close()


def run_plan(
    plan: Plan,
    target: nn.Module,
    images: Images,
    heads: bool,
    tokens,
    streams: dict | None = None,
    directions: TokenDirections | None = None,
):
    """Run the model once with ``plan``'s hooks and read every part out -> :class:`Decomposition`.
    With ``directions``, token stacks hold each token's projection on them ``[B, H, N, k]``."""
    run = _Run(plan, heads, tokens, directions)
    with torch.inference_mode(), _captured(run, target, streams):
        plan.run(images)
    with torch.inference_mode():
        return _assemble(run, _batch_size(images), streams)


#: What a model is called on: an image batch ``[B, 3, H, W]``, or the mapping of tensors its forward
#: takes (NaFlexVit's ``patches`` / ``patch_coord`` / ``patch_valid``; its floating tensors are the pixels).
Images = Tensor | Mapping[str, Tensor]


def _batch_size(images: Images) -> int:
    return len(images if isinstance(images, Tensor) else next(iter(images.values())))


def _prepared(images: Images, param: Tensor) -> Images:
    """The inputs on the model's device, pixels in its dtype; images with NaN / inf pixels are refused
    (:class:`NonFiniteInputError` naming their batch positions)."""
    batch = {"": images} if isinstance(images, Tensor) else dict(images)
    finite = torch.ones(_batch_size(images), dtype=torch.bool)
    for t in batch.values():
        if t.is_floating_point():
            finite &= torch.isfinite(t.reshape(len(t), -1)).all(1).cpu()
    if not bool(finite.all()):
        bad = [int(i) for i in torch.nonzero(~finite).flatten()]
        raise NonFiniteInputError.of([f"batch position {i}" for i in bad], bad)
    moved = {
        k: t.to(device=param.device, dtype=param.dtype if t.is_floating_point() else t.dtype) for k, t in batch.items()
    }
    return moved[""] if isinstance(images, Tensor) else moved


def decompose_plan(
    make_plan: Callable[[], Plan],
    target: nn.Module,
    images: Images,
    *,
    heads: bool,
    tokens,
    check: float | None,
    directions: TokenDirections | None = None,
) -> Decomposition:
    """Decompose with the plan ``make_plan()`` and check completeness; on failure, name the first
    block whose parts do not add up (a re-run with each block's streams captured)."""
    param = next(target.parameters())
    images = _prepared(images, param)
    plan = make_plan()
    result = run_plan(plan, target, images, heads, tokens, directions=directions)
    if check is None:
        check = COMPLETENESS_TOLERANCE.get(result.representation.dtype, 1e-4)
    if check > 0:
        err = result.error.max().item()
        if not err <= check:
            streams: dict = {}
            diag = run_plan(make_plan(), target, images, heads, False, streams)
            where = _first_failing(diag.meta["block_residuals"], target, check)
            raise VitDecompError(
                f"the parts do not add up: relative error {err:.2e} > {check:.0e} for {plan.family} "
                f"model {type(target).__name__} in {str(param.dtype).removeprefix('torch.')}{where}. This model "
                "has a module the rules do not cover; please report it."
            )
    return result


def _first_failing(residuals: dict[str, float], target: nn.Module, tol: float) -> str:
    for path, residual in residuals.items():
        if residual > tol:
            block = target.get_submodule(path)
            return (
                f" (first mismatch: block '{path}' of class {type(block).__name__}, relative residual {residual:.1e})"
            )
    return ""


def _assemble(run: _Run, batch: int, streams: dict | None) -> Decomposition:
    """Read every captured part out, walking the stages back from the readout; with ``streams`` also
    each block's residual ``|R(out) - R(in) - its parts| / |representation|``."""
    ro, consts, rep = run.readout.build()
    residuals: dict[str, float] = {}
    trans_consts: Consts = []
    parts: list[tuple[list[ComponentLabel], Tensor]] = []
    token_stacks: list[TokenContributions] = []
    init_ro = ro
    for st in reversed(run.stages):
        stage_parts, stack, ro = _assemble_stage(run, st, ro, rep, batch, trans_consts, residuals, streams)
        parts = stage_parts + parts
        if stack is not None:
            token_stacks.insert(0, stack)
        if st.spec.index == run.plan.init_stage:
            init_ro = ro
        if st.transition is not None:
            ro, c = st.transition.pull_back(ro)
            trans_consts[:0] = c
    parts.insert(0, (run.init.labels, run.init.contributions(init_ro)))
    run.init.release()
    parts += [([label], c[:, None]) for label, c in trans_consts + consts]
    return Decomposition(
        contributions=torch.cat([t.to(rep.dtype) for _, t in parts], 1),
        labels=[lab for labs, _ in parts for lab in labs],
        representation=rep,
        tokens=token_stacks,
        meta={"family": run.plan.family, **run.plan.meta, **({"block_residuals": residuals} if streams else {})},
    )


def _assemble_stage(
    run, st: _StageRun, ro: ReadoutMap, rep: Tensor, batch: int, trans_consts: Consts, residuals, streams
):
    """One stage's parts (and token stack), its blocks read from the last one back; returns the readout
    at the stage's start (inside-block transitions pulled back). Parts read through the same readout map
    are read out together: one matmul with the map per segment of blocks."""
    token_parts = [p for b in st.blocks for p in b.parts if isinstance(p, HeadsPart) and p.want_tokens]
    tokens = _TokenFill(token_parts, rep, batch, run.directions)
    out: list[tuple[list[ComponentLabel], Tensor]] = []
    segment: list[tuple[_BlockRun, Part, Tensor]] = []  # (block, part, pooled [B, n, K, D_s])
    for blk in reversed(st.blocks):
        maps = _BlockMaps(ro, ro, ro)
        if blk.after is not None:  # a norm after the branches: they are read through its pull-back
            out[:0], segment = _read_segment(segment, ro), []
            ro, maps.consts = blk.after.pull_back(ro)
            maps.branches = ro
        for part in reversed(blk.parts):
            segment.insert(0, (blk, part, part.pooled(maps.branches)))
            tokens.fill(part, maps.branches)
            part.release()
        if blk.transition is not None and st.spec.index > run.plan.init_stage:
            out[:0], segment = _read_segment(segment, maps.branches), []
            ro, consts = blk.transition.pull_back(ro)
            maps.consts = consts + maps.consts
        trans_consts[:0] = maps.consts
        maps.inp = ro
        if streams is not None:
            _block_residual(run, blk, maps, rep, segment, out, residuals, streams)
    out[:0] = _read_segment(segment, ro)
    stack = None
    if tokens.values is not None:
        stack = _token_stack(tokens.values, [lab for p in token_parts for lab in p.head_labels], st)
    return out, stack, ro


def _read_segment(segment: list, ro: ReadoutMap) -> list[tuple[list[ComponentLabel], Tensor]]:
    """Read out the pooled forms of a segment's parts with one matmul -> ``(labels, [B, n, D_out])``."""
    if not segment:
        return []
    read = ro.apply_pooled(torch.cat([pooled for _, _, pooled in segment], 1))
    sizes = [pooled.shape[1] for _, _, pooled in segment]
    return [(part.labels, t) for (_, part, _), t in zip(segment, read.split(sizes, 1), strict=True)]


class _TokenFill:
    """Per-token contributions of a stage's token-wanting heads, filled from the last block back; with
    ``directions``, only their projections on them (:mod:`vitdecomp.decomp.directional`)."""

    def __init__(
        self, parts: list[HeadsPart], rep: Tensor, batch: int, directions: TokenDirections | None = None
    ) -> None:
        self.parts, self.rep, self.batch, self.directions = parts, rep, batch, directions
        self.end = sum(p.num_heads for p in parts)
        self.values: Tensor | None = None  # [B, heads of this stage, N, D_out] (or k directions)

    def fill(self, part: Part, ro: ReadoutMap) -> None:
        if part not in self.parts:
            return
        if self.values is None:
            width = self.rep.shape[-1] if self.directions is None else self.directions.width(part.head_labels)
            self.values = self.rep.new_empty(self.batch, self.end, part.token_parts_size(), width)
        out = self.values[:, self.end - part.num_heads : self.end]
        if self.directions is None:
            part.token_contributions(ro, out)
        else:
            dirs, shared = self.directions.for_heads(part.head_labels), self.directions.shared_through(ro)
            out.copy_(head_token_projections(part, ro, dirs, shared))
        self.end -= part.num_heads


@dataclass
class _BlockMaps:
    """The readout maps around one block: of its output, of its branches (an end-of-block norm pulled
    back) and of its input (a transition inside it pulled back), and the constants its own steps add."""

    out: ReadoutMap
    branches: ReadoutMap
    inp: ReadoutMap
    consts: Consts = field(default_factory=list)


def _block_residual(run, blk, maps: _BlockMaps, rep, segment, out, residuals, streams) -> None:
    """``|R(out) - R(in) - the block's parts| / |representation|`` for the per-block diagnosis."""
    pooled = [p for b, _, p in segment if b is blk]
    own = sum(maps.branches.apply_pooled(p).sum(1) for p in pooled) if pooled else torch.zeros_like(rep)
    if not pooled:  # the block's parts were already read out with a transition's segment
        own = sum(t.sum(1) for labs, t in out[: len(blk.parts)])
    own = own + sum((t for _, t in maps.consts), torch.zeros_like(rep))
    x_in = streams[(blk.spec.path, "in")]
    if blk.spec.layer == run.plan.meta.get("start_layer"):
        x_in = run.init.value  # the first block's input as its shortcut carries it onto this grid
    gap = maps.out.field(streams[(blk.spec.path, "out")]) - maps.inp.field(x_in) - own
    residuals[blk.spec.path] = (gap.norm(dim=-1) / rep.norm(dim=-1).clamp_min(1e-30)).max().item()


def _token_stack(values: Tensor, labels: list[ComponentLabel], st: _StageRun) -> TokenContributions:
    """The stage's token stack; a stage with no 2-D grid (a sequence of patches) is a ``1 x N`` row
    whose tokens have no pixel box (``-1``: their places are the caller's, e.g. NaFlex's ``patch_coord``)."""
    n, npre = values.shape[2], st.spec.num_prefix_tokens
    if st.grid is None:
        return TokenContributions(values, labels, torch.full((n, 4), -1), (1, n - npre), npre)
    grid = st.grid
    if grid[0] * grid[1] + npre != n:
        raise VitDecompError(
            f"stage {st.spec.index}: a {grid[0]}x{grid[1]} token grid plus {npre} prefix tokens "
            f"does not match the {n} tokens of the stream (wrong patch stride in the adapter)"
        )
    return TokenContributions(values, labels, pixel_boxes(grid, st.spec.patch, npre), grid, npre)


def pixel_boxes(grid: tuple[int, int], patch: tuple[int, int], num_prefix: int = 0) -> Tensor:
    """``[num_prefix + gh*gw, 4]`` (top, left, bottom, right) in input pixels; ``-1`` for prefix tokens."""
    gh, gw = grid
    r = torch.arange(gh).repeat_interleave(gw)
    c = torch.arange(gw).repeat(gh)
    boxes = torch.stack([r * patch[0], c * patch[1], (r + 1) * patch[0], (c + 1) * patch[1]], 1)
    prefix = torch.full((num_prefix, 4), -1, dtype=boxes.dtype)
    return torch.cat([prefix, boxes], 0)
