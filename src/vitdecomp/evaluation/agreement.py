"""How two rankings of the components agree: :func:`spearman`, and the paper's CLIP-derived ranking
(:func:`clip_retrieval_scores`) that its scoring function was checked against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitdecomp.align import Aligner
from vitdecomp.store import RowSource, as_rows


def spearman(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float]) -> float:
    """Spearman rank correlation of two score vectors (average ranks for ties)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64).flatten()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # average ranks within ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(torch.as_tensor(a)), ranks(torch.as_tensor(b))
    if ra.shape != rb.shape:
        raise ValueError(f"score vectors differ in length: {ra.shape} vs {rb.shape}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


@torch.no_grad()
def clip_retrieval_scores(
    source: RowSource,
    aligner: Aligner,
    text_emb: torch.Tensor,
    top_k: int = 20,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """A CLIP-derived importance of each component for one feature ``[C]`` (the paper's check).

    For every description ``s`` of the feature, each component retrieves the ``top_k`` images with
    the largest ``<f_i(c_i(x)), t_s>``; its score is CLIP's own mean cosine ``cos(z_CLIP(x), t_s)``
    over those images, averaged over descriptions. ``source`` must hold the reader's image
    embeddings (rows of a store, or a tuple ``(contributions [N, C, D], clip [N, d_clip])``). This is
    our reading of the paper's "CLIP score" used for its Spearman check against the scoring function.
    """
    t = torch.nn.functional.normalize(text_emb.float(), dim=-1).to(aligner.device)  # [K, d]
    comp_sims, clip_sims = [], []
    for b in as_rows(source).iter_batches(batch_size):
        c, z = b["contributions"], b["clip"]
        comp_sims.append(aligner.apply(c) @ t.T)  # [b, C, K]
        clip_sims.append(torch.nn.functional.normalize(z.float().to(t.device), dim=-1) @ t.T)  # [b, K]
    comp, clip = torch.cat(comp_sims), torch.cat(clip_sims)
    k = min(top_k, comp.shape[0])
    idx = comp.topk(k, dim=0).indices  # [k, C, K]
    picked = clip[idx, torch.arange(clip.shape[1], device=clip.device)]  # [k, C, K]
    return picked.mean((0, 2)).cpu()
