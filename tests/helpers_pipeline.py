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


def make_twins(tmp_path: Path, dtype: torch.dtype, *, stochastic: bool, seed: int = 0, cfg=TINY) -> Twins:
    """Both pipelines over the same random weights, in `dtype`. cfg: the transformer (TINY; the VAE's
    latent channels follow its in_channels)."""
    from dataclasses import replace

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = random_diffusers_transformer(cfg, dtype=torch.float64, seed=seed)
    # std 0.3 -> 0.15: at 0.3 the 4-step chain amplifies fp32 rounding ~200x (latents rel. error 3e-5
    # vs 1.5e-7 measured), which would hide real differences under the tolerance
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(0.5)
    vae = random_diffusers_vae(replace(TINY_VAE3, latent_channels=cfg.in_channels), seed=seed + 1)
    vae.save_pretrained(tmp_path / "vae")  # float32 safetensors + config.json, as a real vae/ folder
    tok, enc, tok2, enc2 = tiny_clip_pair(seed=seed + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT, stochastic_sampling=stochastic)
    ref = StableDiffusion3Pipeline(
        transformer=transformer.to(dtype), scheduler=scheduler, vae=vae.to(dtype), text_encoder=enc.to(dtype),
        tokenizer=tok, text_encoder_2=enc2.to(dtype), tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None,
    )
    ref.set_progress_bar_config(disable=True)
    ours = FlashSD3Pipeline(
        from_diffusers_state_dict(transformer.state_dict(), cfg).to(dtype),
        load_vae(tmp_path / "vae", dtype=dtype),
        TextEncoders(tok, enc, tok2, enc2, context_dim=cfg.context_dim),  # the very same CLIP objects
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


# Editing (img2img / inpainting) and SD3.5-shaped twins --------------------------------------------

def random_image(seed: int, height: int, width: int):
    """A PIL RGB image of smooth random colour (a blurred random field, so the VAE sees structure)."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    field = torch.rand(1, 3, height // 8, width // 8, generator=g, dtype=torch.float64)
    field = torch.nn.functional.interpolate(field, size=(height, width), mode="bilinear", align_corners=False)
    return Image.fromarray((field[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def box_mask(height: int, width: int, box: tuple[int, int, int, int]):
    """A grayscale PIL mask, white (repaint) inside box = (top, left, bottom, right), black elsewhere."""
    from PIL import Image

    m = torch.zeros(height, width, dtype=torch.uint8)
    top, left, bottom, right = box
    m[top:bottom, left:right] = 255
    return Image.fromarray(m.numpy())  # 2-D uint8: mode "L"


def diffusers_edit_pipeline(ref, kind: str):
    """diffusers' img2img or inpainting SD3 pipeline over the very same components as `ref`."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    cls = StableDiffusion3Img2ImgPipeline if kind == "img2img" else StableDiffusion3InpaintPipeline
    pipe = cls(**{k: v for k, v in ref.components.items() if k in cls._get_signature_keys(cls)[0]})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd35_twins(tmp_path: Path, dtype: torch.dtype, *, seed: int = 0) -> Twins:
    """As make_twins, on an SD3.5-shaped tiny model: qk-norm (rms_norm), an MMDiT-X block (dual attention in
    block 0), three blocks, and T5 on (a tiny random T5 encoder as text_encoder_3)."""
    from dataclasses import replace

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from helpers_text import tiny_t5

    cfg = replace(TINY, depth=3, qk_norm="rms_norm", dual_attention_layers=(0,))
    transformer = random_diffusers_transformer(cfg, dtype=torch.float64, seed=seed)
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(0.5)  # as make_twins
    vae = random_diffusers_vae(TINY_VAE3, seed=seed + 1)
    vae.save_pretrained(tmp_path / "vae")
    tok, enc, tok2, enc2 = tiny_clip_pair(seed=seed + 2)
    tok3, enc3 = tiny_t5(seed=seed + 3, d_model=cfg.context_dim)
    ref = StableDiffusion3Pipeline(
        transformer=transformer.to(dtype), scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=vae.to(dtype),
        text_encoder=enc.to(dtype), tokenizer=tok, text_encoder_2=enc2.to(dtype), tokenizer_2=tok2,
        text_encoder_3=enc3.to(dtype), tokenizer_3=tok3,
    )
    ref.set_progress_bar_config(disable=True)
    ours = FlashSD3Pipeline(
        from_diffusers_state_dict(transformer.state_dict(), cfg).to(dtype), load_vae(tmp_path / "vae", dtype=dtype),
        TextEncoders(tok, enc, tok2, enc2, tok3, enc3, context_dim=cfg.context_dim), shift=SHIFT,
    )
    return Twins(ref, ours)
