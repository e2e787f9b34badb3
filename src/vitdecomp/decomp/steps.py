"""Readout steps: what each declared step needs from the pass, and how the steps compose into one map.

The steps of a :class:`~vitdecomp.decomp.plan.Readout` are composed from the stream outward: token-level
maps (a per-token norm: a per-token scale and ``diag(gamma) C``), one pooling step (weights per token
and slot, one matrix per slot), then maps of the pooled vector (norms, linear maps) that act on the
slot matrices and on every constant collected so far.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitdecomp.components import ComponentLabel
from vitdecomp.decomp.capture import Capture, take_positions, to_stream
from vitdecomp.decomp.plan import AttentionPool, Linear, Pool, QueryPool, Readout, Tap, TokenNorm, VectorNorm
from vitdecomp.decomp.readout import NormRule, ReadoutMap
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


@dataclass
class PoolHeads:
    """An attention pool with its probabilities frozen:
    ``out = W_p [sum_n p[n, h] (W_v,h (x_n + pos_n) + b_v,h)]_h + b_p``.

    ``p_tok [B, N', H]`` (the queries already weighed), ``w_v [H, dh, D]``, ``b_v [H, dh]``,
    ``w_p [D_out, H*dh]``, ``b_p [D_out]``, ``pos [N', D]`` (a position embedding added to the tokens)."""

    p_tok: Tensor
    w_v: Tensor
    b_v: Tensor | None
    w_p: Tensor
    b_p: Tensor | None
    pos: Tensor | None = None

    def bias(self) -> Tensor | None:
        """``[D_out]``: ``W_p b_v + b_p``."""
        out = None if self.b_v is None else self.w_p @ self.b_v.reshape(-1)
        if self.b_p is not None:
            out = self.b_p if out is None else out + self.b_p
        return out


class AttentionPoolState:
    """What timm's attention pool needs from the pass: probabilities ``[B, H, L, N]`` and its MLP's output."""

    def __init__(self, step: AttentionPool) -> None:
        m = step.module
        if getattr(m, "pool", None) not in ("token", "avg"):
            raise UnsupportedModuleError("attn_pool", m, f"pool={getattr(m, 'pool', None)!r}: only 'token'/'avg'")
        self.module, self.skip, self.valid = m, step.skip, step.valid
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

    def heads(self, dt) -> tuple[PoolHeads, Consts]:
        """The frozen pool, and its MLP's term (``pool_mlp``: not linear in the tokens)."""
        m, h = self.module, self.module.num_heads
        probs = self.probs().to(dt)  # [B, H, L, N']
        lam = self.latent_weights(probs)
        p_tok = torch.einsum("l,bhln->bnh", lam, probs)  # [B, N', H]
        c = m.kv.weight.shape[0] // 2
        w_v = m.kv.weight[c:].to(dt).view(h, -1, m.kv.weight.shape[1])
        b_v = None if m.kv.bias is None else m.kv.bias[c:].to(dt).view(h, -1)
        proj = m.proj if isinstance(m.proj, nn.Linear) else None
        w_p = torch.eye(c, dtype=dt, device=w_v.device) if proj is None else proj.weight.to(dt)
        b_p = None if proj is None or proj.bias is None else proj.bias.to(dt)
        pos = None if m.pos_embed is None else m.pos_embed.to(dt)
        extra: Consts = []
        if self.mlp_out is not None:
            extra.append((ComponentLabel("pool_mlp"), torch.einsum("l,bld->bd", lam, self.mlp_out.to(dt))))
        return PoolHeads(p_tok, w_v, b_v, w_p, b_p, pos), extra


class QueryPoolState:
    """What a :class:`QueryPool` needs from the pass: the tokens its keys are made from."""

    def __init__(self, step: QueryPool) -> None:
        self.step = step
        self.keys: Tensor | None = None

    def attach(self, cap: Capture) -> None:
        cap.tap(self.step.keys, lambda t: setattr(self, "keys", t))

    def heads(self, dt) -> tuple[PoolHeads, Consts]:
        st, h = self.step, self.step.num_heads
        probs = st.probs(self.keys).to(dt)  # [B, H, L, N]
        lam = torch.tensor(list(st.query_weights), dtype=dt, device=probs.device)
        p_tok = torch.einsum("l,bhln->bnh", lam, probs)
        w_v = st.value_weight.to(dt).view(h, -1, st.value_weight.shape[1])
        b_v = None if st.value_bias is None else st.value_bias.to(dt).view(h, -1)
        b_p = None if st.out_bias is None else st.out_bias.to(dt)
        return PoolHeads(p_tok, w_v, b_v, st.out_weight.to(dt), b_p), []


class ReadoutBuilder:
    """Captures what the steps of ``spec`` need during the pass; :meth:`build` composes them after it."""

    def __init__(self, spec: Readout) -> None:
        self.spec = spec
        self.positions = read_positions(spec)
        self.seen: dict[int, Tensor] = {}  # id(step) or -1 (stream) / -2 (output) -> tensor
        self.attn_pool: AttentionPoolState | QueryPoolState | None = None
        for step in spec.steps:
            if isinstance(step, AttentionPool):
                self.attn_pool = AttentionPoolState(step)
            elif isinstance(step, QueryPool):
                self.attn_pool = QueryPoolState(step)

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
            elif isinstance(step, (Pool, AttentionPool, QueryPool)):
                raw, consts = self._pool(step, x, dt)  # the map of the stream entering the pool
                # a vector added at every token (a token norm's beta) is pooled with the raw weights
                consts = [(lab, raw.const(c)) for lab, c in token_consts] + consts
                ro = raw.scaled(scale) if token_norm is None else raw.scaled(scale).before(token_norm.right)
            elif isinstance(step, VectorNorm):
                ro, consts = self._vector_norm(step, ro, consts)
            elif isinstance(step, Linear):
                ro, consts = self._linear(step, ro, consts)
        if ro is None:
            raise VitDecompError("the readout has no pooling step")
        return ro, consts, self.seen[-2]

    def _pool(self, step: Pool | AttentionPool | QueryPool, x: Tensor, dt) -> tuple[ReadoutMap, Consts]:
        """The pooling as a readout map of the stream (per-token weights ``[B, S]`` or ``[B, S, K]``, slot
        matrices or their factors) and the pool's own constants."""
        b, n, d = x.shape
        positions = None if self.positions is None else self.positions.to(x.device)
        if not isinstance(step, Pool):
            pool_w, factors, consts = self._attention_pool(x, dt, step.skip if isinstance(step, AttentionPool) else 0)
            return ReadoutMap(pool_w, None, positions, None, factors), consts
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
        return ReadoutMap(pool_w, torch.eye(d, dtype=dt, device=x.device)[None], positions), []

    def _attention_pool(self, x: Tensor, dt, skip: int) -> tuple[Tensor, tuple[Tensor, Tensor], Consts]:
        """Frozen attention pool: slot ``h`` is pool head ``h``, ``S_h = W_proj[:, h] W_v[h]``, kept in
        factored form; its position term per pool head (``pool_pos.H<h>``), biases (``pool_bias``) and
        MLP are components. Returns weights ``[B, S, H]``, factors, constants."""
        pool, extra = self.attn_pool.heads(dt)
        b, n, _ = x.shape
        h, dh, _ = pool.w_v.shape
        pool_w = x.new_zeros(b, n, h, dtype=dt)
        pool_w[:, skip:] = pool.p_tok
        consts: Consts = []
        if pool.pos is not None:
            pos = torch.einsum("bnh,nd->bhd", pool.p_tok, pool.pos)  # per head
            per_head = torch.einsum("ohe,hed,bhd->bho", pool.w_p.view(-1, h, dh), pool.w_v, pos)
            consts += [(ComponentLabel("pool_pos", head=i), per_head[:, i]) for i in range(h)]
        bias = pool.bias()
        if bias is not None:
            consts.append((ComponentLabel("pool_bias"), bias.expand(b, -1)))
        return pool_w, (pool.w_v, pool.w_p), consts + extra

    def _vector_norm(self, step: VectorNorm, ro: ReadoutMap, consts: Consts) -> tuple[ReadoutMap, Consts]:
        norm = NormRule.of(step.norm, "fc_norm" if step.position is None else "pooled vector norm")
        s = norm.inv_sigma(self.seen[id(step)]).to(ro.weight)  # [B]
        consts = [(lab, s[:, None] * norm.left(c.T).T) for lab, c in consts]
        if norm.bias is not None:
            consts.append((ComponentLabel(step.kind), norm.bias.to(ro.like).expand(s.shape[0], -1)))
        return ro.scaled(s[:, None].expand(ro.weight.shape[:2])).then(norm.left), consts

    def _linear(self, step: Linear, ro: ReadoutMap, consts: Consts) -> tuple[ReadoutMap, Consts]:
        w = step.weight.to(ro.like)
        consts = [(lab, c @ w.T) for lab, c in consts]
        if step.bias is not None:
            consts.append((ComponentLabel(step.kind), step.bias.to(ro.like).expand(ro.weight.shape[0], -1)))
        return ro.then(lambda m: torch.einsum("od,...di->...oi", w, m)), consts
