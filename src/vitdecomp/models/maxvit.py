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

from vitdecomp.components import ComponentLabel
from vitdecomp.decompose import (
    Block,
    Branch,
    Capture,
    FieldBranch,
    NormRule,
    Plan,
    PoolTransition,
    ReadoutBuilder,
    Stage,
    WindowedAttention,
    check_plan_args,
    pool_weights,
)
from vitdecomp.errors import UnsupportedModuleError

REPRESENTATIONS = ("pooled", "pooled_norm", "logits")


def nchw_grid(x: Tensor) -> tuple[int, int]:
    return (x.shape[2], x.shape[3])


def nhwc_grid(x: Tensor) -> tuple[int, int]:
    return (x.shape[1], x.shape[2])


def nchw_to_stream(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, H*W, C]`` (row-major)."""
    return x.flatten(2).transpose(1, 2)


def _layer_scale(module: nn.Module, path: str) -> Tensor | None:
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if isinstance(gamma, Tensor) and gamma.ndim == 1:
        return gamma
    raise UnsupportedModuleError(path, module, "unknown layer-scale module")


def _check_eval_identity(module: nn.Module, path: str) -> None:
    """Drop-path / dropout must be identities (eval mode or zero rate)."""
    if isinstance(module, nn.Identity):
        return
    if module.training:
        raise UnsupportedModuleError(path, module, "stochastic in training mode; call model.eval()")


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


def _v_of_cl(attn: AttentionCl) -> Callable[[Tensor], Tensor]:
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


def _v_of_2d(attn: Attention2d) -> Callable[[Tensor], Tensor]:
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


def pool_matrix(pool: nn.Module) -> Callable[[tuple[int, int]], Tensor]:
    """``grid -> [N_out, N_in]`` sparse: the model's own ``pool`` run on one-hot maps (in chunks)."""

    def matrix(grid: tuple[int, int]) -> Tensor:
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
        p = torch.sparse_coo_tensor(idx, torch.cat(vals), (n_out, n_in), check_invariants=True)
        return p.coalesce()

    return matrix


def shortcut_transition(conv: MbConvBlock, path: str, stage: int) -> PoolTransition | None:
    """The stride-2 shortcut of an MBConv block as a transition (``None`` for an identity shortcut)."""
    sc = conv.shortcut
    if isinstance(sc, nn.Identity):
        return None
    spath = f"{path}.shortcut"
    if type(sc) is not Downsample2d:
        raise UnsupportedModuleError(spath, sc, "unknown shortcut")
    pool = sc.pool
    if not isinstance(pool, nn.AvgPool2d):
        raise UnsupportedModuleError(f"{spath}.pool", pool, "only average pooling is linear (max pooling is not)")
    if isinstance(sc.expand, nn.Identity):
        weight, bias = None, None
    elif isinstance(sc.expand, nn.Conv2d) and sc.expand.kernel_size == (1, 1) and sc.expand.groups == 1:
        weight, bias = sc.expand.weight.flatten(1), sc.expand.bias
    else:
        raise UnsupportedModuleError(f"{spath}.expand", sc.expand, "only a 1x1 conv is supported")
    return PoolTransition(
        spath, sc, nchw_grid, pool_matrix(pool), weight, bias, ComponentLabel("transition_bias", stage=stage)
    )


def conv_branch(conv: MbConvBlock, path: str, base: dict) -> FieldBranch:
    """The MBConv branch without its shortcut (read at ``drop_path``, i.e. ``conv3_1x1``'s output)."""
    return FieldBranch(conv.drop_path, ComponentLabel("conv", **base), f"{path}.conv3_1x1", to_stream=nchw_to_stream)


def partition_branches(layer: nn.Module, path: str, base: dict, heads: bool) -> list[Branch]:
    """Attention (per head) and MLP of one ``PartitionAttentionCl`` / ``PartitionAttention2d``."""
    if type(layer) is PartitionAttentionCl:
        attn_cls, grid_of, z_of, v_of, to_stream = AttentionCl, nhwc_grid, None, _v_of_cl, None
    elif type(layer) is PartitionAttention2d:
        attn_cls, grid_of, v_of, to_stream = Attention2d, nchw_grid, _v_of_2d, nchw_to_stream
        z_of = nchw_to_stream  # proj input [Bw, E, ph, pw] -> [Bw, w, E]
    else:
        raise UnsupportedModuleError(path, layer, "only timm's PartitionAttentionCl / PartitionAttention2d")
    attn = layer.attn
    if type(attn) is not attn_cls:
        raise UnsupportedModuleError(f"{path}.attn", attn, f"only timm's {attn_cls.__name__}")
    for name in ("drop_path1", "drop_path2"):
        _check_eval_identity(getattr(layer, name), f"{path}.{name}")
    ls1 = _layer_scale(layer.ls1, f"{path}.ls1")
    _layer_scale(layer.ls2, f"{path}.ls2")  # read out at drop_path2, so only checked
    att = WindowedAttention(
        attn, f"{path}.attn", base, heads, ls1, layer, grid_of, partition_index(layer), z_of=z_of, v_of=v_of(attn)
    )
    att.proj_weight = attn.proj.weight.flatten(1)  # a 1x1 conv's [D, E, 1, 1] -> [D, E]
    mlp_kwargs = {} if to_stream is None else {"to_stream": to_stream}
    mlp = FieldBranch(layer.drop_path2, ComponentLabel("mlp", **base), f"{path}.mlp", **mlp_kwargs)
    return [att, mlp]


