"""MMDiT blocks: adaLN-Zero modulation, one stream's parameters, the joint block, the final layer.

SD3 paper (arXiv 2403.03206) Sec. 4 / Fig. 2b; official: Stability-AI/sd3.5 `mmditx.py`
(DismantledBlock, JointBlock, FinalLayer); diffusers: `models/attention.py` JointTransformerBlock
+ `attention_processor.py` JointAttnProcessor2_0. SD3.5's MMDiT-X blocks (a second, image-only
self-attention, `attn2`) are supported through `dual_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention import SelfAttention, attention, attention_probs


@dataclass
class Modulation:
    """Per-sample adaLN parameters, each (B, D)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None


def modulate(x: torch.Tensor, mod: Modulation) -> torch.Tensor:
    return x * (1 + mod.scale[:, None]) + mod.shift[:, None]


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, as timm's Mlp in mmditx.py."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class StreamBlock(nn.Module):
    """One stream's parameters in a joint block (official name: `x_block` / `context_block`)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: str | None,
                 pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.pre_only, self.dual_attention = pre_only, dual_attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, qk_norm, pre_only=pre_only)
        if dual_attention:
            self.attn2 = SelfAttention(dim, num_heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, mlp_hidden)
        self.num_mods = 2 if pre_only else (9 if dual_attention else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.num_mods * dim))

    def modulations(self, vec: torch.Tensor) -> list[Modulation]:
        """vec (B, D) -> [attn, mlp, attn2] modulations; the pre-only stream has only (shift, scale)."""
        return split_modulations(self.adaLN_modulation(vec), self.num_mods)

    def mlp_residual(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        return x + mod.gate[:, None] * self.mlp(modulate(self.norm2(x), mod))


def split_modulations(out: torch.Tensor, num_mods: int) -> list[Modulation]:
    """adaLN output (B, n*D) -> Modulations in official order (shift, scale, gate) per sub-layer."""
    chunks = out.chunk(num_mods, dim=-1)
    if num_mods == 2:
        return [Modulation(chunks[0], chunks[1])]
    return [Modulation(*chunks[i : i + 3]) for i in range(0, num_mods, 3)]


class JointBlock(nn.Module):
    """Both streams attend jointly over [context; image] tokens, each with its own weights."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: str | None = None,
                 context_pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.context_block = StreamBlock(dim, num_heads, mlp_hidden, qk_norm, pre_only=context_pre_only)
        self.x_block = StreamBlock(dim, num_heads, mlp_hidden, qk_norm, dual_attention=dual_attention)

    def forward(self, ctx: torch.Tensor, x: torch.Tensor, vec: torch.Tensor,
                probs: list | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ctx (B, L, D), x (B, N, D), vec (B, D) -> (ctx or None after the last block, x).

        If `probs` is a list, the attention probabilities (B, H, L+N, L+N) are appended to it.
        """
        c_mods = self.context_block.modulations(vec)
        x_mods = self.x_block.modulations(vec)
        L = ctx.shape[1]

        c_q, c_k, c_v = self.context_block.attn.qkv_heads(modulate(self.context_block.norm1(ctx), c_mods[0]))
        x_norm = self.x_block.norm1(x)
        x_q, x_k, x_v = self.x_block.attn.qkv_heads(modulate(x_norm, x_mods[0]))
        q, k, v = (torch.cat(pair, dim=2) for pair in ((c_q, x_q), (c_k, x_k), (c_v, x_v)))  # context first, as mmditx.py
        if probs is not None:
            probs.append(attention_probs(q, k))
        out = attention(q, k, v)  # (B, L+N, D)

        x = x + x_mods[0].gate[:, None] * self.x_block.attn.proj(out[:, L:])
        if self.x_block.dual_attention:  # SD3.5 MMDiT-X: image-only self-attention beside the joint one
            out2 = attention(*self.x_block.attn2.qkv_heads(modulate(x_norm, x_mods[2])))
            x = x + x_mods[2].gate[:, None] * self.x_block.attn2.proj(out2)
        x = self.x_block.mlp_residual(x, x_mods[1])

        if self.context_block.pre_only:  # last block: the text stream's output is never used
            return None, x
        ctx = ctx + c_mods[0].gate[:, None] * self.context_block.attn.proj(out[:, :L])
        ctx = self.context_block.mlp_residual(ctx, c_mods[1])
        return ctx, x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> LayerNorm -> Linear to patch values."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        (mod,) = split_modulations(self.adaLN_modulation(vec), 2)
        return self.linear(modulate(self.norm_final(x), mod))
