"""ControlNet for SD3 / SD3.5: a copy of the first MMDiT blocks that reads the control image's latents and
returns, per block, a residual for the transformer's image stream.

ControlNet (Zhang et al., arXiv 2302.05543) for the MMDiT. Official: Stability-AI/sd3.5 `dit_embedder.py`
ControlNetEmbedder (SD3.5-large ControlNets, image-only blocks) and `mmditx.py` MMDiTX.forward_core_with_concat
(how residuals are added); diffusers: `models/controlnets/controlnet_sd3.py` SD3ControlNetModel (InstantX's
SD3 ControlNets, joint blocks) and `transformer_sd3.py` (block_controlnet_hidden_states).

    x   = embed(latents) + pos_embed_input(control_latents)       # the transformer's embedding, or its own copy
    vec = t_embedder(t) + y_embedder(pooled, or zeros)            # as the MMDiT's
    for each block: x = block(x, vec)   [joint blocks also carry the text stream]
    residual_k = controlnet_blocks[k](x after block k) * scale    # zero-initialised projections
Parameter names: the MMDiT's (`joint_blocks`, `x_embedder`, ...) for joint blocks, Stability's for image-only
ones (`transformer_blocks.{i}.attn.qkv`, ...), `controlnet_blocks` and `pos_embed_input` in both layouts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ..mmdit.attention import attention
from ..mmdit.blocks import JointBlock, StreamBlock, modulate
from ..mmdit.embeddings import MLPEmbedder, PatchEmbed, sincos_2d_table, timestep_features
from .config import RESIDUAL_RULES, ControlNetConfig


class ImageBlock(StreamBlock):
    """An image-stream-only block: adaLN-Zero self-attention over the image tokens, then the MLP.
    Stability-AI/sd3.5 `mmditx.py` DismantledBlock.forward (no attn2, not pre-only); diffusers
    `transformer_sd3.py` SD3SingleTransformerBlock. Parameters as `StreamBlock` (one stream of a joint block)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__(dim, num_heads, mlp_hidden, qk_norm=None)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), vec (B, D) -> x (B, N, D)."""
        mod = self.modulations(vec)
        attn = attention(*self.attn.qkv_heads(modulate(self.norm1(x), mod.attn)))  # (B, N, D)
        x = x + mod.attn.gate[:, None] * self.attn.proj(attn)
        return x + mod.mlp.gate[:, None] * self.mlp(modulate(self.norm2(x), mod.mlp))


class ControlEmbed(nn.Module):
    """Control latents (B, C + extra, H, W) -> tokens (B, N, D): a patch convolution, no positions
    (diffusers' pos_embed_input: PatchEmbed with pos_embed_type None; Stability's: PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(latents), "b d h w -> b (h w) d")


