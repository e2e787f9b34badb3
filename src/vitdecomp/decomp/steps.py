"""Readout steps: what each declared step needs from the pass, and how the steps compose into one map.

The steps of a :class:`~vitdecomp.decomp.plan.Readout` are composed from the stream outward: token-level
maps (a per-token norm: a per-token scale and ``diag(gamma) C``), one pooling step (weights per token
and slot, one matrix per slot), then maps of the pooled vector (norms, linear maps) that act on the
slot matrices and on every constant collected so far.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from vitdecomp.components import ComponentLabel
from vitdecomp.decomp.capture import Capture, take_positions, to_stream
from vitdecomp.decomp.plan import (
    AttentionPool,
    Linear,
    MultiheadPool,
    Pool,
    Readout,
    ReadoutStep,
    Tap,
    TokenNorm,
    VectorNorm,
)
from vitdecomp.decomp.readout import ElementwiseReadoutMap, FactoredReadoutMap, NormRule, ReadoutMap
from vitdecomp.errors import UnsupportedModuleError, VitDecompError

Consts = list[tuple[ComponentLabel, Tensor]]


def read_positions(spec: Readout) -> Tensor | None:
    """The stream positions the readout reads (``None``: every position)."""
    pool = next((s for s in spec.steps if isinstance(s, Pool)), None)
    return None if pool is None or pool.positions is None else torch.tensor(list(pool.positions))


def _pooled_vector(t: Tensor, tap: Tap, position: int | None) -> Tensor:
    """``[B, E]``: the vector a pooled-vector norm sees at ``tap`` (token ``position`` of it, if given)."""
    t = to_stream(t, tap.layout)
    return t.reshape(t.shape[0], -1) if position is None else t[:, position]


def key_mask(valid: Tensor | None, like: Tensor) -> Tensor | None:
    """``[B, 1, 1, N]`` additive mask of ``valid [B, N]`` as timm builds it (``finfo.min`` on padding)."""
    if valid is None:
        return None
    mask = torch.zeros(valid.shape, dtype=like.dtype, device=like.device)
    return mask.masked_fill_(~valid.to(like.device, torch.bool), torch.finfo(like.dtype).min)[:, None, None]


class AttentionPoolState:
    """What a timm ``AttentionPoolLatent`` needs from the pass (its q and kv outputs, its MLP's output)
    and where its value / output weights are."""

    def __init__(self, step: AttentionPool) -> None:
        m = step.module
        if getattr(m, "pool", None) not in ("token", "avg"):
            raise UnsupportedModuleError("attn_pool", m, f"pool={getattr(m, 'pool', None)!r}: only 'token'/'avg'")
        self.module, self.skip, self.num_heads, self.valid = m, step.skip, m.num_heads, step.valid
        self.pos_embed: Tensor | None = m.pos_embed
        self.q: Tensor | None = None
        self.kv: Tensor | None = None
        self.mlp_out: Tensor | None = None

    def attach(self, cap: Capture) -> None:
        m = self.module
        cap.tap(Tap(m.q), lambda t: setattr(self, "q", t))
        cap.tap(Tap(m.kv), lambda t: setattr(self, "kv", t))
        if m.mlp is not None:
            cap.tap(Tap(m.mlp), lambda t: setattr(self, "mlp_out", t))

    def probs(self) -> Tensor:
        """``[B, H, L, N']`` attention of each latent over the pooled tokens, as the module computes it."""
        m, h, dh = self.module, self.module.num_heads, self.module.head_dim
        b, n = self.kv.shape[:2]
        q = self.q.expand(b, -1, -1).reshape(b, -1, h, dh).transpose(1, 2)
        k = self.kv.reshape(b, n, 2, h, dh)[:, :, 0].transpose(1, 2)
        q, k = m.q_norm(q), m.k_norm(k)
        scores = (q * m.scale) @ k.transpose(-2, -1)
        mask = key_mask(None if self.valid is None else self.valid(), scores)
        return (scores if mask is None else scores + mask).softmax(-1)

    def latent_weights(self, like: Tensor) -> Tensor:
        """``[L]``: how the pooled output weighs the latents."""
        n = self.module.latent_len
        lam = torch.zeros(n, dtype=like.dtype, device=like.device)
        if self.module.pool == "token":
            lam[0] = 1.0
        else:
            lam[:] = 1.0 / n
        return lam

    def value_map(self) -> tuple[Tensor, Tensor | None]:
        """``(W_v [H*dh, D], b_v [H*dh] | None)``."""
        kv = self.module.kv
        c = kv.weight.shape[0] // 2
        return kv.weight[c:], None if kv.bias is None else kv.bias[c:]

    def out_map(self) -> tuple[Tensor | None, Tensor | None]:
        """``(W_O [D_out, H*dh] | None (identity), b_O [D_out] | None)``."""
        proj = self.module.proj
        return (proj.weight, proj.bias) if isinstance(proj, nn.Linear) else (None, None)


class MultiheadPoolState:
    """What a :class:`~vitdecomp.decomp.plan.MultiheadPool` needs from the pass: its queries and keys
    as the ``nn.MultiheadAttention`` sees them (positional inputs 0 and 1) and its MLP's output."""

    def __init__(self, step: MultiheadPool) -> None:
        mha = step.attention
        if type(mha) is not nn.MultiheadAttention or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModuleError("attention pool", mha, "only a plain nn.MultiheadAttention")
        self.mha, self.step, self.skip, self.num_heads = mha, step, step.skip, mha.num_heads
        self.pos_embed: Tensor | None = None
        self.query: Tensor | None = None
        self.key: Tensor | None = None
        self.mlp_out: Tensor | None = None

    def attach(self, cap: Capture) -> None:
        layout = "tokens" if self.mha.batch_first else "seq_first"
        cap.tap(Tap(self.mha, "input", layout, 0), lambda t: setattr(self, "query", to_stream(t, layout)))
        cap.tap(Tap(self.mha, "input", layout, 1), lambda t: setattr(self, "key", to_stream(t, layout)))
        if self.step.mlp is not None:
            cap.tap(Tap(self.step.mlp), lambda t: setattr(self, "mlp_out", t))

    def _proj(self, i: int, x: Tensor) -> Tensor:
        """Projection ``i`` (0 query, 1 key, 2 value) of ``x [B, L, E_i]`` -> ``[B, H, L, dh]``."""
        mha = self.mha
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight.chunk(3)[i]
        else:
            w = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)[i]
        b = None if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)[i]
        y = nn.functional.linear(x, w, b)
        return y.view(y.shape[0], y.shape[1], self.num_heads, -1).transpose(1, 2)

    def probs(self) -> Tensor:
        """``[B, H, L, N']``: each query's attention over the pooled tokens, from the module's weights."""
        q, k = self._proj(0, self.query), self._proj(1, self.key)
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)

    def latent_weights(self, like: Tensor) -> Tensor:
        lam = torch.zeros(self.query.shape[1], dtype=like.dtype, device=like.device)
        lam[self.step.query] = 1.0
        return lam

    def value_map(self) -> tuple[Tensor, Tensor | None]:
        mha = self.mha
        w = mha.in_proj_weight.chunk(3)[2] if mha._qkv_same_embed_dim else mha.v_proj_weight
        return w, None if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)[2]

    def out_map(self) -> tuple[Tensor | None, Tensor | None]:
        return self.mha.out_proj.weight, self.mha.out_proj.bias


