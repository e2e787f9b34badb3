"""Where in its top images a sparse-autoencoder latent is written: token maps through the directional
token-map machinery.

A latent's pre-activation is ``a_j = g(r) u_j . r + const`` with ``u_j`` its encoder row in the
representation space (:meth:`~vitdecomp.sae.SparseAutoencoder.directions`) and ``g(r) > 0`` the
image's input gain. So every head's per-source-token contribution projected on ``u_j`` (one pass
with ``token_directions``, :func:`vitdecomp.api.decompose`) says how much each token, through each
head, adds to the latent; summed over the heads and placed on the tokens' pixel footprints
(:class:`~vitdecomp.apps.token_maps.TokenMaps`), it is the latent's map (red: raises it, blue:
lowers it; the MLPs and the embedding are not split over tokens, so they are not in the map).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vitdecomp.api import decompose
from vitdecomp.apps.analysis import Analysis, image_loader
from vitdecomp.apps.heatmap import overlay
from vitdecomp.apps.pixels import input_geometry
from vitdecomp.apps.token_maps import TokenMaps
from vitdecomp.figures import image_png, png_data_uri
from vitdecomp.results import AppFigure
from vitdecomp.sae import SparseAutoencoder

#: Longest side of a map's picture in the report (pixels).
MAP_SIZE = 112


@torch.no_grad()
def latent_maps(
    analysis: Analysis,
    sae: SparseAutoencoder,
    picks: dict[int, list[int]],
    ids: list[str],
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, list[AppFigure]]:
    """For each latent ``j`` of ``picks`` (latent -> rows of its top images), its map on each of those
    images over the image (``ids``: the analysed images' ids), as report figures."""
    latents = [j for j, rows in picks.items() if rows]
    if not latents:
        return {}
    dirs, col = sae.directions()[latents], {j: i for i, j in enumerate(latents)}
    wanted = sorted({r for j in latents for r in picks[j]})
    load, subject = image_loader([ids[r] for r in wanted], analysis.result.images.root), analysis.subject
    device = next(subject.model.parameters()).device
    pictures: dict[tuple[int, int], AppFigure] = {}
    bar = tqdm(total=len(wanted), desc="latent maps", unit="img", leave=False, disable=not progress)
    for s in range(0, len(wanted), batch_size):
        chunk = wanted[s : s + batch_size]
        images = [load(ids[r]).convert("RGB") for r in chunk]
        x = torch.stack([subject.preprocess(im) for im in images]).to(device)
        d = decompose(subject, x, tokens=True, start_layer=analysis.result.start_layer or 0, token_directions=dirs)
        px = TokenMaps.of(d, tuple(x.shape[-2:])).pixels().float().cpu()  # [B, k, H, W]
        for b, (r, im) in enumerate(zip(chunk, images, strict=True)):
            geometry = input_geometry(subject.preprocess, (im.height, im.width))
            for j in (j for j in latents if r in picks[j]):
                back = geometry.to_original(px[b, col[j]][None])[0].numpy()
                pictures[j, r] = AppFigure(png_data_uri(image_png(overlay(im, back, MAP_SIZE))), ids[r])
        bar.update(len(chunk))
    bar.close()
    return {j: [pictures[j, r] for r in picks[j]] for j in latents}
