"""Input embeddings of the MMDiT: patches + cropped 2-D sin-cos positions, timestep, pooled text.

SD3 paper (arXiv 2403.03206) Fig. 2a; official: Stability-AI/sd3.5 `mmditx.py` (PatchEmbed,
TimestepEmbedder, VectorEmbedder, cropped_pos_embed); diffusers: `models/embeddings.py`
(PatchEmbed, CombinedTimestepTextProjEmbeddings).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange


def sincos_2d_table(dim: int, grid: int, base: int) -> torch.Tensor:
    """(grid*grid, dim) sin-cos table; positions are arange(grid) * base / grid (diffusers' base_size rule).

    Only used to initialise a fresh model: checkpoints carry the table (`pos_embed`), so loaded
    models use the published values.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position table needs hidden size divisible by 4, got {dim}")
    pos = torch.arange(grid, dtype=torch.float64) / (grid / base)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    def axis(p):  # (grid, dim/2): [sin | cos]
        a = p[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)
    ys, xs = torch.meshgrid(pos, pos, indexing="ij")  # row index = y
    # the first half encodes x (width), the second y, as the reference implementations do
    emb = torch.cat([axis(xs.reshape(-1)), axis(ys.reshape(-1))], dim=1)
    return emb.float()


class PatchEmbed(nn.Module):
    """Latents (B, C, H, W) -> tokens (B, N, D) plus the centre crop of the position table."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int, max_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.max_size = max_size
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, latents: torch.Tensor, pos_table: torch.Tensor) -> torch.Tensor:
        B, C, H, W = latents.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
        h, w = H // p, W // p
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"latent {H}x{W} gives a {h}x{w} token grid, larger than the {self.max_size}x{self.max_size} "
                f"position table (at most {self.max_size * p * 8}x{self.max_size * p * 8} pixels)"
            )
        # contiguous: the transposed view would stay feature-major through every block (slow LayerNorm
        # copies and mixed-layout residual adds; bench/RESULTS.md measured 9% of a CPU forward)
        x = rearrange(self.proj(latents), "b d h w -> b (h w) d").contiguous()  # (B, N, D)
        return x + crop_pos_embed(pos_table, self.max_size, h, w).to(x.dtype)


def crop_pos_embed(table: torch.Tensor, max_size: int, h: int, w: int) -> torch.Tensor:
    """Centre (h, w) crop of the (1, max*max, D) table -> (1, h*w, D); top = (max - h) // 2 as mmditx.py."""
    top, left = (max_size - h) // 2, (max_size - w) // 2
    grid = table.view(1, max_size, max_size, -1)[:, top : top + h, left : left + w]
    return grid.reshape(1, h * w, -1)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps in [0, 1000] -> (B, dim) [cos | sin] features, computed in float32.

    float32 on purpose: both the official code and diffusers compute these in float32 whatever the
    model dtype (flip_sin_to_cos=True, downscale_freq_shift=0 in diffusers' terms).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; used for the timestep (`t_embedder`) and pooled text (`y_embedder`)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
