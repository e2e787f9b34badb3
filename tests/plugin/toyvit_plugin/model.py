"""The package's own ViT: pre-norm blocks, a class token, the class token after the final norm."""

from __future__ import annotations

import torch
from torch import nn


class ToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.probs = nn.Identity()  # the attention probabilities pass through here
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = self.probs((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1))
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ToyAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyViT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 8, size: int = 32) -> None:
        super().__init__()
        self.patch_size = patch
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]
