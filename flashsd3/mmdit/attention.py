"""Joint attention: the only caller of scaled_dot_product_attention in the MMDiT.

Pick kernels with `torch.nn.attention.sdpa_kernel(...)` around the model call; nothing here
chooses a backend.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: (B, H, S, Dh) -> (B, S, H*Dh). Softmax and accumulation run in float32 inside SDPA whatever the
    input dtype (its fused CPU and CUDA kernels do), so bf16/fp16 attention keeps float32 scores."""
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, S, Dh)
    return rearrange(out, "b h s d -> b s (h d)")


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(Dh)): (B, H, S, S). For analysis only (memory S^2)."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1)


class SelfAttention(nn.Module):
    """One stream's attention parameters: fused qkv, optional per-head q/k RMSNorm (SD3.5), output proj."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None = None, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        head_dim = dim // num_heads
        if qk_norm == "rms_norm":
            self.ln_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.ln_k = nn.RMSNorm(head_dim, eps=1e-6)
        else:
            self.ln_q = self.ln_k = None
        # the last context block only feeds keys/values to the image stream: no output projection
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (3, B, H, S, Dh): q, k, v stacked (a view of the projection), q/k normalised if
        configured."""
        qkv = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.num_heads)
        if self.ln_q is None:
            return qkv
        q, k, v = qkv
        return torch.stack([self.ln_q(q), self.ln_k(k), v])
