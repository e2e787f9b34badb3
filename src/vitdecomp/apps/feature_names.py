"""Names for sparse-autoencoder latents, read through the aligner.

A latent's decoder row ``d_j`` (what it adds to the representation) is mapped into CLIP space as the
whole representation is mapped (:func:`vitdecomp.align.whole_map`: ``t_j = M d_j``; the identity for
a CLIP subject) and read against the candidate texts: every value of the analysis' features and
every entry of its TextSpan vocabulary, each embedded by the reader under the analysis' prompt
templates and centred within its group (a feature's values, or the vocabulary), so that what all of a
group's texts share ("an object", "a photo") does not pick the name. The name is the candidate of
highest cosine with ``t_j``; :func:`name_in` reads the same inside one group (e.g. "which colour").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vitdecomp.apps.analysis import Analysis
from vitdecomp.text import load_vocabulary

#: The group of the vocabulary's entries.
VOCABULARY = "vocabulary"


@dataclass
class Candidates:
    """Texts a latent may be named by: ``texts[i]`` of group ``groups[i]`` (a feature, or
    ``"vocabulary"``), its direction ``directions[i]`` (``[V, d_clip]``, unit, centred in its group)."""

    texts: list[str]
    groups: list[str]
    directions: Tensor

    def of_group(self, group: str) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g == group]


@dataclass
class Name:
    """A latent's name: the text, its group and its cosine with the latent's CLIP-space direction."""

    text: str
    group: str
    cosine: float
    index: int


def centred(emb: Tensor) -> Tensor:
    """Unit embeddings ``[V, d]`` minus their mean, unit again: what tells each text from its group."""
    unit = torch.nn.functional.normalize(emb.float(), dim=-1)
    return torch.nn.functional.normalize(unit - unit.mean(0, keepdim=True), dim=-1)


def candidates(
    features: Mapping[str, Sequence[str]], vocabulary: Sequence[str], embed: Callable[[list[str]], Tensor]
) -> Candidates:
    """Every value of ``features`` (``{feature: values}``) and every ``vocabulary`` entry not already a
    value; ``embed``: texts -> ``[T, d_clip]`` (the reader's text tower under the analysis' templates)."""
    texts, groups, dirs = [], [], []
    for feature, values in features.items():
        texts += list(values)
        groups += [feature] * len(values)
        dirs.append(centred(embed(list(values))))
    seen = set(texts)
    entries = [e for e in vocabulary if e not in seen]
    if len(entries) > 1:
        texts += entries
        groups += [VOCABULARY] * len(entries)
        dirs.append(centred(embed(entries)))
    return Candidates(texts, groups, torch.cat(dirs))


def analysis_candidates(analysis: Analysis) -> Candidates:
    """The analysis' feature values and vocabulary entries, embedded by its reader."""
    name = analysis.result.vocabulary.name
    return candidates(analysis.result.features, load_vocabulary(name) if name else [], analysis.embed)


def latent_directions(decoder: Tensor, to_clip: Tensor) -> Tensor:
    """``[L, d_clip]``: decoder rows ``[L, D]`` mapped by the whole map ``to_clip [d_clip, D]``, unit."""
    return torch.nn.functional.normalize(decoder.float() @ to_clip.float().T, dim=-1)


def name_latents(directions: Tensor, cands: Candidates) -> list[Name]:
    """The best candidate for each latent's CLIP-space direction ``[L, d_clip]``."""
    sim = directions.float() @ cands.directions.T  # [L, V]
    best = sim.argmax(1)
    return [Name(cands.texts[i], cands.groups[i], float(sim[j, i]), int(i)) for j, i in enumerate(best.tolist())]


def name_in(direction: Tensor, cands: Candidates, group: str) -> str:
    """The best candidate of ``group`` for one CLIP-space direction ``[d_clip]``."""
    where = cands.of_group(group)
    return cands.texts[where[int((cands.directions[where] @ direction.float()).argmax())]]
