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
    """Per-sample adaLN parameters of one sub-layer, each (B, D)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None  # None where the sub-layer has no gated residual (final layer)


@dataclass
class StreamModulations:
    """One stream's modulations, by the sub-layer they drive."""

    attn: Modulation
    mlp: Modulation | None = None  # None in the pre-only last context stream
    attn2: Modulation | None = None  # SD3.5 MMDiT-X second image attention


def modulate(x: torch.Tensor, mod: Modulation) -> torch.Tensor:
    """x * (1 + scale) + shift, in one pass over x (addcmul: one rounding in bf16/fp16)."""
    return torch.addcmul(mod.shift[:, None], x, 1 + mod.scale[:, None])


def gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gated residual x + gate * y (gate (B, D) per sample), in one pass."""
    return torch.addcmul(x, gate[:, None], y)


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
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, qk_norm, pre_only=pre_only)
        if dual_attention:
            self.attn2 = SelfAttention(dim, num_heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, mlp_hidden)
        self.num_mods = 2 if pre_only else (9 if dual_attention else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.num_mods * dim))

    def modulations(self, vec: torch.Tensor) -> StreamModulations:
        """vec (B, D) -> adaLN output split in the official order: (shift, scale, gate) for attn, mlp
        [, attn2]; the pre-only stream has (shift, scale) for attn only."""
        chunks = self.adaLN_modulation(vec).chunk(self.num_mods, dim=-1)
        if self.pre_only:
            return StreamModulations(Modulation(*chunks))
        return StreamModulations(*(Modulation(*chunks[i : i + 3]) for i in range(0, self.num_mods, 3)))


class JointBlock(nn.Module):
    """Both streams attend jointly over [context; image] tokens, each with its own weights."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: str | None = None,
                 context_pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.context_block = StreamBlock(dim, num_heads, mlp_hidden, qk_norm, pre_only=context_pre_only)
        self.x_block = StreamBlock(dim, num_heads, mlp_hidden, qk_norm, dual_attention=dual_attention)

    keep_attn_probs = False  # analysis: MMDiT.forward sets it on one block for Capture(attn_probs_of=i)

    def forward(self, ctx: torch.Tensor, x: torch.Tensor, vec: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ctx (B, L, D), x (B, N, D), vec (B, D) -> (ctx or None after the last block, x)."""
        c, xb = self.context_block, self.x_block
        c_mod, x_mod = c.modulations(vec), xb.modulations(vec)
        L = ctx.shape[1]

        # joint attention over [context; image] tokens, each stream with its own q, k, v
        c_qkv = c.attn.qkv_heads(modulate(c.norm1(ctx), c_mod.attn))  # (3, B, H, L, Dh)
        x_norm = xb.norm1(x)
        x_qkv = xb.attn.qkv_heads(modulate(x_norm, x_mod.attn))  # (3, B, H, N, Dh)
        # context tokens first, as mmditx.py (diffusers joins image first: equal up to float rounding). The cat
        # writes q, k, v contiguous per head, on which the CPU flash kernel ran 6% faster than on token-major
        # views of the projection (bench/RESULTS.md)
        q, k, v = torch.cat([c_qkv, x_qkv], dim=3)  # (B, H, L+N, Dh) each
        if self.keep_attn_probs:
            self.attn_probs = attention_probs(q, k)  # (B, H, L+N, L+N)
        attn = attention(q, k, v)  # (B, L+N, D)

        # image stream: gated residuals of the joint attention, [SD3.5: a second, image-only attention], MLP
        x = gated(x, x_mod.attn.gate, xb.attn.proj(attn[:, L:]))
        if x_mod.attn2 is not None:
            attn2 = attention(*xb.attn2.qkv_heads(modulate(x_norm, x_mod.attn2)))  # (B, N, D)
            x = gated(x, x_mod.attn2.gate, xb.attn2.proj(attn2))
        x = gated(x, x_mod.mlp.gate, xb.mlp(modulate(xb.norm2(x), x_mod.mlp)))

        if c.pre_only:  # last block: the text stream's output is never used
            return None, x
        ctx = gated(ctx, c_mod.attn.gate, c.attn.proj(attn[:, :L]))
        ctx = gated(ctx, c_mod.mlp.gate, c.mlp(modulate(c.norm2(ctx), c_mod.mlp)))
        return ctx, x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> LayerNorm -> Linear to patch values."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        mod = Modulation(*self.adaLN_modulation(vec).chunk(2, dim=-1))  # (shift, scale), official order
        return self.linear(modulate(self.norm_final(x), mod))
