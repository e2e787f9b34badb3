"""Readout steps: what each declared step needs from the pass, and how the steps compose into one map.

The steps of a :class:`~vitdecomp.decomp.plan.Readout` are composed from the stream outward: token-level
maps (a per-token norm: a per-token scale and ``diag(gamma) C``), one pooling step (weights per token
and slot, one matrix per slot), then maps of the pooled vector (norms, linear maps) that act on the
slot matrices and on every constant collected so far.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitdecomp.components import ComponentLabel
from vitdecomp.decomp.capture import Capture, take_positions, to_stream
from vitdecomp.decomp.plan import AttentionPool, Linear, Pool, Readout, Tap, TokenNorm, VectorNorm
from vitdecomp.decomp.readout import NormRule, ReadoutMap
from vitdecomp.errors import UnsupportedModuleError, VitDecompError

Consts = list[tuple[ComponentLabel, Tensor]]


def read_positions(spec: Readout) -> Tensor | None:
    """The stream positions the readout reads (``None``: every position)."""
    pool = next((s for s in spec.steps if isinstance(s, Pool)), None)
    return None if pool is None or pool.positions is None else torch.tensor(list(pool.positions))


class AttentionPoolState:
    """What an attention pool needs from the pass: probabilities ``[B, H, L, N]`` and its MLP's output."""

    def __init__(self, step: AttentionPool) -> None:
        m = step.module
        if getattr(m, "pool", None) not in ("token", "avg"):
            raise UnsupportedModuleError("attn_pool", m, f"pool={getattr(m, 'pool', None)!r}: only 'token'/'avg'")
        self.module, self.skip = m, step.skip
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
        return ((q * m.scale) @ k.transpose(-2, -1)).softmax(-1)

    def latent_weights(self, like: Tensor) -> Tensor:
        """``[L]``: how the pooled output weighs the latents."""
        n = self.module.latent_len
        lam = torch.zeros(n, dtype=like.dtype, device=like.device)
        if self.module.pool == "token":
            lam[0] = 1.0
        else:
            lam[:] = 1.0 / n
        return lam


