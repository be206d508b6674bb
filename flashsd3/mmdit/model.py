"""The SD3 MMDiT: embed -> joint blocks -> final layer -> unpatchify.

Glossary (diffusers names in brackets):
  latents  (B, C, H, W) noisy latents                      [hidden_states in]
  x        (B, N, D) image tokens, N = H*W / patch^2       [hidden_states]
  ctx      (B, L, D) text tokens                           [encoder_hidden_states, after context_embedder]
  y        (B, pooled_dim) pooled text                     [pooled_projections]
  t        (B,) timestep = 1000 * sigma                    [timestep]
  vec      (B, D) t-emb + y-emb, drives every adaLN        [temb]
  velocity (B, C, H, W) model output                       [sample]

Parameter names are the official ones (Stability-AI/sd3.5 `mmditx.py` MMDiTX), so a Stability
single-file checkpoint loads by stripping `model.diffusion_model.`; diffusers names map through
`flashsd3/keymaps/mmdit.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from einops import rearrange

from ..config import MMDiTConfig
from .blocks import FinalLayer, JointBlock
from .embeddings import MLPEmbedder, PatchEmbed, sincos_2d_table, timestep_features


@dataclass
class Capture:
    """Ask `MMDiT.forward` for internals. Pass one in; it is filled during the call.

    blocks=True  -> `block_outputs[i] = (ctx, x)` after block i (ctx is None after the last block)
    attn_probs_of=i -> `attn_probs` = block i's joint attention probabilities (B, H, L+N, L+N),
                       context tokens first; computed with an explicit softmax (memory (L+N)^2).
    """

    blocks: bool = False
    attn_probs_of: int | None = None
    block_outputs: list = field(default_factory=list)
    attn_probs: torch.Tensor | None = None


def _with_attn_probs(block: JointBlock, ctx: torch.Tensor, x: torch.Tensor, vec: torch.Tensor):
    """Run `block` keeping its joint attention probabilities: (ctx, x, probs (B, H, L+N, L+N))."""
    block.keep_attn_probs = True
    try:
        ctx, x = block(ctx, x, vec)
        return ctx, x, block.__dict__.pop("attn_probs")
    finally:
        del block.keep_attn_probs  # back to the class default, False


class MMDiT(nn.Module):
    """SD3's multimodal diffusion transformer (velocity prediction for rectified flow)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, D, c.pos_embed_max_size)
        # Stored in checkpoints, so a buffer that loads; initialised here for freshly built models.
        self.register_buffer("pos_embed", self._init_pos_embed(), persistent=True)
        self.t_embedder = MLPEmbedder(256, D)  # 256 sinusoidal features, see timestep_features
        self.y_embedder = MLPEmbedder(c.pooled_dim, D)
        self.context_embedder = nn.Linear(c.context_dim, D)
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, c.num_heads, c.mlp_hidden, c.qk_norm,
                       context_pre_only=(i == c.depth - 1), dual_attention=(i in c.dual_attention_layers))
            for i in range(c.depth)
        )
        self.final_layer = FinalLayer(D, c.patch_dim)

    @torch.no_grad()
    def init_weights(self) -> MMDiT:
        """Initialise for training from scratch (DiT, Peebles & Xie 2023, `models.py` initialize_weights; SD3
        follows DiT): xavier-uniform linears and patch projection with zero biases, N(0, 0.02) timestep MLP,
        zero adaLN modulations and final projection. Every gate starts at 0, so each block starts as the
        identity and the model predicts 0. Returns self. (PyTorch's default init otherwise.)
        """
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))  # conv as a linear on patches
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        for linear in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.pos_embed.copy_(self._init_pos_embed())
        return self

    def _init_pos_embed(self) -> torch.Tensor:
        c = self.config
        if self.x_embedder.proj.weight.is_meta:
            return torch.empty(1, c.pos_embed_max_size**2, c.hidden_size, device="meta")
        table = sincos_2d_table(c.hidden_size, c.pos_embed_max_size, c.sample_size // c.patch_size)
        return table.unsqueeze(0)

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (`model.to(dtype)` converts them all, buffers included)."""
        return self.pos_embed.dtype

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        *,
        skip_blocks: tuple[int, ...] | list[int] = (),
        capture: Capture | None = None,
        controlnet_residuals=None,
    ) -> torch.Tensor:
        """latents (B, C, H, W), timestep (B,) in [0, 1000], context (B, L, context_dim),
        pooled (B, pooled_dim) -> velocity (B, C, H, W).

        skip_blocks: indices of joint blocks to bypass (both streams pass through unchanged), as
        diffusers' `skip_layers`.
        controlnet_residuals: `flashsd3.controlnet.ControlNetResiduals`, added to the image stream after the
        blocks it maps to (diffusers' `block_controlnet_hidden_states`).
        """
        B, _, H, W = latents.shape
        p = self.config.patch_size
        x = self.x_embedder(latents, self.pos_embed)  # (B, N, D)
        vec = self.t_embedder(timestep_features(timestep).to(x.dtype)) + self.y_embedder(pooled)  # (B, D)
        ctx = self.context_embedder(context)  # (B, L, D)

        for i, block in enumerate(self.joint_blocks):
            if i in skip_blocks:
                pass
            elif capture is not None and capture.attn_probs_of == i:
                ctx, x, capture.attn_probs = _with_attn_probs(block, ctx, x, vec)
            else:
                ctx, x = block(ctx, x, vec)
            if controlnet_residuals is not None:
                x = controlnet_residuals.add_to(x, i, self.config.depth)
            if capture is not None and capture.blocks:
                capture.block_outputs.append((ctx, x))

        patches = self.final_layer(x, vec)  # (B, N, p*p*C)
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, w=W // p, p=p, q=p)

