"""Directional token maps: each head's per-source-token contribution projected on a few directions,
without ever forming the per-token contributions.

With the attention probabilities and every norm's statistics frozen, head ``h``'s contribution from
source token ``n`` to the representation is (see :class:`~vitdecomp.decomp.branches.HeadsPart`)::

    c[h, n] = sum_k abar[h, k, n] * M_k W_h v[h, n]          (M_k = ro.mats[k], W_h = out_weight[:, h])

so its projection on a direction ``u [D_out]`` is ``sum_k abar[h, k, n] * (W_h^T M_k^T u) . v[h, n]``.
The direction is pulled back through the (small) readout matrices once per head and slot
(``g [K, H, k, dh]``), and only then meets the tokens: ``[B, H, N, k]`` at the cost of a few small
matmuls, where the full contributions are ``[B, H, N, D_out]`` and need every token's vector read out
through every downstream matrix. Exact: equal to projecting the full token contributions.

Directions may differ per head (a per-component aligner ``W_i`` pulls a CLIP-space direction ``t``
back to ``W_i^T t`` in the model's space): :class:`TokenDirections` holds either one ``[k, D_out]``
tensor for every head or a function of the head's label.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vitdecomp.components import ComponentLabel
from vitdecomp.decomp.branches import HeadsPart
from vitdecomp.decomp.readout import ReadoutMap
from vitdecomp.errors import VitDecompError

#: Elements of the largest intermediate (``[H, B', N, k, dh]`` or ``[H, B', N, K, k]``) built at once.
CHUNK_ELEMENTS = 1 << 24


class TokenDirections:
    """``k`` directions in the representation space, the same for every head (``[k, D_out]``) or per
    head (``fn(label) -> [k, D_out]``)."""

    def __init__(self, directions: Tensor | Callable[[ComponentLabel], Tensor]) -> None:
        if isinstance(directions, Tensor):
            if directions.ndim == 1:
                directions = directions[None]
            if directions.ndim != 2:
                raise VitDecompError(f"token directions must be [k, D] (or [D]), not {tuple(directions.shape)}")
        self.directions = directions
        self._ro: ReadoutMap | None = None  # the readout map the cached pull-back was made for
        self._shared: Tensor | None = None

    def shared_through(self, ro: ReadoutMap) -> Tensor | None:
        """``[K, k, D_s]``: the directions pulled back through ``ro``'s slot matrices when they are the
        same for every head (``None`` otherwise); computed once per readout map (blocks of a stage
        share one), through its factors or chain (its slot matrices are never formed)."""
        if not isinstance(self.directions, Tensor):
            return None
        if self._ro is not ro:
            self._ro, self._shared = ro, ro.pull_rows(self.directions)
        return self._shared

    def width(self, labels: list[ComponentLabel]) -> int:
        """``k``, the number of directions (read off the first head's when given per head)."""
        if isinstance(self.directions, Tensor):
            return self.directions.shape[0]
        return int(torch.as_tensor(self.directions(labels[0])).shape[0])

    def for_heads(self, labels: list[ComponentLabel]) -> Tensor:
        """``[H, k, D_out]`` for the heads ``labels`` of one attention branch."""
        if isinstance(self.directions, Tensor):
            return self.directions[None].expand(len(labels), -1, -1)
        return torch.stack([torch.as_tensor(self.directions(lab)) for lab in labels])


def pulled_back(part: HeadsPart, ro: ReadoutMap, dirs: Tensor, shared: Tensor | None = None) -> Tensor:
    """``g [K, H, k, dh]``: directions ``dirs [H, k, D_out]`` pulled back through each readout slot's
    matrix and the head's output projection (norm gains, centring and layer scale folded in).
    ``shared [K, k, D_s]``: the directions already pulled back through the slot matrices, when every
    head has the same ones (then ``dirs`` is not read)."""
    w = part.out_weight(ro.like)  # [D_s, H, dh]
    if shared is not None:
        return torch.einsum("kjd,dhe->khje", shared, w)
    h, k, _ = dirs.shape
    um = ro.pull_rows(dirs.reshape(h * k, -1)).view(-1, h, k, w.shape[0])  # [K, H, k, D_s]
    return torch.einsum("khjd,dhe->khje", um, w)


def head_token_projections(part: HeadsPart, ro: ReadoutMap, dirs: Tensor, shared: Tensor | None = None) -> Tensor:
    """``[B, H, N, k]``: the projection of each head's contribution from each source token (stream
    order) on each direction ``dirs [H, k, D_out]``; summing over ``N`` gives the projection of the
    head's contribution. Needs a pass with token capture (``part.want_tokens``)."""
    if part.v is None:
        raise VitDecompError(f"'{part.path}': directional token maps need the pass's attention values")
    g = pulled_back(part, ro, dirs, shared)  # [K, H, k, dh]
    if _by_queries(part, ro):
        out, keys = _through_queries(part, ro, g), part.index.reshape(-1)  # keys in window order
    else:
        at, keys = part.key_parts(ro)  # [H, B, N', K], keys in the attention's order (as the values are kept)
        out = _through_slots(at.to(g), g, part.v.to(g).transpose(0, 1))  # [H, B, N', k]
    out = out.transpose(0, 1)
    if keys is None:
        return out
    full = out.new_zeros(out.shape[0], out.shape[1], part.n_tokens, out.shape[-1])
    full[:, :, keys.to(out.device)] = out
    return full


def _through_slots(at: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """``[H, B, N, k]``: ``sum_K at[h, b, n, K] sum_e g[K, h, j, e] v[h, b, n, e]``, one GEMM per head and
    batch chunk (bounded memory). Few slots: ``v`` meets ``g`` first (``[.., K, k]`` per token); many
    (``K >= dh``, Swin's stage 0): the slots are folded into ``g`` first (``[.., k, dh]`` per token)."""
    k_slots, h, k, dh = g.shape
    if k_slots == 1:
        return torch.einsum("hbne,hje->hbnj", v, g[0]).mul_(at)
    b, n = at.shape[1], at.shape[2]
    out = v.new_empty(h, b, n, k)
    fold = k_slots >= dh
    gh = g.permute(1, 0, 2, 3).reshape(h, k_slots, k * dh) if fold else g.permute(1, 3, 0, 2).reshape(h, dh, -1)
    step = max(1, CHUNK_ELEMENTS // max(1, h * n * k * (dh if fold else k_slots)))
    for s in range(0, b, step):
        e = min(b, s + step)
        if fold:
            per_token = torch.matmul(at[:, s:e].reshape(h, -1, k_slots), gh).view(h, e - s, n, k, dh)
            out[:, s:e] = per_token.mul_(v[:, s:e, :, None]).sum(-1)
        else:
            per_slot = torch.matmul(v[:, s:e].reshape(h, -1, dh), gh).view(h, e - s, n, k_slots, k)
            out[:, s:e] = per_slot.mul_(at[:, s:e, :, :, None]).sum(-2)
    return out


def _by_queries(part: HeadsPart, ro: ReadoutMap) -> bool:
    """Windowed attention read through one slot per token, with at least as many slots as a window has
    queries (Swin's stage 0: 64 slots, 49 queries): cheaper query by query than slot by slot."""
    windows = part.spec.windows is not None and part.index is not None
    return windows and ro.slot is not None and not ro.dense and ro.num_slots >= part.index.shape[1]


def _through_queries(part: HeadsPart, ro: ReadoutMap, g: Tensor) -> Tensor:
    """``[H, B, N', k]`` (keys in window order): ``sum_q A[q, n] w_q g[slot(q)] . v[n]`` per window, the
    queries' pulled-back directions ``g [K, H, k, dh]`` gathered by slot and met by the window's
    probabilities (one GEMM per window chunk), so the ``[H, B, N, K]`` key weights are never formed."""
    wq, slots = part.window_query_weights(ro)  # [B, nW, w], [nW, w]
    probs = part.probs.to(g)  # [B, nW, H, w_q, w_k]
    b, nw, h, w, _ = probs.shape
    k, dh = g.shape[2], g.shape[3]
    gq = g.permute(1, 0, 2, 3).reshape(h, -1, k * dh)  # [H, K, k*dh]
    v = part.v.to(g).view(b, h, nw, w, dh)  # window order
    wq = wq.to(g).permute(1, 0, 2)[:, None, :, None, :]  # [nW, 1, B, 1, w_q]
    out = v.new_empty(h, b, nw, w, k)
    step = max(1, CHUNK_ELEMENTS // (h * b * w * k * dh))
    for s in range(0, nw, step):
        e = min(nw, s + step)
        at = v.new_empty(e - s, h, b, w, w)  # [c, H, B, key, query]
        torch.mul(probs[:, s:e].permute(1, 2, 0, 4, 3), wq[s:e], out=at)
        gw = gq[:, slots[s:e].to(gq.device)].transpose(0, 1)  # [c, H, w_q, k*dh]
        r = torch.matmul(at.view(e - s, h, b * w, w), gw).view(e - s, h, b, w, k, dh)
        r = r.mul_(v[:, :, s:e].permute(2, 1, 0, 3, 4)[..., None, :]).sum(-1)  # [c, H, B, key, k]
        out[:, :, s:e] = r.permute(1, 2, 0, 3, 4)
    return out.view(h, b, nw * w, k)
