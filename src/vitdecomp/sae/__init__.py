"""Sparse autoencoders on a model's representation: the SAE and the exact split of its latents over
the representation's parts (:mod:`~vitdecomp.sae.model`), its files — vitdecomp's own, saev's,
ViT-Prisma's and sae-lens' (:mod:`~vitdecomp.sae.formats`) — and training one on an analysis' store
with the ``overcomplete`` library (:mod:`~vitdecomp.sae.training`, imported on use)."""

from vitdecomp.sae.formats import check_fits, load_sae, save_sae
from vitdecomp.sae.model import SparseAutoencoder, split_blocks

__all__ = ["SparseAutoencoder", "check_fits", "load_sae", "save_sae", "split_blocks"]