PoolState = AttentionPoolState | MultiheadPoolState


def pool_state(steps: list[ReadoutStep]) -> PoolState | None:
    """The state of the readout's attention pool, if it has one."""
    for s in steps:
        if isinstance(s, AttentionPool):
            return AttentionPoolState(s)
        if isinstance(s, MultiheadPool):
            return MultiheadPoolState(s)
    return None


class ReadoutBuilder:
    """Captures what the steps of ``spec`` need during the pass; :meth:`build` composes them after it."""

    def __init__(self, spec: Readout) -> None:
        self.spec = spec
        self.positions = read_positions(spec)
        self.seen: dict[int, Tensor] = {}
        self.attn_pool = pool_state(spec.steps)

    def attach(self, cap: Capture) -> None:
        pos = self.positions

        def keep(key: int, fn=lambda t: t):
            return lambda t: self.seen.__setitem__(key, fn(t))

        cap.stream(self.spec.stream, keep(-1, lambda s: take_positions(s, pos)))
        out_fn = self.spec.output_fn or (lambda t: t)
        cap.tap(self.spec.output, keep(-2, out_fn))
        for step in self.spec.steps:
            if isinstance(step, VectorNorm):
                tap = step.tap or Tap(step.norm, "input")
                cap.tap(tap, keep(id(step), functools.partial(_pooled_vector, tap=tap, position=step.position)))
        if self.attn_pool is not None:
            self.attn_pool.attach(cap)

    def build(self) -> tuple[ReadoutMap, Consts, Tensor]:
        """``(readout map of the final stream, constants [B, D_out] with labels, the model's own output)``."""
        x = self.seen[-1]  # [B, S, D]
        dt = torch.promote_types(x.dtype, torch.float32)
        scale = torch.ones(x.shape[:2], dtype=dt, device=x.device)  # per-token scale before pooling
        token_norm: NormRule | None = None
        token_consts: list[tuple[ComponentLabel, Tensor]] = []  # vectors added at every token
        ro: ReadoutMap | None = None
        consts: Consts = []
        for step in self.spec.steps:
            if isinstance(step, TokenNorm):
                if ro is not None or token_norm is not None:
                    raise VitDecompError("a per-token norm must come first in the readout")
                token_norm = NormRule.of(step.norm, "norm")
                scale = scale * token_norm.inv_sigma(x).to(dt)
                if token_norm.bias is not None:
                    token_consts.append((ComponentLabel(step.kind), token_norm.bias.to(dt)))
            elif isinstance(step, (Pool, AttentionPool, MultiheadPool)):
                raw, consts = self._pool(step, x, dt)  # the map of the stream entering the pool, its constants
                # a vector added at every token (a token norm's beta) is pooled with the raw weights
                consts = [(lab, raw.const(c)) for lab, c in token_consts] + consts
                ro = raw.scaled(scale) if token_norm is None else raw.scaled(scale).normed(token_norm)
            elif isinstance(step, VectorNorm):
                ro, consts = self._vector_norm(step, ro, consts)
            elif isinstance(step, Linear):
                ro, consts = self._linear(step, ro, consts)
        if ro is None:
            raise VitDecompError("the readout has no pooling step")
        return ro, consts, self.seen[-2]

    def _pool(self, step: Pool | AttentionPool | MultiheadPool, x: Tensor, dt) -> tuple[ReadoutMap, Consts]:
        """The pooling as a readout map of the stream (per-token weights ``[B, S]`` or ``[B, S, K]``, one
        matrix ``[D_out, D]`` per slot or their factors, at the read positions) and the pool's constants."""
        b, n, d = x.shape
        positions = None if self.positions is None else self.positions.to(x.device)
        if isinstance(step, Pool):
            if step.positions is not None:
                w = torch.tensor(list(step.weights or [1.0] * len(step.positions)), dtype=dt, device=x.device)
                pool_w = w.expand(b, -1)
            else:
                pool_w = torch.zeros(b, n, dtype=dt, device=x.device)
                valid = None if step.valid is None else step.valid()
                if valid is None:
                    pool_w[:, step.skip :] = 1.0 / (n - step.skip)
                else:  # the average of the real tokens (NaFlex: padding left out)
                    valid = valid.to(x.device, dt)
                    pool_w[:, step.skip :] = valid / valid.sum(1, keepdim=True).clamp_min(1)
            return ElementwiseReadoutMap(pool_w, d, positions), []
        return self._attention_pool(x, dt)

    def _attention_pool(self, x: Tensor, dt) -> tuple[ReadoutMap, Consts]:
        """Frozen attention pool: slot ``h`` is pool head ``h``, ``S_h = W_O[:, h] W_v[h]``, kept as its
        two factors."""
        st = self.attn_pool
        h = st.num_heads
        b, n, d = x.shape
        probs = st.probs().to(dt)  # [B, H, L, N']
        lam = st.latent_weights(probs)
        p_tok = torch.einsum("l,bhln->bnh", lam, probs)  # [B, N', H]
        pool_w = x.new_zeros(b, n, h, dtype=dt)
        pool_w[:, st.skip :] = p_tok
        w_v, b_v = st.value_map()
        w_v = w_v.to(dt).view(h, -1, d)  # [H, dh, D]
        w_o, b_o = st.out_map()
        w_o = torch.eye(h * w_v.shape[1], dtype=dt, device=x.device) if w_o is None else w_o.to(dt)  # [D_out, H*dh]
        w_p = w_o.view(w_o.shape[0], h, -1).transpose(0, 1)  # [H, D_out, dh]
        raw = FactoredReadoutMap(pool_w, (w_v, w_o))
        consts: Consts = []
        if st.pos_embed is not None:
            pos = torch.einsum("bnh,nd->bhd", p_tok, st.pos_embed.to(dt))  # per head
            per_head = torch.einsum("hoe,hed,bhd->bho", w_p, w_v, pos)
            consts += [(ComponentLabel("pool_pos", head=i), per_head[:, i]) for i in range(h)]
        bias = None if b_v is None else torch.einsum("hoe,he->o", w_p, b_v.to(dt).view(h, -1))
        if b_o is not None:
            bias = b_o.to(dt) + (0 if bias is None else bias)
        if bias is not None:
            consts.append((ComponentLabel("pool_bias"), bias.expand(b, -1)))
        if st.mlp_out is not None:
            consts.append((ComponentLabel("pool_mlp"), torch.einsum("l,bld->bd", lam, st.mlp_out.to(dt))))
        return raw, consts

    def _vector_norm(self, step: VectorNorm, ro: ReadoutMap, consts: Consts) -> tuple[ReadoutMap, Consts]:
        norm = NormRule.of(step.norm, "fc_norm" if step.position is None else "pooled vector norm")
        s = norm.inv_sigma(self.seen[id(step)]).to(ro.weight)  # [B]
        weight = ro.weight * (s[:, None, None] if ro.dense else s[:, None])
        consts = [(lab, s[:, None] * norm.left(c.T).T) for lab, c in consts]
        if norm.bias is not None:
            consts.append((ComponentLabel(step.kind), norm.bias.to(ro.like).expand(weight.shape[0], -1)))
        return ro.reweighted(weight).then_norm(norm), consts

    def _linear(self, step: Linear, ro: ReadoutMap, consts: Consts) -> tuple[ReadoutMap, Consts]:
        w = step.weight.to(ro.like)
        consts = [(lab, c @ w.T) for lab, c in consts]
        if step.bias is not None:
            consts.append((ComponentLabel(step.kind), step.bias.to(ro.like).expand(ro.weight.shape[0], -1)))
        return ro.then(lambda m: torch.einsum("od,...di->...oi", w, m)), consts
