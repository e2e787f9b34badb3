"""timm ``MaxxVit`` built from ``MaxxVitBlock`` stages: MaxViT (``maxvit_*_tf_*`` and timm's ``maxvit_*_rw_*``).

Stream between blocks: NCHW ``[B, C_s, H_s, W_s]``, read as ``[B, H_s*W_s, C_s]`` in row-major order
(NHWC inside ``PartitionAttentionCl``; the NCHW ``PartitionAttention2d`` variant, selected with
``transformer_use_nchw_attn=True``, is handled too). Each ``MaxxVitBlock`` adds, in order:

- ``conv``: the MBConv branch ``drop_path(conv3_1x1(...))`` without its shortcut, one component
  (kind ``"conv"``, non-linear). A stride-2 block's shortcut ``Downsample2d`` (average pooling, then a
  1x1 ``expand`` conv or Identity) is a linear stage transition: the pooling is a matrix found by
  running the model's own ``pool`` on one-hot maps, the ``expand`` bias is a ``"transition_bias"``.
  Max-pooling shortcuts are not linear and raise :class:`UnsupportedModuleError`.
- ``attn_block`` then ``attn_grid``: each ``x + ls1(attn(norm1 x))`` (one component per head plus
  ``attn_bias``; the window / grid partition is undone with timm's own ``window_partition`` /
  ``grid_partition`` on an index grid) and ``x + ls2(mlp(norm2 x))`` (one ``mlp`` component), labelled
  with ``sublayer="block"`` / ``"grid"``.

A bare ``MbConvBlock`` stage block (CoAtNet's ``'C'`` blocks) is one ``conv`` component (plus its
shortcut transition). ``TransformerBlock2d`` (CoAtNet ``'T'``), ``ConvNeXtBlock`` (MaxxViT) and parallel
blocks have no rule and raise, unless ``start_layer`` folds them into ``init``. ``init`` is the stream
entering block ``start_layer`` (for a stride-2 block: the output of its shortcut, i.e. the stem and
everything before, carried onto the block's grid); ``start_layer`` counts blocks across stages.

Representations (all after global average pooling of the final stage):

- ``"pooled"`` (default): the average of the final-stage tokens, through ``model.norm`` when it is a
  norm (timm's ``*_rw`` models: a per-token ``LayerNorm2d``; the TF models have ``norm = Identity``).
  The head's norm is *not* included; for ``*_rw`` models this is ``forward_head(pre_logits=True)``.
- ``"pooled_norm"``: also through the head's norm (``NormMlpClassifierHead.norm``, the TF models and
  ``head_hidden_size`` models), frozen statistics of the pooled vector. Raises ``ValueError`` for a
  model whose head has no norm.
- ``"logits"``: through the classifier, only when it is linear after the norm (``ClassifierHead`` or a
  ``NormMlpClassifierHead`` without hidden layer); the TF models' ``pre_logits`` (linear + tanh) raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.maxxvit import (
    Attention2d,
    AttentionCl,
    Downsample2d,
    MaxxVit,
    MaxxVitBlock,
    MaxxVitStage,
    MbConvBlock,
    PartitionAttention2d,
    PartitionAttentionCl,
    grid_partition,
    grid_partition_nchw,
    window_partition,
    window_partition_nchw,
)
from torch import Tensor, nn

from vitdecomp.decomp.plan import (
    Block,
    Branch,
    Field,
    Heads,
    Linear,
    Plan,
    Pool,
    Readout,
    Shortcut,
    Stage,
    Tap,
    TokenNorm,
    Values,
    VectorNorm,
    Windows,
)
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import check_eval_identity, check_plan_args, is_norm, layer_scale_of

REPRESENTATIONS = ("pooled", "pooled_norm", "logits")


def partition_index(layer: PartitionAttentionCl | PartitionAttention2d) -> Callable[[tuple[int, int]], Tensor]:
    """``grid -> [nW, window_area]``: stream positions of each window slot, from timm's own partition."""
    nchw = isinstance(layer, PartitionAttention2d)

    def index(grid: tuple[int, int]) -> Tensor:
        h, w = grid
        size = list(layer.partition_size)
        if nchw:
            idx = torch.arange(h * w).view(1, 1, h, w)
            part = window_partition_nchw if layer.partition_block else grid_partition_nchw
        else:
            idx = torch.arange(h * w).view(1, h, w, 1)
            part = window_partition if layer.partition_block else grid_partition
        win = part(idx, size)
        return win.reshape(win.shape[0], -1)

    return index


def _values_cl(attn: AttentionCl) -> Callable[[Tensor], Tensor]:
    """``qkv(x) [Bw, ph, pw, 3E] -> v [Bw, w, E]`` (head-major channels), as ``AttentionCl.forward`` splits it."""
    nh, dh = attn.num_heads, attn.dim_head

    def v_of(qkv: Tensor) -> Tensor:
        bw = qkv.shape[0]
        if attn.head_first:
            v = qkv.reshape(bw, -1, nh, 3 * dh)[..., 2 * dh :]
        else:
            v = qkv.reshape(bw, -1, 3, nh, dh)[:, :, 2]
        return v.reshape(bw, v.shape[1], nh * dh)

    return v_of


