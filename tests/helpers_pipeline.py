"""Test helpers: the same tiny random SD3 models in diffusers' StableDiffusion3Pipeline and in ours.

    twins = make_twins(tmp_path, torch.float32, stochastic=True)
    twins.ref   # diffusers StableDiffusion3Pipeline (text_encoder_3=None), the parity reference
    twins.ours  # FlashSD3Pipeline over the same weights: MMDiT converted through our key table, VAE
                # loaded from the diffusers VAE's saved files, TextEncoders over the same CLIP objects

Sizes: the TINY transformer (4 latent channels, 16-token position table) with a 3-level VAE (4x
downscale, so images are multiples of 4 * patch 2 = 8 pixels, at most 16 * 8 = 128 per side) and the
tiny CLIP pair of helpers_text (pooled 8 + 16 = 24, context 24 zero-padded to 32).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flashsd3 import TINY, FlashSD3Pipeline, TextEncoders, VAEConfig, load_vae
from flashsd3.mmdit import from_diffusers_state_dict
from helpers_mmdit import random_diffusers_transformer
from helpers_text import tiny_clip_pair

# SD3's VAE layout (no quant convs, scaling 1.5305 / shift 0.0609 from vae/config.json), three levels
TINY_VAE3 = VAEConfig(latent_channels=TINY.in_channels, block_out_channels=(8, 16, 16), layers_per_block=1,
                      norm_num_groups=4)
SHIFT = 3.0  # SD3-medium scheduler/scheduler_config.json


@dataclass
class Twins:
    ref: object  # diffusers StableDiffusion3Pipeline
    ours: FlashSD3Pipeline


def random_diffusers_vae(cfg: VAEConfig, seed: int):
    """diffusers AutoencoderKL in SD3's configuration at `cfg`'s size, every parameter random."""
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    vae = AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, sample_size=32, scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():  # norms near (1, 0), the rest small: few clamped pixels
            base = (1.0 if name.endswith("weight") else 0.0) if "norm" in name else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return vae.eval()


def make_twins(tmp_path: Path, dtype: torch.dtype, *, stochastic: bool, seed: int = 0) -> Twins:
    """Both pipelines over the same random weights, in `dtype`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = random_diffusers_transformer(TINY, dtype=torch.float64, seed=seed)
    # std 0.3 -> 0.15: at 0.3 the 4-step chain amplifies fp32 rounding ~200x (latents rel. error 3e-5
    # vs 1.5e-7 measured), which would hide real differences under the tolerance
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(0.5)
    vae = random_diffusers_vae(TINY_VAE3, seed=seed + 1)
    vae.save_pretrained(tmp_path / "vae")  # float32 safetensors + config.json, as a real vae/ folder
    tok, enc, tok2, enc2 = tiny_clip_pair(seed=seed + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT, stochastic_sampling=stochastic)
    ref = StableDiffusion3Pipeline(
        transformer=transformer.to(dtype), scheduler=scheduler, vae=vae.to(dtype), text_encoder=enc.to(dtype),
        tokenizer=tok, text_encoder_2=enc2.to(dtype), tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None,
    )
    ref.set_progress_bar_config(disable=True)
    ours = FlashSD3Pipeline(
        from_diffusers_state_dict(transformer.state_dict(), TINY).to(dtype),
        load_vae(tmp_path / "vae", dtype=dtype),
        TextEncoders(tok, enc, tok2, enc2, context_dim=TINY.context_dim),  # the very same CLIP objects
        shift=SHIFT,
    )
    return Twins(ref, ours)


def initial_latents(batch: int, height: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Standard normal (batch, C, h, w) latents for a height x width image, drawn in float64."""
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(TINY_VAE3.block_out_channels) - 1)
    shape = (batch, TINY.in_channels, height // f, width // f)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def run_diffusers(pipe, prompts, *, seed: int, **kw):
    """(images (B, 3, H, W) in [0, 1] before uint8, latents after every step)."""
    steps = []

    def keep(_pipe, _i, _t, tensors):
        steps.append(tensors["latents"].clone())
        return {}

    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the scheduler's re-noise source
        images = pipe(prompt=prompts, max_sequence_length=77, output_type="pt", callback_on_step_end=keep,
                      callback_on_step_end_tensor_inputs=["latents"], **kw).images
    return images, steps


def run_ours(pipe, prompts, *, seed: int, **kw):
    steps = []
    out = pipe(prompts, output_type="pt", generator=torch.Generator().manual_seed(seed),
               callback=lambda i, x: steps.append(x.clone()), **kw)
    assert torch.equal(out.latents, steps[-1])
    return out.images, steps
