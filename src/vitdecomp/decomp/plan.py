"""The vocabulary an adapter speaks: where a model's parts are, and how its representation is read out.

An adapter returns a :class:`Plan` built only from these declarations; the engine
(:mod:`vitdecomp.decomp.engine`) attaches the hooks, freezes the non-linear quantities of the pass and
does every piece of bookkeeping. Nothing here runs a model.

Tensor layouts (``Layout``) say how a tensor seen at a module maps onto stream order ``[B, N, D]``:
``"tokens"`` ``[B, ..., D]`` (``[B, N, D]`` or NHWC ``[B, H, W, D]``, flattened row-major),
``"nchw"`` ``[B, D, H, W]``, ``"seq_first"`` ``[N, B, D]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

Layout = Literal["tokens", "nchw", "seq_first"]


@dataclass(frozen=True)
class Tap:
    """A tensor seen during the forward pass: a positional input or the output of ``module``.
    ``item``: which positional input, or which element of a tuple output (a transformers attention
    returns ``(output, probabilities)``)."""

    module: nn.Module
    where: Literal["input", "output"] = "output"
    layout: Layout = "tokens"
    item: int = 0


# ---------------------------------------------------------------------------------------------
# residual branches


@dataclass
class Field:
    """A residual branch that is one component (an MLP, a conv block): the tensor at ``tap``, times
    ``scale [D]`` when given (a layer scale applied outside any module, e.g. EVA's ``gamma_2``)."""

    tap: Tap
    path: str
    kind: str = "mlp"
    scale: Tensor | None = None
    sublayer: str | None = None


@dataclass
class Values:
    """Per-head value vectors, for token splits: ``fn(tensor at tap) -> [B', N', H*dh]`` (head-major)."""

    tap: Tap
    fn: Callable[[Tensor], Tensor]


@dataclass
class Windows:
    """Attention inside windows. ``index(grid) -> [nW, w]``: the stream position of every window slot
    (``-1`` for padding) for the stream grid read off ``grid``'s tensor (layout ``"tokens"`` = NHWC)."""

    grid: Tap
    index: Callable[[tuple[int, int]], Tensor]


#: ``(args, kwargs, positions, tokens) -> (output, z [B, S, H*dh], probs [B, H, S, N] | None, v [B, H, N, dh] | None)``
Replacement = Callable[[tuple, dict, Tensor | None, bool], tuple[Tensor, Tensor, Tensor | None, Tensor | None]]


@dataclass
class Heads:
    """Multi-head attention added to the stream: ``out = sum_h W_O[:, h] z_h + b_O`` (times a layer scale).

    ``z``: where the concatenated head outputs ``[B', N', H*dh]`` are (usually the input of the output
    projection); ``proj_weight [D, H*dh]``, ``proj_bias [D]``. For token splits: ``probs`` (attention
    probabilities ``[B', H, S, N]``, read with the module's ``fused_attn`` switched off) and ``values``;
    ``explicit``: ``(object, attribute, value)`` set for a token pass so that the module computes its
    probabilities explicitly where a fused kernel never shows them (transformers: the config's
    ``_attn_implementation_internal`` set to ``"eager"``), restored after it.
    ``inner_norm``: a norm between the heads and the projection (``z`` is then its input; frozen
    statistics make it linear per head). ``post_norm``: a norm applied to the branch output (Swin V2's
    and EVA's residual post-norm), frozen likewise. ``windows``: window partition of the stream.
    ``replace``: for modules that never expose per-head outputs (``nn.MultiheadAttention``), a forward
    that computes them; the engine swaps it in for the pass and ``z`` is ignored.
    """

    module: nn.Module
    path: str
    num_heads: int
    proj_weight: Tensor
    proj_bias: Tensor | None
    z: Tap | None = None
    probs: Tap | None = None
    values: Values | None = None
    layer_scale: Tensor | None = None
    inner_norm: nn.Module | None = None
    post_norm: nn.Module | None = None
    windows: Windows | None = None
    replace: Replacement | None = None
    sublayer: str | None = None
    explicit: Sequence[tuple[object, str, object]] = ()


Branch = Field | Heads


# ---------------------------------------------------------------------------------------------
# transitions between token grids


@dataclass
class Merge:
    """Patch merging: ``out[t] = reduction(concat_k x[index(t)[k]])`` with a frozen norm over the
    concatenation (``norm_after=False``, Swin v1) or over the reduced vector (``True``, Swin V2).
    ``index(grid) -> [N_out, K]`` source positions (``-1`` padding); the grid is read off ``grid``."""

    path: str
    norm: nn.Module
    reduction: nn.Linear
    grid: Tap
    index: Callable[[tuple[int, int]], Tensor]
    stage: int
    norm_after: bool = False


@dataclass
class Shortcut:
    """Average pooling then an optional 1x1 map (MaxViT's downsampling shortcut).
    ``pool_matrix(grid) -> [N_out, N_in]`` (dense or sparse), ``weight [D_out, D_in]``, ``bias [D_out]``."""

    path: str
    grid: Tap
    pool_matrix: Callable[[tuple[int, int]], Tensor]
    weight: Tensor | None
    bias: Tensor | None
    stage: int


@dataclass
class StreamNorm:
    """A norm of the whole residual stream at the end of a block, after its branches (Swin V2-CR's
    main-branch ``norm3``): with frozen statistics a linear map of every token; its beta is a component
    of its own. ``layout``: how the norm's input is laid out."""

    norm: nn.Module
    layout: Layout = "tokens"


Transition = Merge | Shortcut


# ---------------------------------------------------------------------------------------------
# blocks and stages


@dataclass
class Block:
    """A block: its branches in order; ``module``'s input/output (``layout``) are its streams.
    ``transition`` happens inside the block, before its branches (MaxViT's stride-2 shortcut);
    ``after``, a norm of the stream after them (its output is the block's output)."""

    path: str
    module: nn.Module
    layer: int
    branches: list[Branch]
    stage: int | None = None  # for labels of hierarchical models
    block: int | None = None
    transition: Transition | None = None
    layout: Layout = "tokens"
    after: StreamNorm | None = None


@dataclass
class Stage:
    """Blocks sharing one token grid. ``transition`` maps the previous stage's stream into this one.
    ``grid``: a tensor whose spatial size is this stage's token grid, divided by ``grid_divisor``
    (e.g. the input image and the patch size)."""

    index: int
    blocks: list[Block]
    grid: Tap
    patch: tuple[int, int]
    transition: Transition | None = None
    num_prefix_tokens: int = 0
    grid_divisor: tuple[int, int] = (1, 1)


# ---------------------------------------------------------------------------------------------
# the readout: what turns the final stream into the representation


@dataclass
class TokenNorm:
    """A norm applied to every token of the final stream (first step; its beta is ``kind``)."""

    norm: nn.Module
    kind: str = "norm_bias"


#: ``() -> [B, N - skip]`` (bool): which pooled tokens are real, read after the pass (``None``: all);
#: padding tokens (NaFlex's ``patch_valid`` false) are left out of the pooling.
Validity = Callable[[], Tensor | None]


@dataclass
class Pool:
    """Pooling of the stream: the tokens at ``positions`` (weighted by ``weights``, default 1 each), or
    the average of tokens ``skip:`` (only the ``valid`` ones, when given)."""

    positions: Sequence[int] | None = None
    weights: Sequence[float] | None = None
    skip: int = 0
    valid: Validity | None = None


@dataclass
class AttentionPool:
    """An attention-pooling head (timm ``AttentionPoolLatent``, SigLIP's MAP head) used as the pooling
    step: with its probabilities frozen it is linear in the values, one readout slot per pool head.
    Its position term (per pool head), value/projection biases and MLP are components of their own.
    ``skip``: leading stream tokens the pool does not see (prefix tokens); ``valid``: the keys it may
    attend to (the model's own key mask)."""

    module: nn.Module
    skip: int = 0
    valid: Validity | None = None


@dataclass
class VectorNorm:
    """A norm applied to the pooled vector (timm ``fc_norm``, a head's norm); its input is at ``tap``
    (token ``position`` of it when the norm sees several tokens, e.g. every query of a pooler)."""

    norm: nn.Module
    kind: str = "fc_norm_bias"
    tap: Tap | None = None
    position: int | None = None


@dataclass
class Linear:
    """A linear map of the pooled vector: ``y = x @ weight.T + bias`` (``weight [D_out, D_in]``)."""

    weight: Tensor
    bias: Tensor | None = None
    kind: str = "head_bias"


@dataclass
class MultiheadPool:
    """Attention pooling by an ``nn.MultiheadAttention`` called as ``attention(queries, x, x)`` with
    learned queries (the SigLIP head of transformers, open_clip's ``AttentionalPooler`` of CoCa): like
    :class:`AttentionPool`, linear in its values once its probabilities are frozen, one readout slot per
    pool head (value/projection biases: ``pool_bias``). ``mlp``: a residual MLP on the pooled queries
    (``a + mlp(norm(a))``), whose output is a component of its own (``pool_mlp``); ``query``: which query
    is the representation; ``skip``: leading stream tokens the pool does not see."""

    attention: nn.MultiheadAttention
    mlp: nn.Module | None = None
    query: int = 0
    skip: int = 0


ReadoutStep = TokenNorm | Pool | AttentionPool | MultiheadPool | VectorNorm | Linear


@dataclass
class Readout:
    """The final stream (at ``stream``) through ``steps`` gives the representation; ``output`` is where
    the model's own value of it is seen (a tuple output's first element is taken), through ``output_fn``
    when given (e.g. selecting a token)."""

    stream: Tap
    steps: list[ReadoutStep]
    output: Tap
    output_fn: Callable[[Tensor], Tensor] | None = None


@dataclass
class Plan:
    """What an adapter says about a model for one decomposition call.

    ``init``: the stream entering block ``start_layer`` (or the final stream when everything is folded),
    on stage ``init_stage``. ``run``: calls the model on the images.
    """

    family: str
    stages: list[Stage]
    init: Field
    init_stage: int
    readout: Readout
    run: Callable[[Tensor], object]
    meta: dict = field(default_factory=dict)