class MaxViTAdapter:
    family = "timm-maxvit"
    model_types = (MaxxVit,)

    def plan(self, model: MaxxVit, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        head = model.head
        pool = head.global_pool
        if getattr(pool, "pool_type", None) != "avg":
            raise UnsupportedModuleError("head.global_pool", pool, "only average pooling is linear")
        final_norm = None if isinstance(model.norm, nn.Identity) else NormRule.of(model.norm, "norm")
        head_norm_module = getattr(head, "norm", None)
        head_norm = None
        if head_norm_module is not None and not isinstance(head_norm_module, nn.Identity):
            head_norm = NormRule.of(head_norm_module, "head.norm")
        if representation == "pooled_norm" and head_norm is None:
            raise ValueError(
                f"{type(head).__name__} has no norm; use representation='pooled' (it already includes model.norm)"
            )
        if representation == "logits":
            pre = getattr(head, "pre_logits", None)
            if pre is not None and not isinstance(pre, nn.Identity):
                raise UnsupportedModuleError("head.pre_logits", pre, "a hidden layer with tanh before the classifier")
            if not isinstance(head.fc, nn.Linear):
                raise UnsupportedModuleError("head.fc", head.fc, "logits need a linear classifier (num_classes > 0)")

        all_blocks = [(s, b, blk) for s, st in enumerate(model.stages) for b, blk in enumerate(st.blocks)]
        depth = len(all_blocks)
        representation = check_plan_args(representation, REPRESENTATIONS, start_layer, depth)

        stages: list[Stage] = []
        init: FieldBranch | None = None
        init_stage = len(model.stages) - 1
        layer = 0
        stem_stride = getattr(model.stem, "stride", 2)
        for s, st in enumerate(model.stages):
            spath = f"stages.{s}"
            if type(st) is not MaxxVitStage:
                raise UnsupportedModuleError(spath, st, "only timm's MaxxVitStage")
            blocks: list[Block] = []
            for b, blk in enumerate(st.blocks):
                path = f"{spath}.blocks.{b}"
                if layer < start_layer:
                    layer += 1
                    continue
                if type(blk) is MaxxVitBlock:
                    conv, cpath = blk.conv, f"{path}.conv"
                elif type(blk) is MbConvBlock:
                    conv, cpath = blk, path
                else:
                    raise UnsupportedModuleError(path, blk, "only MaxxVitBlock and MbConvBlock blocks have a rule")
                if type(conv) is not MbConvBlock:
                    raise UnsupportedModuleError(cpath, conv, "only MBConv conv blocks have a rule (not ConvNeXt)")
                _check_eval_identity(conv.drop_path, f"{cpath}.drop_path")
                if layer == start_layer:
                    # the stream entering the block, carried by its (possibly downsampling) shortcut
                    if isinstance(conv.shortcut, nn.Identity):
                        init = FieldBranch(blk, ComponentLabel("init"), "init", "input", nchw_to_stream)
                    else:
                        init = FieldBranch(conv.shortcut, ComponentLabel("init"), "init", "output", nchw_to_stream)
                    init_stage = s
                    transition = None
                else:
                    transition = shortcut_transition(conv, cpath, s)
                base = {"layer": layer, "stage": s, "block": b}
                branches: list[Branch] = [conv_branch(conv, cpath, base)]
                if type(blk) is MaxxVitBlock:
                    for sub in ("block", "grid"):
                        part = getattr(blk, f"attn_{sub}")
                        if part is None:
                            continue
                        sbase = {**base, "sublayer": sub}
                        branches += partition_branches(part, f"{path}.attn_{sub}", sbase, heads)
                blocks.append(Block(path, blk, layer, branches, stage=s, transition=transition))
                layer += 1
            stride = stem_stride * 2 ** (s + 1)
            stages.append(Stage(s, blocks, patch=(stride, stride)))
        if init is None:
            init = FieldBranch(model.norm, ComponentLabel("init"), "init", "input", nchw_to_stream)

        seen: dict[str, Tensor] = {}
        grids: dict[int, tuple[int, int]] = {}

        def attach_readout(cap: Capture) -> None:
            cap.on_input(model.norm, lambda x: seen.__setitem__("stream", x))
            cap.on_output(pool, lambda x: seen.__setitem__("pooled", x.flatten(1)))
            if head_norm is not None:
                cap.on_output(head_norm_module, lambda x: seen.__setitem__("pooled_norm", x.flatten(1)))
            cap.on_output(head, lambda x: seen.__setitem__("logits", x))
            for s, st in enumerate(model.stages):
                cap.on_output(st, lambda x, s=s: grids.__setitem__(s, nchw_grid(x)))

        def readout():
            x = nchw_to_stream(seen["stream"])
            rb = ReadoutBuilder(pool_weights(x, None), x.shape[-1])
            if final_norm is not None:
                rb.token_norm(x, final_norm, ComponentLabel("norm_bias"))
            if representation != "pooled" and head_norm is not None:
                rb.vector_norm(seen["pooled"], head_norm, ComponentLabel("head_norm_bias"))
            if representation == "logits":
                rb.linear(head.fc.weight, head.fc.bias, ComponentLabel("head_bias"))
            ro, consts = rb.build()
            return ro, consts, seen[representation]

        return Plan(
            stages=stages,
            init=init,
            init_stage=init_stage,
            positions=None,
            run=model,
            readout=readout,
            attach_readout=attach_readout,
            family=self.family,
            grid_of_stage=lambda s: grids[s],
            meta={"representation": representation, "start_layer": start_layer, "num_blocks": depth},
        )