def _values_2d(attn: Attention2d) -> Callable[[Tensor], Tensor]:
    """``qkv(x) [Bw, 3E, ph, pw] -> v [Bw, w, E]`` (head-major channels), as ``Attention2d.forward`` splits it."""
    nh, dh = attn.num_heads, attn.dim_head

    def v_of(qkv: Tensor) -> Tensor:
        bw = qkv.shape[0]
        if attn.head_first:
            v = qkv.reshape(bw, nh, 3 * dh, -1)[:, :, 2 * dh :]
        else:
            v = qkv.reshape(bw, 3, nh, dh, -1)[:, 2]
        return v.permute(0, 3, 1, 2).reshape(bw, -1, nh * dh)  # [Bw, H, dh, w] -> [Bw, w, H*dh]

    return v_of


#: What an average pooling's matrix depends on besides the grid.
_POOL_CONFIG = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_POOL_MATRICES: dict[tuple, Tensor] = {}


def pool_matrix(pool: nn.Module) -> Callable[[tuple[int, int]], Tensor]:
    """``grid -> [N_out, N_in]`` sparse: the model's own ``pool`` run on one-hot maps (in chunks), made
    once per pooling class, configuration and grid (it depends on nothing else)."""
    config = (type(pool), *(getattr(pool, k, None) for k in _POOL_CONFIG))

    def matrix(grid: tuple[int, int]) -> Tensor:
        key = (*config, tuple(grid))
        if key not in _POOL_MATRICES:
            _POOL_MATRICES[key] = _one_hot_pooled(pool, grid)
        return _POOL_MATRICES[key]

    return matrix