class ReadoutBuilder:
    """Captures what the steps of ``spec`` need during the pass; :meth:`build` composes them after it."""

    def __init__(self, spec: Readout) -> None:
        self.spec = spec
        self.positions = read_positions(spec)
        self.seen: dict[int, Tensor] = {}
        self._factors: tuple[Tensor, Tensor] | None = (
            None  # low-rank slot matrices of an attention pool  # id(step) or -1 (stream) / -2 (output) -> tensor
        )
        self.attn_pool = next((AttentionPoolState(s) for s in spec.steps if isinstance(s, AttentionPool)), None)

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
                cap.tap(tap, keep(id(step), lambda t, tap=tap: to_stream(t, tap.layout).reshape(t.shape[0], -1)))
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
            elif isinstance(step, (Pool, AttentionPool)):
                pool_w, raw_mats, consts = self._pool(step, x, dt)  # [B, S, K], [K, D_out, D]
                slot_mats = raw_mats if token_norm is None else token_norm.right(raw_mats)
                totals = pool_w.sum(1)  # [B, K]: a vector added at every token is pooled with these
                consts = [(lab, torch.einsum("bk,kod,d->bo", totals, raw_mats, c)) for lab, c in token_consts] + consts
                weight = pool_w * scale[..., None]
                factors = self._factors
                if factors is not None and token_norm is not None:
                    factors = (token_norm.right(factors[0]), factors[1])
                weight = weight if weight.shape[2] > 1 else weight[..., 0]
                ro = ReadoutMap(weight, slot_mats, self._ro_positions(x), None, factors)
            elif isinstance(step, VectorNorm):
                ro, consts = self._vector_norm(step, ro, consts)
            elif isinstance(step, Linear):
                ro, consts = self._linear(step, ro, consts)
        if ro is None:
            raise VitDecompError("the readout has no pooling step")
        return ro, consts, self.seen[-2]

    def _ro_positions(self, x: Tensor) -> Tensor | None:
        return None if self.positions is None else self.positions.to(x.device)

    def _pool(self, step: Pool | AttentionPool, x: Tensor, dt) -> tuple[Tensor, Tensor, Consts]:
        """Pooling weights ``[B, S, K]``, slot matrices ``[K, D_out, D]`` and the pool's own constants."""
        b, n, d = x.shape
        if isinstance(step, Pool):
            if step.positions is not None:
                w = torch.tensor(list(step.weights or [1.0] * len(step.positions)), dtype=dt, device=x.device)
                pool_w = w.expand(b, -1)
            else:
                pool_w = torch.zeros(b, n, dtype=dt, device=x.device)
                pool_w[:, step.skip :] = 1.0 / (n - step.skip)
            return pool_w[..., None], torch.eye(d, dtype=dt, device=x.device)[None], []
        return self._attention_pool(x, dt)

    def _attention_pool(self, x: Tensor, dt) -> tuple[Tensor, Tensor, Consts]:
        """Frozen attention pool: slot ``h`` is pool head ``h``, ``S_h = W_proj[:, h] W_v[h]``."""
        st = self.attn_pool
        m, h = st.module, st.module.num_heads
        b, n, d = x.shape
        probs = st.probs().to(dt)  # [B, H, L, N']
        lam = st.latent_weights(probs)
        p_tok = torch.einsum("l,bhln->bnh", lam, probs)  # [B, N', H]
        pool_w = x.new_zeros(b, n, h, dtype=dt)
        pool_w[:, st.skip :] = p_tok
        c = m.kv.weight.shape[0] // 2
        w_v = m.kv.weight[c:].to(dt).view(h, -1, d)  # [H, dh, D]
        w_p = m.proj.weight.to(dt) if isinstance(m.proj, nn.Linear) else torch.eye(c, dtype=dt, device=x.device)
        w_p = w_p.view(w_p.shape[0], h, -1).transpose(0, 1)  # [H, D_out, dh]
        raw_mats = torch.einsum("hoe,hed->hod", w_p, w_v)  # [H, D_out, D]
        self._factors = (w_v, w_p.transpose(0, 1).reshape(w_p.shape[1], -1))  # [H, dh, D], [D_out, H*dh]
        consts: Consts = []
        if m.pos_embed is not None:
            pos = torch.einsum("bnh,nd->bhd", p_tok, m.pos_embed.to(dt))  # per head
            per_head = torch.einsum("hod,bhd->bho", raw_mats, pos)
            consts += [(ComponentLabel("pool_pos", head=i), per_head[:, i]) for i in range(h)]
        bias = None
        if m.kv.bias is not None:
            bias = torch.einsum("hoe,he->o", w_p, m.kv.bias[c:].to(dt).view(h, -1))
        if isinstance(m.proj, nn.Linear) and m.proj.bias is not None:
            bias = m.proj.bias.to(dt) + (0 if bias is None else bias)
        if bias is not None:
            consts.append((ComponentLabel("pool_bias"), bias.expand(b, -1)))
        if st.mlp_out is not None:
            consts.append((ComponentLabel("pool_mlp"), torch.einsum("l,bld->bd", lam, st.mlp_out.to(dt))))
        return pool_w, raw_mats, consts

    def _vector_norm(self, step: VectorNorm, ro: ReadoutMap, consts: Consts) -> tuple[ReadoutMap, Consts]:
        norm = NormRule.of(step.norm, "fc_norm")
        s = norm.inv_sigma(self.seen[id(step)]).to(ro.weight)  # [B]
        weight = ro.weight * (s[:, None, None] if ro.dense else s[:, None])
        consts = [(lab, s[:, None] * norm.left(c.T).T) for lab, c in consts]
        if norm.bias is not None:
            consts.append((ComponentLabel(step.kind), norm.bias.to(ro.mats).expand(weight.shape[0], -1)))
        return ReadoutMap(weight, ro.mats, ro.positions, ro.slot, ro.factors).then(norm.left), consts

    def _linear(self, step: Linear, ro: ReadoutMap, consts: Consts) -> tuple[ReadoutMap, Consts]:
        w = step.weight.to(ro.mats)
        consts = [(lab, c @ w.T) for lab, c in consts]
        if step.bias is not None:
            consts.append((ComponentLabel(step.kind), step.bias.to(ro.mats).expand(ro.weight.shape[0], -1)))
        return ro.then(lambda m: torch.einsum("od,...di->...oi", w, m)), consts