class ControlNet(nn.Module):
    """An SD3 / SD3.5 ControlNet: `cn(latents, t, context, pooled, control_latents, scale)` -> ControlNetResiduals,
    for `MMDiT.forward(..., controlnet_residuals=...)`. `transformer`: the MMDiT whose patch embedding a ControlNet
    without its own uses (kept as a reference, not a submodule: its weights stay the transformer's)."""

    def __init__(self, config: ControlNetConfig, transformer: nn.Module | None = None):
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        if c.own_embedding:
            self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, D, c.pos_embed_max_size)
            self.register_buffer("pos_embed", self._init_pos_embed(), persistent=True)
        self.t_embedder = MLPEmbedder(256, D)
        self.y_embedder = MLPEmbedder(c.pooled_dim, D)
        if c.joint:  # no pre-only block: every block's text stream feeds the next one
            self.context_embedder = nn.Linear(c.context_dim, D)
            self.joint_blocks = nn.ModuleList(
                JointBlock(D, c.num_heads, c.mlp_hidden, c.qk_norm, dual_attention=i in c.dual_attention_layers)
                for i in range(c.depth))
        else:
            self.transformer_blocks = nn.ModuleList(ImageBlock(D, c.num_heads, c.mlp_hidden) for _ in range(c.depth))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(c.depth))
        self.pos_embed_input = ControlEmbed(c.patch_size, c.control_channels, D)
        self.transformer = None
        if transformer is not None:
            self.attach(transformer)

    def attach(self, transformer: nn.Module) -> ControlNet:
        """Use with `transformer` (an MMDiT): checked for width, patch, channels and block mapping. Returns self."""
        check_compatible(self.config, transformer.config)
        object.__setattr__(self, "transformer", transformer)  # a reference: not registered as a submodule
        return self

    def _init_pos_embed(self) -> torch.Tensor:
        c = self.config
        if self.x_embedder.proj.weight.is_meta:
            return torch.empty(1, c.pos_embed_max_size**2, c.hidden_size, device="meta")
        return sincos_2d_table(c.hidden_size, c.pos_embed_max_size, c.sample_size // c.patch_size).unsqueeze(0)

    @torch.no_grad()
    def init_weights(self) -> ControlNet:
        """Zero the output projections and the control embedding (diffusers' `zero_module`): a fresh ControlNet
        adds nothing until trained. Returns self."""
        for m in (*self.controlnet_blocks, self.pos_embed_input.proj):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        return self

    @property
    def device(self) -> torch.device:
        return self.controlnet_blocks[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.controlnet_blocks[0].weight.dtype

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) -> tokens (B, N, D) with positions: its own embedding or the transformer's
        (Stability-AI/sd3.5 sd3_impls.py BaseModel.apply_model: diffusion_model.x_embedder + cropped_pos_embed)."""
        if self.config.own_embedding:
            return self.x_embedder(latents, self.pos_embed)
        if self.transformer is None:
            raise ValueError("this ControlNet uses the transformer's patch embedding: load it with "
                             "transformer=<the MMDiT> (or call .attach(model))")
        return self.transformer.x_embedder(latents, self.transformer.pos_embed)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None,
                pooled: torch.Tensor, control_latents: torch.Tensor, scale: float = 1.0) -> ControlNetResiduals:
        """The MMDiT's inputs (latents (B, C, H, W), timestep (B,) in [0, 1000], context (B, L, context_dim),
        pooled (B, pooled_dim)) and control_latents (B or 1, C + extra, H, W), VAE-encoded and scaled
        -> one residual (B, N, D) per block, times `scale`. Image-only ControlNets ignore `context`."""
        if tuple(control_latents.shape[-2:]) != tuple(latents.shape[-2:]):
            raise ValueError(f"control latents are {tuple(control_latents.shape[-2:])}, the latents "
                             f"{tuple(latents.shape[-2:])}: the control image must have the output's size")
        x = self.embed(latents)  # (B, N, D)
        y = torch.zeros_like(pooled) if self.config.zero_pooled else pooled
        vec = self.t_embedder(timestep_features(timestep).to(x.dtype)) + self.y_embedder(y)  # (B, D)
        x = x + self.pos_embed_input(control_latents)  # a batch of 1 broadcasts

        outputs = []
        if self.config.joint:
            ctx = self.context_embedder(context)  # (B, L, D)
            for block in self.joint_blocks:
                ctx, x = block(ctx, x, vec)
                outputs.append(x)
        else:  # SD3.5-large's 8B ControlNets: sequential image-only blocks (dit_embedder.py using_8b_controlnet)
            for block in self.transformer_blocks:
                x = block(x, vec)
                outputs.append(x)
        residuals = [proj(h) * scale for proj, h in zip(self.controlnet_blocks, outputs, strict=True)]
        return ControlNetResiduals(residuals, self.config.residual_rule)


class ControlNetResiduals:
    """What one or more ControlNets add to the transformer's image stream, by joint block (`add_to`).

    ControlNet residuals r[0..n) land on a transformer of `depth` blocks by the rule of the file they came from:
      "diffusers"  after blocks i < depth - 1 (the last block, context_pre_only, gets none), r[int(i / (depth / n))]
                   (diffusers `transformer_sd3.py` SD3Transformer2DModel.forward, block_controlnet_hidden_states);
      "stability"  after every block i, r[i // (depth // n)] (Stability-AI/sd3.5 `mmditx.py`
                   MMDiTX.forward_core_with_concat): the last block gets one too.
    `a + b` (or `sum(list, ControlNetResiduals())`) adds several ControlNets' residuals, as diffusers'
    SD3MultiControlNetModel sums them.
    """

    def __init__(self, residuals: Sequence[torch.Tensor] = (), rule: str = "diffusers"):
        if rule not in RESIDUAL_RULES:
            raise ValueError(f"residual rule must be one of {RESIDUAL_RULES}, got {rule!r}")
        self.parts = [(tuple(residuals), rule)] if len(residuals) else []

    def __add__(self, other: ControlNetResiduals) -> ControlNetResiduals:
        total = ControlNetResiduals()
        total.parts = self.parts + other.parts
        return total

    def at_block(self, i: int, depth: int) -> torch.Tensor | None:
        """The sum of the residuals added after joint block i of `depth`, or None."""
        picked = [r[k] for r, rule in self.parts if (k := residual_index(rule, i, depth, len(r))) is not None]
        total = picked[0] if picked else None
        for r in picked[1:]:
            total = total + r
        return total

    def add_to(self, x: torch.Tensor, i: int, depth: int) -> torch.Tensor:
        """x (B, N, D) after joint block i, plus its residual (MMDiT.forward calls this)."""
        r = self.at_block(i, depth)
        return x if r is None else x + r


def residual_index(rule: str, i: int, depth: int, n: int) -> int | None:
    """Which of n residuals is added after block i of depth (see ControlNetResiduals), or None."""
    if rule == "diffusers":
        return None if i == depth - 1 else int(i / (depth / n))
    return i // (depth // n)


def check_compatible(config: ControlNetConfig, mmdit) -> None:
    """A ControlNet must match the transformer's width, patch size and latent channels, and its residuals must
    map onto the transformer's blocks. Raises ValueError naming both numbers."""
    c, m = config, mmdit
    for name, ours, theirs in (("width (heads x head_dim)", c.hidden_size, m.hidden_size),
                               ("patch size", c.patch_size, m.patch_size),
                               ("latent channels", c.in_channels, m.in_channels)):
        if ours != theirs:
            raise ValueError(f"ControlNet {name} {ours} does not match the transformer's {theirs}: it was made for "
                             "another model")
    if c.residual_rule == "stability" and (m.depth < c.depth or (m.depth - 1) // (m.depth // c.depth) >= c.depth):
        raise ValueError(f"a ControlNet of {c.depth} blocks does not map onto {m.depth} transformer blocks by "
                         "Stability's rule (block i gets residual i // (depth // n))")
