"""Analytic FLOP counts (FLOPs = 2 x multiply-accumulates) for the three phases of SD3 inference.

Counted: every Linear and Conv2d on the tokens / pixels it actually sees, and attention's two
batched matmuls (Q K^T and P V: 4 * S^2 * D FLOPs for S tokens of total width D). Not counted:
norms, activations, softmax, residual adds, RNG -- elementwise work that is memory-bound and small
in FLOPs. So `flops / matmul rate` is a floor no implementation can beat, and measured / floor says
how much of the time is not spent at matmul speed.

`benchmark.py` cross-checks these formulas against `torch.utils.flop_counter.FlopCounterMode` run on
the meta device (same counting rules: mm/addmm/bmm/conv/SDPA, nothing elementwise).
"""
from __future__ import annotations

from dataclasses import dataclass

from flashsd3.config import FLASH_SD3_ADAPTER  # rank 64; which diffusers layers it adapts: flash_lora_flops


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def conv(h_out: int, w_out: int, c_in: int, c_out: int, k: int) -> int:
    return 2 * h_out * w_out * c_in * c_out * k * k


def attention(batch: int, tokens: int, width: int) -> int:
    return 4 * batch * tokens * tokens * width  # Q K^T and P V, all heads together


@dataclass(frozen=True)
class MMDiTShape:
    depth: int
    hidden: int
    mlp_hidden: int
    patch: int
    in_channels: int
    context_dim: int
    pooled_dim: int


def mmdit_flops(s: MMDiTShape, batch: int, lat_h: int, lat_w: int, ctx_tokens: int) -> int:
    """One transformer forward on (batch, C, lat_h, lat_w) latents and ctx_tokens text tokens."""
    D, N, L = s.hidden, (lat_h // s.patch) * (lat_w // s.patch), ctx_tokens
    p2c = s.patch * s.patch * s.in_channels
    per_token = 4 * D * D + 2 * D * s.mlp_hidden  # qkv (3 D^2) + proj (D^2) + fc1 + fc2, as MACs
    f = batch * (linear(N, p2c, D) + linear(L, s.context_dim, D))  # patch embed, context embedder
    f += batch * (linear(1, 256, D) + linear(1, D, D) + linear(1, s.pooled_dim, D) + linear(1, D, D))
    for i in range(s.depth):
        last = i == s.depth - 1  # the last context stream only makes q, k, v (no proj, no MLP)
        f += batch * 2 * N * per_token + batch * (linear(L, D, 3 * D) if last else 2 * L * per_token)
        f += batch * (linear(1, D, 6 * D) + linear(1, D, (2 if last else 6) * D))  # adaLN
        f += attention(batch, N + L, D)
    f += batch * (linear(1, D, 2 * D) + linear(N, D, p2c))  # final adaLN + linear
    return f


def flash_lora_flops(s: MMDiTShape, batch: int, lat_h: int, lat_w: int, ctx_tokens: int,
                     rank: int = FLASH_SD3_ADAPTER.rank) -> int:
    """Extra FLOPs of the Flash adapter run unmerged (x -> A -> B on every adapted layer).

    Adapted (diffusers names): pos_embed.proj; time/text embedder linear_1/2; per block to_q/k/v,
    to_out.0, ff.net.0.proj, ff.net.2, ff_context.net.0.proj (not in the pre-only last block),
    norm1.linear, norm1_context.linear; norm_out.linear; proj_out. Not: add_*_proj, to_add_out,
    ff_context.net.2, context_embedder.
    """
    D, H, N, L = s.hidden, s.mlp_hidden, (lat_h // s.patch) * (lat_w // s.patch), ctx_tokens
    p2c = s.patch * s.patch * s.in_channels

    def lora(tokens, d_in, d_out):
        return linear(tokens, d_in, rank) + linear(tokens, rank, d_out)

    f = lora(N, p2c, D) + lora(1, 256, D) + lora(1, D, D) + lora(1, s.pooled_dim, D) + lora(1, D, D)
    for i in range(s.depth):
        last = i == s.depth - 1
        f += 4 * lora(N, D, D) + lora(N, D, H) + lora(N, H, D)  # to_q/k/v/out, ff
        f += 0 if last else lora(L, D, H)  # ff_context.net.0.proj
        f += lora(1, D, 6 * D) + lora(1, D, (2 if last else 6) * D)  # norm1 / norm1_context
    f += lora(1, D, 2 * D) + lora(N, D, p2c)
    return batch * f


def vae_decode_flops(block_out_channels: tuple[int, ...], layers_per_block: int, latent_channels: int,
                     out_channels: int, batch: int, lat_h: int, lat_w: int, mid_attention: bool = True) -> int:
    """One VAE decode of (batch, latent_channels, lat_h, lat_w): the LDM decoder (diffusers Decoder)."""
    ch = block_out_channels[::-1]
    h, w = lat_h, lat_w

    def resnet(c_in, c_out):
        f = conv(h, w, c_in, c_out, 3) + conv(h, w, c_out, c_out, 3)
        return f + (conv(h, w, c_in, c_out, 1) if c_in != c_out else 0)

    f = conv(h, w, latent_channels, ch[0], 3) + 2 * resnet(ch[0], ch[0])  # conv_in, mid resnets
    if mid_attention:  # single head over h*w pixels: q, k, v, out projections + the two matmuls
        f += 4 * linear(h * w, ch[0], ch[0]) + attention(1, h * w, ch[0])
    for i, c in enumerate(ch):
        for j in range(layers_per_block + 1):
            f += resnet(ch[i - 1] if (j == 0 and i > 0) else c, c)
        if i < len(ch) - 1:  # nearest x2, then a 3x3 conv at the new size
            h, w = 2 * h, 2 * w
            f += conv(h, w, c, c, 3)
    f += conv(h, w, ch[-1], out_channels, 3)
    return batch * f


def clip_flops(layers: int, hidden: int, intermediate: int, projection: int, batch: int, tokens: int = 77) -> int:
    """One CLIP text encoder (all layers run; SD3 reads the penultimate hidden state and the pooled EOS)."""
    per_layer = linear(tokens, hidden, 4 * hidden) + 2 * linear(tokens, hidden, intermediate)
    return batch * (layers * per_layer + linear(1, hidden, projection)) + layers * attention(batch, tokens, hidden)
