"""Text (+ image, + mask) -> noise -> sample -> decode. `FlashSD3Pipeline` holds the three models and a recipe.

Mirrors diffusers' StableDiffusion3Pipeline (txt2img, skip-layer guidance), StableDiffusion3Img2ImgPipeline
and StableDiffusion3InpaintPipeline, with the samplers as plain functions from `flashsd3.sampling`. A call
is four parts that every task shares: conditioning (text -> embeddings), initial latents (noise, or an
encoded image noised to the start sigma), denoise (a sampler from the table, over a composed denoiser:
velocity model -> CFG -> skip-layer guidance -> inpainting constraint) and decode. One source of
randomness per call (`noise.py`). No argparse, no files: flashsd3/cli.py owns those.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DEMO
from ..images import check_mask_matches, mask_to_latents, output_size, preprocess_image, preprocess_mask
from ..mmdit import MMDiT, load_transformer
from ..precision import resolve_dtype
from ..recipes import FLASH_SD3, Recipe, default_recipe, get_recipe, override
from ..rules import (
    check_size,
    check_skip_layers,
    check_slg_window,
    check_steps,
    check_strength,
    check_strength_leaves_a_step,
    edit_start,
)
from ..sampling import (
    InpaintConstraint,
    cfg_denoiser,
    check_sigmas,
    forward_process,
    get_sampler,
    noise_to,
    skip_layer_denoiser,
)
from ..text_encoders import TextEncoders
from ..vae import VAE, load_vae
from .checks import check_count, check_finite, check_output_type, check_prompts
from .control import ControlledModel, control_images, control_size, controlled_model
from .noise import check_seed, random_source

DEFAULT_SIZE = 1024  # SD3's training resolution (diffusers: transformer sample_size 128 x VAE factor 8)
IMG2IMG_STRENGTH = 0.6  # diffusers StableDiffusion3Img2ImgPipeline's default strength
INPAINT_STRENGTH = 1.0  # the repainted region starts from pure noise (new content, as SD's inpainting default)


@dataclass
class PipelineOutput:
    images: list  # PIL images, or a (B, 3, H, W) tensor in [0, 1] for output_type="pt", or None
    latents: torch.Tensor  # final model-space latents (B, C, H/8, W/8)
    seeds: list[int] | None = None  # per-image seeds when a seed was given (see `image_seeds`)


@dataclass
class Edit:
    """What img2img / inpainting start from, at the output size."""

    latents: torch.Tensor  # (B, C, h, w) model-space latents of the image, one posterior draw per image
    mask: torch.Tensor | None  # (B, 1, h, w) latent-resolution mask, 1 = repaint; None for img2img
    strength: float  # (0, 1]: how far into the schedule the image is noised (1 = pure noise)
    height: int
    width: int


class FlashSD3Pipeline:
    """SD3 / SD3.5 (+ Flash LoRA): `pipe(prompt)`, `pipe.img2img(prompt, image)`, `pipe.inpaint(prompt, image,
    mask)`."""

    def __init__(self, transformer: MMDiT, vae: VAE, text_encoders: TextEncoders | None, *,
                 recipe: Recipe | str | None = None, shift: float | None = None, offload_text_encoders: bool = False):
        """recipe: the default sampling settings of calls (default "flash-sd3"); shift overrides its shift."""
        self.transformer, self.vae, self.text_encoders = transformer, vae, text_encoders
        self.recipe = get_recipe(recipe if recipe is not None else FLASH_SD3).replace(shift=shift)
        self.offload_text_encoders = offload_text_encoders  # move the text encoders to CPU after encoding
        self.loras: list[tuple[str, float]] = []  # (source, scale) loaded by from_pretrained, merged or not
        self.controlnets: list = []  # flashsd3.load_controlnet(...) models, used by calls given control_image

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def shift(self) -> float:
        return self.recipe.shift

    @property
    def image_factor(self) -> int:  # image pixels per token side: VAE downscale x patch size
        return self.vae.downscale * self.transformer.config.patch_size

    # Loading ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str | Path, *, lora: Sequence[tuple[str, float]] | None = None,
                        t5: bool = False, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu",
                        merge: bool = True, discard_lora: bool = False, tokenizers: str | Path | None = None,
                        recipe: Recipe | str | None = None) -> FlashSD3Pipeline:
        """Load from a diffusers folder, a Stability single file, or a hub repo id.

        lora: (source, scale) pairs; default the Flash SD3 adapter at scale 1; [] for the base model.
        merge: fold the adapters into the weights (no inference overhead; `flashsd3.lora.unmerge_lora`).
        discard_lora: after merging, free the adapters' A/B (no unmerge or rescale later).
        tokenizers: for single files, where `tokenizer/` and `tokenizer_2/` are (default: the copies
        shipped with flashsd3, identical to SD3's).
        recipe: default sampling settings; by default `default_recipe` of the loaded model ("flash-sd3" for SD3
        with adapters, "sd3" without, "sd3.5-medium" / "sd3.5-large" by architecture).
        dtype: "auto" (default) = float16 on CUDA, bfloat16 on a CPU with native bf16 matrix units, else
        float32 (`flashsd3.precision`); or a torch dtype / "fp16" / "bf16" / "fp32". One dtype for all models.
        """
        from .. import hub
        from ..lora import load_lora, merge_lora

        dtype = resolve_dtype(dtype, device)
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
        loras = [(hub.FLASH_SD3_LORA_REPO, 1.0)] if lora is None else list(lora)
        for source, scale in loras:
            load_lora(transformer, source, scale=scale)  # a folder, a file or a hub repo id
        if merge and loras:
            merge_lora(transformer, discard=discard_lora)
        pipe = cls(transformer, vae, text, recipe=recipe or default_recipe(transformer.config, adapters=bool(loras)))
        pipe.loras = [(str(source), float(scale)) for source, scale in loras]
        return pipe

    @classmethod
    def demo(cls, seed: int = 0, dtype: torch.dtype | str = torch.float32,
             device: str | torch.device = "cpu") -> FlashSD3Pipeline:
        """The whole pipeline at toy width with random weights (config DEMO): runs anywhere in seconds,
        needs no download, and makes noise-like images by design. dtype: float32 by default (training and
        the tests build their reference from it); "auto" as `from_pretrained` (flashsd3-sample --demo)."""
        from ..demo import demo_text_encoders, demo_transformer_and_vae

        dtype = resolve_dtype(dtype, device)
        transformer, vae = demo_transformer_and_vae(seed)
        text = demo_text_encoders(DEMO, seed).to(device, dtype)
        return cls(transformer.to(device, dtype), vae.to(device, dtype), text)

    # Tasks --------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        image=None,
        mask=None,
        strength: float | None = None,
        recipe: Recipe | str | None = None,
        num_steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        sigmas: Sequence[float] | None = None,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float | None = None,
        skip_layer_guidance_start: float | None = None,
        skip_layer_guidance_stop: float | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        negative_prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        noise: Sequence[torch.Tensor] | Callable | None = None,
        output_type: str = "pil",
        callback: Callable[[int, torch.Tensor], None] | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        control_mask=None,
    ) -> PipelineOutput:
        """Generate images from text; with `image` (+ `strength`) edit it (img2img), with `image` and `mask`
        repaint the mask's white region (prefer `img2img` / `inpaint`, which call this).

        recipe (default the pipeline's) gives sampler, num_steps, guidance, shift and skip-layer guidance;
        the arguments of those names override it. guidance > 1 turns on classifier-free guidance with
        `negative_prompt` (default ""). seed: image k draws all its noise from a CPU generator seeded
        seed + k (or seed[k]), reproducible across devices and batch compositions; `generator` instead
        draws for the whole batch at once. latents: the initial noise; noise: the sampler's re-noise
        draws (`flash_initial`: one tensor, by default the initial noise itself). `prompt_embeds` = (context,
        pooled) replaces the text encoders.
        control_image: one per ControlNet in `self.controlnets` (a list for several), each with its scale and its
        start/stop fractions of the steps (diffusers' names); control_mask: the inpainting ControlNet's mask
        (default `mask`). Without height/width a txt2img output has the control image's size.
        """
        check_output_type(output_type)
        rec = self.settings(recipe, steps=num_steps, guidance=guidance, sampler=sampler,
                            skip_guidance_layers=skip_guidance_layers,
                            skip_layer_guidance_scale=skip_layer_guidance_scale,
                            skip_layer_guidance_start=skip_layer_guidance_start,
                            skip_layer_guidance_stop=skip_layer_guidance_stop)
        batch = batch_size(prompt, prompt_embeds, num_images_per_prompt)
        seeds = check_seed(seed, batch)
        rng = random_source(seeds, generator)  # every random draw of this call
        cond, uncond = self.conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                         num_images_per_prompt, rec)
        edit = self.prepare_edit(image, mask, strength, height, width, batch, rng)  # None for txt2img
        resize = height is not None  # control images are resized only to an explicit size
        if control_image is not None and edit is None:
            height, width = control_size(control_images(self, control_image), height, width, self.image_factor)
        sched = self.schedule(rec, sigmas, edit)
        if rec.slg is not None and rec.cfg:  # on the whole table: an edit runs its last steps
            full = len(sched) - 1 if edit is None else (len(sigmas) - 1 if sigmas is not None else rec.steps)
            check_slg_window(rec.slg.start, rec.slg.stop, full, None if edit is None else edit.strength)
        x, start_noise = self.initial_latents(latents, batch, height, width, rng, edit, sched[0])
        inpaint = None if edit is None or edit.mask is None else \
            InpaintConstraint(edit.latents, start_noise, edit.mask, sched)
        model = None if control_image is None else controlled_model(
            self, control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
            control_mask if control_mask is not None else mask, batch, x.shape, rng, len(sched) - 1, resize)
        denoise = self.denoiser(cond, uncond, rec, len(sched) - 1, inpaint, model)
        noise = start_noise if noise is None and get_sampler(rec.sampler).same_noise else noise
        x = self.sample(rec.sampler, denoise, x, sched, rng, noise, callback, inpaint)
        return self.output(x, output_type, seeds)

    def img2img(self, prompt, image, *, strength: float = IMG2IMG_STRENGTH, **kwargs) -> PipelineOutput:
        """Edit `image` (PIL, or (B, 3, H, W) in [0, 1]): encode it, noise it to the sigma where `strength`
        of the schedule remains (diffusers' get_timesteps: start index int(n - n * strength)), run the rest.
        Output size: the image's, or height/width (the image is then resized). Other keywords: `__call__`."""
        if image is None:
            raise ValueError("img2img needs an image (PIL image(s), or a (B, 3, H, W) tensor in [0, 1]), got "
                             "image=None")
        return self(prompt, image=image, strength=strength, **kwargs)

    def inpaint(self, prompt, image, mask, *, strength: float = INPAINT_STRENGTH, **kwargs) -> PipelineOutput:
        """Repaint the white part of `mask` (same size as `image`; binarised at 0.5) and keep the rest: the
        kept region follows the image's own noising at every step (diffusers' StableDiffusion3InpaintPipeline
        latent blend). strength < 1 starts the repainted region from the noised image instead of noise."""
        if image is None:
            raise ValueError("inpaint needs an image (PIL image(s), or a (B, 3, H, W) tensor in [0, 1]), got "
                             "image=None")
        if mask is None:  # without one the whole image would be repainted: that is img2img at this strength
            raise ValueError("inpaint needs a mask (white = repaint, black = keep), got mask=None; to change "
                             "the whole image use img2img")
        return self(prompt, image=image, mask=mask, strength=strength, **kwargs)

    # Parts --------------------------------------------------------------------------------------

    def settings(self, recipe: Recipe | str | None, **overrides) -> Recipe:
        """The call's recipe: `recipe` (default the pipeline's) with `recipes.override` applied, checked
        against this model (skip-layer indices within its depth)."""
        rec = override(get_recipe(recipe if recipe is not None else self.recipe), **overrides)
        check_steps(rec.steps, "num_steps")
        if rec.slg is not None:
            check_skip_layers(rec.slg.layers, self.transformer.config.depth)
        return rec

    def check_size(self, height: int, width: int) -> None:
        """The output size against this model (`rules.check_size`: a multiple of the factor, within the
        position table)."""
        check_size(self.transformer.config, height, width, vae_downscale=self.vae.downscale)

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

    def conditioning(self, prompt, negative_prompt, embeds, negative_embeds, per_prompt: int, rec: Recipe):
        """(cond, uncond) conditioning tensors (context, pooled), batched [p0, p0, p1, p1] as diffusers;
        uncond is None without CFG."""
        per_prompt = check_count(per_prompt, "num_images_per_prompt")
        if (negative_prompt is not None or negative_embeds is not None) and not rec.cfg:
            warnings.warn(f"negative prompt is ignored without guidance > 1 (guidance={rec.guidance})",
                          stacklevel=3)
        if rec.slg is not None and not rec.cfg:
            warnings.warn(f"skip-layer guidance is ignored without guidance > 1 (guidance={rec.guidance})",
                          stacklevel=3)
        cond = self._embed(check_prompts(prompt), embeds, per_prompt, "prompt")
        if not rec.cfg:
            return cond, None
        n_prompts = cond[0].shape[0] // per_prompt
        negatives = check_prompts(negative_prompt if negative_prompt is not None else "", "negative_prompt")
        if negative_embeds is None:
            negatives = negatives * n_prompts if len(negatives) == 1 else negatives
            if len(negatives) != n_prompts:
                raise ValueError(f"{len(negatives)} negative prompts for {n_prompts} prompts")
        return cond, self._embed(negatives, negative_embeds, per_prompt, "negative_prompt")

    def _embed(self, prompts, embeds, per_prompt: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if embeds is not None:
            if prompts is not None and what == "prompt":
                raise ValueError("give prompt or prompt_embeds, not both")
            ctx, pooled = embeds
        elif prompts is None:
            raise ValueError("give a prompt or prompt_embeds")
        else:
            ctx, pooled = self.encode_prompt(prompts)
        ctx = ctx.to(self.device, self.dtype).repeat_interleave(per_prompt, dim=0)  # [p0, p0, p1, p1] as diffusers
        return ctx, pooled.to(self.device, self.dtype).repeat_interleave(per_prompt, dim=0)

    def prepare_edit(self, image, mask, strength, height, width, batch: int, rng) -> Edit | None:
        """Checks and encodes the image (one posterior draw per output image, from `rng`) and the mask."""
        if image is None:
            if mask is not None or strength is not None:
                raise ValueError(f"{'mask' if mask is not None else 'strength'} needs an image")
            return None
        if strength is None:
            strength = IMG2IMG_STRENGTH if mask is None else INPAINT_STRENGTH
        strength = check_strength(strength, "strength")
        if mask is not None:
            check_mask_matches(image, mask)
        height, width = output_size(image, height, width, self.image_factor)
        self.check_size(height, width)
        pixels = preprocess_image(image, height, width).to(self.device, self.vae_dtype)
        # one image at a time: the encoder's activations at 1024 px are ~0.5 GB each (diffusers also encodes
        # image by image when given one generator per image)
        posteriors = [self.vae.encode(p[None]) for p in pixels]
        mean = _repeat_to(torch.cat([q.mean for q in posteriors]), batch, "images")
        std = _repeat_to(torch.cat([q.std for q in posteriors]), batch, "images")
        draw = noise_to(rng.draw(mean.shape), self.device).to(mean.dtype)
        z = self.vae.vae_to_latents(mean + std * draw)  # diffusers latent_dist.sample
        check_finite(z, "encoded image", self.describe())
        if mask is not None:
            pixel_mask = _repeat_to(preprocess_mask(mask, height, width), batch, "masks")
            mask = mask_to_latents(pixel_mask, tuple(z.shape[-2:])).to(self.device, self.dtype)
        return Edit(z.to(self.dtype), mask, strength, height, width)

    def schedule(self, rec: Recipe, sigmas, edit: Edit | None) -> torch.Tensor:
        """The sigma table of the run: the recipe's (or `sigmas`), from the start index of an edit."""
        sched = check_sigmas(sigmas) if sigmas is not None else get_sampler(rec.sampler).sigmas(rec.steps, rec.shift)
        if edit is None:
            return sched
        n = len(sched) - 1
        check_strength_leaves_a_step(edit.strength, n, steps="num_steps" if sigmas is None else "sigmas steps")
        return sched[edit_start(n, edit.strength):]

    def initial_latents(self, latents, batch, height, width, rng, edit: Edit | None, sigma) -> tuple:
        """(x at sigmas[0], the initial noise): noise for txt2img; for edits the image noised to sigma."""
        if edit is None:
            height = DEFAULT_SIZE if height is None else height
            width = DEFAULT_SIZE if width is None else width
            self.check_size(height, width)
        else:
            height, width = edit.height, edit.width
        f = self.vae.downscale
        shape = (batch, self.transformer.config.in_channels, height // f, width // f)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            noise = latents.to(self.device)
        else:
            noise = noise_to(rng.draw(shape), self.device)  # float32, cast below
        if edit is None:
            return noise.to(self.dtype), noise
        return forward_process(edit.latents, noise, sigma), noise  # diffusers scheduler.scale_noise

    def denoiser(self, cond, uncond, rec: Recipe, num_steps: int, inpaint: InpaintConstraint | None,
                 model: ControlledModel | None = None):
        """velocity model (+ ControlNets) -> CFG -> skip-layer guidance -> inpainting constraint, each optional."""
        model_fn = self.transformer if model is None else model
        if rec.slg is not None and rec.cfg:
            denoise = skip_layer_denoiser(model_fn, cond, uncond, rec.guidance, rec.slg, num_steps)
        else:
            denoise = cfg_denoiser(model_fn, cond, uncond, rec.guidance)
        denoise = denoise if inpaint is None else inpaint.wrap(denoise)
        return denoise if model is None else model.track(denoise)

    def sample(self, name: str, denoise, x, sched, rng, noise, callback, inpaint: InpaintConstraint | None):
        """Run the recipe's sampler; a stochastic one draws its re-noise from `rng` unless `noise` is given."""
        sampler = get_sampler(name)
        if noise is None and sampler.stochastic:  # drawn up front: no host work inside the loop
            noise = [noise_to(rng.draw(x.shape), x.device) for _ in range(len(sched) - 2)]
        if inpaint is not None and callback is not None:
            callback = _blended(callback, inpaint)
        x = sampler.run(denoise, x, sched, noise, callback)
        return x if inpaint is None else inpaint.finish(len(sched) - 2, x)

    def output(self, x: torch.Tensor, output_type: str, seeds) -> PipelineOutput:
        check_finite(x, "latents", self.describe())
        if output_type == "latent":
            return PipelineOutput(None, x, seeds)
        image = self.decode(x)
        return PipelineOutput(to_pil(image) if output_type == "pil" else image, x, seeds)

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Model latents -> images (B, 3, H, W) in [0, 1] (diffusers' postprocess before uint8)."""
        image = self.vae.decode(self.vae.latents_to_vae(latents.to(self.vae_dtype)), tile=tile)
        check_finite(image, "decoded image", self.describe())
        return (image.to(torch.promote_types(image.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)  # >= fp32

    def describe(self) -> str:
        """What is known about the weights, for error messages: the adapters loaded and how."""
        from ..lora import lora_info

        live = [f"LoRA {i.name!r} at scale {i.scale:g}, {'merged' if i.merged else 'unmerged'}"
                for i in lora_info(self.transformer).values()]
        if live:
            return "; ".join(live)
        if self.loras:
            return "LoRA merged and discarded at load: " + ", ".join(f"{s} at scale {k:g}" for s, k in self.loras)
        return "no LoRA"


def batch_size(prompt, prompt_embeds, per_prompt) -> int:
    """Images in the call (prompts x num_images_per_prompt), from the arguments alone (checked)."""
    prompts = check_prompts(prompt)
    n = len(prompts) if prompts is not None else prompt_embeds[0].shape[0] if prompt_embeds is not None else 1
    return n * check_count(per_prompt, "num_images_per_prompt")


def _blended(callback, inpaint: InpaintConstraint):
    """Callbacks see the latents as diffusers' inpainting loop holds them: blended after every step."""
    return lambda i, x: callback(i, inpaint.finish(i, x))


def _repeat_to(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """n images for a batch of n * k: image j for outputs j*k .. j*k + k - 1 (prompt j's, as diffusers orders)."""
    if batch % x.shape[0]:
        raise ValueError(f"{x.shape[0]} {what} for {batch} outputs: give one, or one per prompt")
    return x.repeat_interleave(batch // x.shape[0], dim=0)


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding as diffusers' numpy_to_pil."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
