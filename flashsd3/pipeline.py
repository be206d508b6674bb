"""Text -> noise -> sample -> decode. `FlashSD3Pipeline` holds the three models and nothing else.

Mirrors diffusers' StableDiffusion3Pipeline.__call__ (text_encoder_3=None, the Flash recipe: 4 steps,
no guidance) with the sampler as plain functions from `flashsd3.sampling`. No argparse, no files:
scripts/sample.py owns those.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import DEMO, DEMO_VAE
from .mmdit import MMDiT, load_transformer
from .sampling import (check_sigmas, cfg_denoiser, draw_noise, flash_sigmas, flow_match_sigmas, noise_to, sample_euler,
                       sample_flash)
from .text_encoders import TextEncoders
from .vae import VAE, load_vae

SHIFT = 3.0  # scheduler/scheduler_config.json of SD3-medium


@dataclass
class PipelineOutput:
    images: list  # PIL images, or a (B, 3, H, W) tensor in [0, 1] for output_type="pt", or None
    latents: torch.Tensor  # final model-space latents (B, C, H/8, W/8)
    seeds: list[int] | None = None  # per-image seeds when a seed was given (see `image_seeds`)


def image_seeds(seed: int, count: int) -> list[int]:
    """Image k of a run with `seed` uses seed + k, so any image can be regenerated alone."""
    return [seed + k for k in range(count)]


class FlashSD3Pipeline:
    """SD3 (+ Flash LoRA) text-to-image: `pipe("a raccoon ...")` -> PipelineOutput."""

    def __init__(self, transformer: MMDiT, vae: VAE, text_encoders: TextEncoders | None, *,
                 shift: float = SHIFT, offload_text_encoders: bool = False):
        self.transformer, self.vae, self.text_encoders = transformer, vae, text_encoders
        self.shift = shift
        self.offload_text_encoders = offload_text_encoders  # move CLIPs to CPU after encoding

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.proj.weight.dtype

    @property
    def image_factor(self) -> int:  # image pixels per token side: VAE downscale x patch size
        return self.vae.downscale * self.transformer.config.patch_size

    # Loading ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str | Path, *, lora: Sequence[tuple[str, float]] | None = None,
                        t5: bool = False, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                        merge: bool = True, discard_lora: bool = False,
                        tokenizers: str | Path | None = None) -> "FlashSD3Pipeline":
        """Load from a diffusers folder, a Stability single file, or a hub repo id.

        lora: (source, scale) pairs; default the Flash SD3 adapter at scale 1; [] for the base model.
        merge: fold the adapters into the weights (no inference overhead; `flashsd3.lora.unmerge_lora`).
        discard_lora: after merging, free the adapters' A/B (no unmerge or rescale later).
        tokenizers: for single files, where `tokenizer/` and `tokenizer_2/` are (default: the copies
        shipped with flashsd3, identical to SD3's).
        """
        from . import hub
        from .lora import load_lora, merge_lora

        patterns = hub.PIPELINE_PATTERNS + (hub.T5_PATTERNS if t5 else [])
        root = hub.resolve(model, patterns=patterns, what="model")
        if root.is_file():  # Stability single file: transformer, VAE and the CLIPs under prefixes
            transformer = load_transformer(root, dtype=dtype, device=device)
            vae = load_vae(root, dtype=dtype, device=device)
            text = TextEncoders.from_single_file(root, tokenizers, dtype=dtype, device=device, t5=t5,
                                                 context_dim=transformer.config.context_dim)
        else:
            transformer = load_transformer(root / "transformer", dtype=dtype, device=device)
            vae = load_vae(root / "vae", dtype=dtype, device=device)
            text = TextEncoders.from_diffusers_folder(root, dtype=dtype, device=device, t5=t5,
                                                     context_dim=transformer.config.context_dim)
        for source, scale in ([(hub.FLASH_SD3_LORA_REPO, 1.0)] if lora is None else lora):
            load_lora(transformer, source, scale=scale)  # a folder, a file or a hub repo id
        if merge and (lora is None or lora):
            merge_lora(transformer, discard=discard_lora)
        return cls(transformer, vae, text)

    @classmethod
    def demo(cls, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "FlashSD3Pipeline":
        """The whole pipeline at toy width with random weights (config DEMO): runs anywhere in seconds,
        needs no download, and makes noise-like images by design."""
        from .demo import demo_text_encoders

        torch.manual_seed(seed)
        transformer = MMDiT(DEMO).to(device, dtype).eval()
        vae = VAE(DEMO_VAE).to(device, dtype).eval()
        return cls(transformer, vae, demo_text_encoders(DEMO, seed).to(device, dtype))

    # Generation ---------------------------------------------------------------------------------

    def check_size(self, height: int, width: int) -> None:
        f, table = self.image_factor, self.transformer.config.pos_embed_max_size
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (VAE x patch size), got {v!r}")
            if v // f > table:
                raise ValueError(f"{name} {v} exceeds the position table: at most {table * f} pixels")

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoders is None:
            raise ValueError("this pipeline has no text encoders: pass prompt_embeds and pooled_prompt_embeds")
        if self.text_encoders.device != self.device:
            self.text_encoders.to(self.device)
        ctx, pooled = self.text_encoders.encode(prompts)
        if self.offload_text_encoders:
            self.text_encoders.offload("cpu")
        return ctx.to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        height: int = 1024,
        width: int = 1024,
        num_steps: int = 4,
        guidance: float = 0.0,
        sampler: str = "flash",
        sigmas: Sequence[float] | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        negative_prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        noise: Sequence[torch.Tensor] | Callable | None = None,
        output_type: str = "pil",
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> PipelineOutput:
        """Generate images. sampler "flash" (x0 then re-noise; the Flash SD3 recipe) or "euler" (the
        ODE sampler of SD3's own 28-step, guidance-7 recipe). guidance > 1 turns on classifier-free
        guidance with `negative_prompt` (default ""). `seed`: image k draws its latents and re-noise from
        a CPU generator seeded seed + k (or seed[k] for a list), reproducible across devices and
        batch compositions; `latents`/`noise` let callers supply the initial latents and the re-noise draws.
        `prompt_embeds` = (context, pooled) replaces the text encoders."""
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if sampler not in ("flash", "euler"):
            raise ValueError(f"sampler must be 'flash' or 'euler', got {sampler!r}")
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        self.check_size(height, width)
        cfg = guidance > 1  # diffusers' rule: do_classifier_free_guidance = guidance_scale > 1
        if (negative_prompt is not None or negative_prompt_embeds is not None) and not cfg:
            warnings.warn(f"negative prompt is ignored without guidance > 1 (guidance={guidance})", stacklevel=2)

        cond = self._conditioning(prompt, prompt_embeds, num_images_per_prompt)
        batch = cond[0].shape[0]
        uncond = None
        if cfg:
            if negative_prompt_embeds is None:
                n_prompts = batch // num_images_per_prompt
                negative_prompt = negative_prompt if negative_prompt is not None else ""
                negative_prompt = [negative_prompt] * n_prompts if isinstance(negative_prompt, str) else negative_prompt
                if len(negative_prompt) != n_prompts:
                    raise ValueError(f"{len(negative_prompt)} negative prompts for {n_prompts} prompts")
            uncond = self._conditioning(negative_prompt, negative_prompt_embeds, num_images_per_prompt)

        seeds = None if seed is None else image_seeds(seed, batch) if isinstance(seed, int) else [int(s) for s in seed]
        if seeds is not None and len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} images")
        per_image = PerImageNoise(seeds) if seeds is not None else None  # image k's latents from seed k alone
        x = self._initial_latents(latents, batch, height, width, generator, per_image)
        if sigmas is not None:
            sched = check_sigmas(sigmas)
        else:
            sched = (flash_sigmas if sampler == "flash" else flow_match_sigmas)(num_steps, self.shift)
        if noise is None and per_image is not None and sampler == "flash":  # ... and its re-noise too
            noise = [noise_to(per_image.draw(x.shape), x.device) for _ in range(len(sched) - 2)]
        denoise = cfg_denoiser(self.transformer, cond, uncond, guidance)
        if sampler == "flash":
            x = sample_flash(denoise, x, sched, generator=generator, noise=noise, callback=callback)
        else:
            x = sample_euler(denoise, x, sched, callback=callback)
        check_finite(x, "latents")
        if output_type == "latent":
            return PipelineOutput(None, x, seeds)
        image = self.decode(x)
        return PipelineOutput(to_pil(image) if output_type == "pil" else image, x, seeds)

    def _conditioning(self, prompt, embeds, per_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
        if embeds is not None:
            ctx, pooled = embeds
        else:
            if prompt is None:
                raise ValueError("give a prompt or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            ctx, pooled = self.encode_prompt(prompts)
        ctx = ctx.to(self.device, self.dtype).repeat_interleave(per_prompt, dim=0)  # [p0, p0, p1, p1] as diffusers
        return ctx, pooled.to(self.device, self.dtype).repeat_interleave(per_prompt, dim=0)

    def _initial_latents(self, latents, batch, height, width, generator, per_image) -> torch.Tensor:
        f = self.vae.downscale
        shape = (batch, self.transformer.config.in_channels, height // f, width // f)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(self.device, self.dtype)
        if per_image is not None:
            return noise_to(per_image.draw(shape), self.device).to(self.dtype)
        return draw_noise(torch.empty(shape, device=self.device), generator).to(self.dtype)  # drawn in fp32

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Model latents -> images (B, 3, H, W) in [0, 1] (diffusers' postprocess before uint8)."""
        vae_dtype = self.vae.decoder.conv_in.weight.dtype
        image = self.vae.decode(self.vae.latents_to_vae(latents.to(vae_dtype)), tile=tile)
        check_finite(image, "decoded image")
        return (image.to(torch.promote_types(image.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)  # >= fp32


class PerImageNoise:
    """One CPU generator per image (seeded with that image's seed): the initial latents and every
    re-noise draw of image k come from its own stream, so image k can be regenerated alone."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw(self, shape) -> torch.Tensor:
        """(B, ...) float32 on the CPU, as flashsd3.sampling.draw_noise: initial latents, then one
        draw per re-noise step, in that order."""
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.generators])


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise FloatingPointError(
            f"NaN or inf in the {what} ({t.dtype}). float16 can overflow here: try dtype bfloat16 or float32."
        )


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding as diffusers' numpy_to_pil."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]

