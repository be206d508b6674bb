"""Test helpers: random diffusers SD3 transformers, inputs, and running them."""
from __future__ import annotations

import contextlib

import torch

from flashsd3 import MMDiTConfig


def random_diffusers_transformer(cfg: MMDiTConfig, dtype=torch.float64, seed: int = 0):
    """diffusers SD3Transformer2DModel at `cfg` with every parameter random (zero-init gates and
    final layer would otherwise hide mistakes); the sin-cos position buffer stays as built.
    Our model with the same weights: `flashsd3.mmdit.from_diffusers_state_dict(ref.state_dict(), cfg)`."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**cfg.to_diffusers()).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.3)
    return ref


def random_inputs(cfg: MMDiTConfig, batch=2, hw=(8, 8), tokens=7, timesteps=None, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, cfg.in_channels, *hw, generator=g, dtype=torch.float64).to(dtype)
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g, dtype=torch.float64).to(dtype)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g, dtype=torch.float64).to(dtype)
    if timesteps is None:
        timesteps = torch.rand(batch, generator=g, dtype=torch.float64) * 1000
    t = torch.as_tensor(timesteps, dtype=torch.float64).to(dtype)
    return lat, t, ctx, pooled


def run_reference(ref, lat, t, ctx, pooled, **kw):
    with torch.no_grad():
        return ref(hidden_states=lat, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, **kw).sample


@contextlib.contextmanager
def rmsnorm_in_input_dtype():
    """diffusers' RMSNorm with its variance computed in the input's dtype. The library computes it in float32
    even for float64 inputs, which bounds float64 agreement near 1e-9; with this, the reference is float64
    throughout and qk-norm parity can be asserted at the same 1e-10 as the rest. Same formula otherwise:
    x * rsqrt(mean(x^2) + eps) * weight (+ bias)."""
    from diffusers.models.normalization import RMSNorm

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * self.weight
            if self.bias is not None:
                x = x + self.bias
        return x

    original = RMSNorm.forward
    RMSNorm.forward = forward
    try:
        yield
    finally:
        RMSNorm.forward = original