def _one_hot_pooled(pool: nn.Module, grid: tuple[int, int]) -> Tensor:
    h, w = grid
    n_in = h * w
    chunk = max(1, (1 << 22) // n_in)
    rows, cols, vals = [], [], []
    n_out = None
    for lo in range(0, n_in, chunk):
        hi = min(n_in, lo + chunk)
        x = torch.zeros(hi - lo, 1, h, w, dtype=torch.float64)
        x.view(hi - lo, -1)[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
        y = pool(x).reshape(hi - lo, -1)  # [chunk, N_out]
        n_out = y.shape[1]
        i, o = y.nonzero(as_tuple=True)
        rows.append(o)
        cols.append(i + lo)
        vals.append(y[i, o])
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(idx, torch.cat(vals), (n_out, n_in), check_invariants=True).coalesce()


def shortcut_transition(conv: MbConvBlock, path: str, stage: int) -> Shortcut | None:
    """The stride-2 shortcut of an MBConv block as a transition (``None`` for an identity shortcut)."""
    sc = conv.shortcut
    if isinstance(sc, nn.Identity):
        return None
    spath = f"{path}.shortcut"
    if type(sc) is not Downsample2d:
        raise UnsupportedModuleError(spath, sc, "unknown shortcut")
    if not isinstance(sc.pool, nn.AvgPool2d):
        raise UnsupportedModuleError(f"{spath}.pool", sc.pool, "only average pooling is linear (max pooling is not)")
    if isinstance(sc.expand, nn.Identity):
        weight, bias = None, None
    elif isinstance(sc.expand, nn.Conv2d) and sc.expand.kernel_size == (1, 1) and sc.expand.groups == 1:
        weight, bias = sc.expand.weight.flatten(1), sc.expand.bias
    else:
        raise UnsupportedModuleError(f"{spath}.expand", sc.expand, "only a 1x1 conv is supported")
    return Shortcut(spath, Tap(sc, "input", "nchw"), pool_matrix(sc.pool), weight, bias, stage)


def partition_branches(layer: nn.Module, path: str, sublayer: str) -> list[Branch]:
    """Attention (per head) and MLP of one ``PartitionAttentionCl`` / ``PartitionAttention2d``."""
    if type(layer) is PartitionAttentionCl:
        attn_cls, layout, values = AttentionCl, "tokens", _values_cl
    elif type(layer) is PartitionAttention2d:
        attn_cls, layout, values = Attention2d, "nchw", _values_2d
    else:
        raise UnsupportedModuleError(path, layer, "only timm's PartitionAttentionCl / PartitionAttention2d")
    attn = layer.attn
    if type(attn) is not attn_cls:
        raise UnsupportedModuleError(f"{path}.attn", attn, f"only timm's {attn_cls.__name__}")
    for name in ("drop_path1", "drop_path2"):
        check_eval_identity(getattr(layer, name), f"{path}.{name}")
    layer_scale_of(layer.ls2, f"{path}.ls2")  # read out at drop_path2, so only checked
    heads = Heads(
        attn,
        f"{path}.attn",
        attn.num_heads,
        attn.proj.weight.flatten(1),  # a 1x1 conv's [D, E, 1, 1] -> [D, E]
        attn.proj.bias,
        z=Tap(attn.proj, "input", layout),
        probs=Tap(attn.attn_drop),
        values=Values(Tap(attn.qkv), values(attn)),
        layer_scale=layer_scale_of(layer.ls1, f"{path}.ls1"),
        windows=Windows(Tap(layer, "input", layout), partition_index(layer)),
        sublayer=sublayer,
    )
    mlp = Field(Tap(layer.drop_path2, "output", layout), f"{path}.mlp", sublayer=sublayer)
    return [heads, mlp]


def _conv_of(blk: nn.Module, path: str) -> tuple[MbConvBlock, str]:
    if type(blk) is MaxxVitBlock:
        conv, cpath = blk.conv, f"{path}.conv"
    elif type(blk) is MbConvBlock:
        conv, cpath = blk, path
    else:
        raise UnsupportedModuleError(path, blk, "only MaxxVitBlock and MbConvBlock blocks have a rule")
    if type(conv) is not MbConvBlock:
        raise UnsupportedModuleError(cpath, conv, "only MBConv conv blocks have a rule (not ConvNeXt)")
    check_eval_identity(conv.drop_path, f"{cpath}.drop_path")
    return conv, cpath


def _block(blk: nn.Module, path: str, layer: int, s: int, b: int, is_init: bool) -> Block:
    conv, cpath = _conv_of(blk, path)
    transition = None if is_init else shortcut_transition(conv, cpath, s)
    # the MBConv branch without its shortcut, read at drop_path (conv3_1x1's output)
    branches: list[Branch] = [Field(Tap(conv.drop_path, "output", "nchw"), f"{cpath}.conv3_1x1", "conv")]
    if type(blk) is MaxxVitBlock:
        for sub in ("block", "grid"):
            part = getattr(blk, f"attn_{sub}")
            if part is not None:
                branches += partition_branches(part, f"{path}.attn_{sub}", sub)
    return Block(path, blk, layer, branches, stage=s, block=b, transition=transition, layout="nchw")


def _init_field(blk: nn.Module, path: str) -> Field:
    """The stream entering block ``blk``, carried by its (possibly downsampling) shortcut."""
    conv, _ = _conv_of(blk, path)
    if isinstance(conv.shortcut, nn.Identity):
        return Field(Tap(blk, "input", "nchw"), "init", "init")
    return Field(Tap(conv.shortcut, "output", "nchw"), "init", "init")


def _readout(model: MaxxVit, representation: str) -> Readout:
    head, pool = model.head, model.head.global_pool
    head_norm = getattr(head, "norm", None)
    has_head_norm = head_norm is not None and is_norm(head_norm)
    if representation == "pooled_norm" and not has_head_norm:
        raise ValueError(
            f"{type(head).__name__} has no norm; use representation='pooled' (it already includes model.norm)"
        )
    steps: list = [TokenNorm(model.norm)] if is_norm(model.norm) else []
    steps.append(Pool())
    if representation != "pooled" and has_head_norm:
        steps.append(VectorNorm(head_norm, "head_norm_bias", Tap(head_norm, "input", "nchw")))
    output = {"pooled": Tap(pool), "pooled_norm": Tap(head_norm) if has_head_norm else None, "logits": Tap(head)}
    if representation == "logits":
        pre = getattr(head, "pre_logits", None)
        if pre is not None and not isinstance(pre, nn.Identity):
            raise UnsupportedModuleError("head.pre_logits", pre, "a hidden layer with tanh before the classifier")
        if not isinstance(head.fc, nn.Linear):
            raise UnsupportedModuleError("head.fc", head.fc, "logits need a linear classifier (num_classes > 0)")
        steps.append(Linear(head.fc.weight, head.fc.bias))
    return Readout(Tap(model.norm, "input", "nchw"), steps, output[representation], output_fn=lambda t: t.flatten(1))


class MaxViTAdapter:
    family = "timm-maxvit"

    def plan(self, model: MaxxVit, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        pool = model.head.global_pool
        if getattr(pool, "pool_type", None) != "avg":
            raise UnsupportedModuleError("head.global_pool", pool, "only average pooling is linear")
        depth = sum(len(st.blocks) for st in model.stages)
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, depth)
        readout = _readout(model, representation)
        stages: list[Stage] = []
        init, init_stage = Field(Tap(model.norm, "input", "nchw"), "init", "init"), len(model.stages) - 1
        layer, stem_stride = 0, getattr(model.stem, "stride", 2)
        for s, st in enumerate(model.stages):
            if type(st) is not MaxxVitStage:
                raise UnsupportedModuleError(f"stages.{s}", st, "only timm's MaxxVitStage")
            blocks: list[Block] = []
            for b, blk in enumerate(st.blocks):
                path = f"stages.{s}.blocks.{b}"
                if layer == start_layer:
                    init, init_stage = _init_field(blk, path), s
                if layer >= start_layer:
                    blocks.append(_block(blk, path, layer, s, b, layer == start_layer))
                layer += 1
            stride = stem_stride * 2 ** (s + 1)
            stages.append(Stage(s, blocks, grid=Tap(st, "output", "nchw"), patch=(stride, stride)))
        meta = {"representation": representation, "start_layer": start_layer, "num_blocks": depth}
        return Plan(self.family, stages, init, init_stage, readout, model, meta)
