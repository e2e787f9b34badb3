"""The zoo's training and evaluation data: scenes as tensors, the models' pixel scaling, labels,
augmentations and the order an epoch visits the scenes in."""

from __future__ import annotations

import numpy as np
import torch

from vitdecomp.world.attributes import ATTRIBUTES, CORE_ATTRIBUTES

#: The pixel mean and std of the zoo CLIP's preprocessing (OpenAI CLIP's); the timm models use 0.5 / 0.5.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 tensor [N, 3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def normalize(x: torch.Tensor, clip: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, scaled as the zoo model's preprocessing does (pixel scaling, not L2)."""
    mean, std = (OPENAI_MEAN, OPENAI_STD) if clip else (0.5, 0.5)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) if clip else mean
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1) if clip else std
    return (x.float() / 255.0 - m) / s


def labels_of(scenes) -> torch.Tensor:
    """int64 [N, 4]: the scenes' core attributes (``CORE_ATTRIBUTES`` order)."""
    return torch.from_numpy(np.stack([scenes.attributes[k] for k in CORE_ATTRIBUTES], 1))


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (per image, probability 1/2) on [B, 3, H, W]."""
    f = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)


def gray(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Random grayscale (per image, probability ``p``) on uint8 [B, 3, H, W]."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    lum = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(x.dtype).expand_as(x)
    f = torch.rand(x.shape[0], generator=g) < p
    return torch.where(f.view(-1, 1, 1, 1), lum, x)


def group_keys(scenes, groupings: tuple[tuple[str, ...], ...]) -> np.ndarray:
    """``[G, N]``: per grouping, one integer per scene naming its combination of the grouping's values."""
    keys = np.zeros((len(groupings), len(scenes)), dtype=np.int64)
    for i, attributes in enumerate(groupings):
        for k in attributes:
            keys[i] = keys[i] * len(ATTRIBUTES[k]) + scenes.attributes[k]
    return keys


def epoch_order(n: int, g: torch.Generator, keys: np.ndarray | None = None, group_size: int = 1) -> torch.Tensor:
    """The epoch's sample order: a permutation, or (``keys`` from :func:`group_keys`) runs of
    ``group_size`` scenes sharing the attributes of one grouping, the runs shuffled. The shuffled
    scenes are split evenly between the groupings; scenes left over from a combination's last run are
    dropped for the epoch (a batch of ``batch_size`` holds ``batch_size / group_size`` runs)."""
    perm = torch.randperm(n, generator=g)
    if keys is None:
        return perm
    runs = []
    for key, part in zip(keys, np.array_split(perm.numpy(), len(keys)), strict=True):
        for value in np.unique(key[part]):
            members = part[key[part] == value]
            usable = len(members) // group_size * group_size
            if usable:  # a combination with fewer than group_size scenes gives no run
                runs.extend(np.split(members[:usable], usable // group_size))
    order = torch.randperm(len(runs), generator=g).tolist()
    return torch.from_numpy(np.concatenate([runs[i] for i in order]))
