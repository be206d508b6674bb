"""ControlNets in a pipeline call: control images -> control latents (each layout's preprocessing), and the
velocity model with the ControlNets' residuals of the current step.

Mirrors diffusers' StableDiffusion3ControlNetPipeline (control_image, controlnet_conditioning_scale,
control_guidance_start/end, several ControlNets summed) and StableDiffusion3ControlNetInpaintingPipeline
(the inpainting ControlNet's masked image + mask), and Stability-AI/sd3.5 `sd3_infer.py` for its ControlNets:
  pixels    [-1, 1]; Stability's canny ControlNet: x * 255 * 0.5 + 0.5 on [0, 1] pixels (sd3_infer.py vae_encode)
  latents   (z - shift) * scale, z one VAE posterior draw per output image; InstantX's ControlNets (zero pooled
            text) without the shift, as diffusers' pipeline; the inpainting ControlNet adds 1 - mask as a channel
Each call draws the control images' posterior samples from the call's random source, after the initial noise,
so a seed's initial noise is the same with and without ControlNets. Cond and uncond halves of CFG share them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..controlnet import ControlNet, ControlNetResiduals
from ..images import ImageError, image_size, mask_to_latents, preprocess_image, preprocess_mask
from ..rules import check_number, control_active
from ..sampling import noise_to
from .checks import check_finite


@dataclass
class Control:
    """One ControlNet's part of a call."""

    net: ControlNet
    latents: torch.Tensor  # (B, C + extra, h, w) model-space control latents, one row per output image
    scale: float  # controlnet_conditioning_scale
    start: float  # fraction of the steps before which it is off (control_guidance_start)
    stop: float  # fraction of the steps after which it is off (control_guidance_end)

    def active(self, step: int, num_steps: int) -> bool:
        return control_active(step, num_steps, self.start, self.stop)


class ControlledModel:
    """`model_fn(x, t, context, pooled, **kw)` for the denoisers: the transformer with the residuals of the
    ControlNets active at the current step (set by the `track` wrapper, one denoiser call per step)."""

    def __init__(self, transformer, controls: list[Control], num_steps: int):
        self.transformer, self.controls, self.num_steps, self.step = transformer, controls, num_steps, -1

    def __call__(self, x, t, context, pooled, **kw):
        residuals = ControlNetResiduals()
        for c in self.controls:
            if c.active(self.step, self.num_steps):
                lat = c.latents.repeat(x.shape[0] // c.latents.shape[0], 1, 1, 1)  # CFG: [uncond, cond] alike
                residuals = residuals + c.net(x, t, context, pooled, lat, c.scale)
        return self.transformer(x, t, context, pooled, controlnet_residuals=residuals if residuals.parts else None,
                                **kw)

    def track(self, denoise):
        """The denoiser, counting its calls as the steps of the schedule."""
        def tracked(x, t):
            self.step += 1
            if self.step >= self.num_steps:
                raise RuntimeError(f"ControlNets were called for step {self.step + 1} of {self.num_steps}: they "
                                   "need a sampler that calls the denoiser once per step")
            return denoise(x, t)
        return tracked


def per_net(value, n: int, what: str) -> list:
    """One value for every ControlNet, or a list of n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what}: {len(value)} values for {n} ControlNets")
        return list(value)
    return [value] * n


def control_images(pipe, control_image) -> list:
    """The call's control images, one per loaded ControlNet (a list for several)."""
    nets = pipe.controlnets
    if not nets:
        raise ValueError("control_image given, but the pipeline has no ControlNet: set pipe.controlnets = "
                         "[flashsd3.load_controlnet(path, transformer=pipe.transformer)]")
    images = list(control_image) if len(nets) > 1 and isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != len(nets):
        raise ValueError(f"{len(images)} control images for {len(nets)} ControlNets: give a list, one per ControlNet")
    for net in nets:  # the pipeline's transformer: checked, and lent to those that use its patch embedding
        if net.transformer is not pipe.transformer:
            net.attach(pipe.transformer)
    return images


def control_size(images: list, height: int | None, width: int | None, factor: int) -> tuple[int, int]:
    """Output size of a run without an image to edit: height/width (control images are resized to it), else the
    first control image's (a multiple of factor); every control image must then have that size."""
    if height is not None and width is not None:
        return height, width
    if height is not None or width is not None:
        raise ValueError("give both height and width (the control images are resized), or neither (their size)")
    h, w = image_size(images[0])
    if h % factor or w % factor:
        raise ImageError(f"control image is {w}x{h} (width x height), not a multiple of {factor}: pass width and "
                         "height to resize it, or crop it")
    return h, w


def check_sizes(images: list, mask, height: int, width: int, resize: bool) -> None:
    """Without an explicit height/width, control images (and mask) must have the output's size (no silent resize)."""
    named = [(f"control image {k}", im) for k, im in enumerate(images)]
    named += [("control mask", mask)] if mask is not None else []
    for what, im in named:
        if not resize and image_size(im) != (height, width):
            h, w = image_size(im)
            raise ImageError(f"{what} is {w}x{h}, the output {width}x{height} (width x height): give images of the "
                             "output's size, or pass height and width to resize them")


def controlled_model(pipe, control_image, scales, starts, stops, mask, batch: int, shape, rng, num_steps: int,
                     resize: bool) -> ControlledModel:
    """The call's ControlNets with their encoded control images, around the transformer. shape: the latents'."""
    images = control_images(pipe, control_image)
    f = pipe.vae.downscale
    height, width = shape[-2] * f, shape[-1] * f
    check_sizes(images, mask, height, width, resize)
    controls = prepare_controls(pipe, images, scales, starts, stops, mask, batch, height, width, rng)
    return ControlledModel(pipe.transformer, controls, num_steps)


def prepare_controls(pipe, images: list, scales, starts, stops, mask, batch: int, height: int, width: int,
                     rng) -> list[Control]:
    """Check the per-ControlNet settings and encode every control image (one posterior draw per output image)."""
    nets = pipe.controlnets
    scales = [check_number(s, "controlnet_conditioning_scale") for s in per_net(scales, len(nets), "scales")]
    starts = [check_number(s, "control_guidance_start", low=0, high=1) for s in per_net(starts, len(nets), "starts")]
    stops = [check_number(s, "control_guidance_end", low=0, high=1) for s in per_net(stops, len(nets), "stops")]
    for s, e in zip(starts, stops, strict=True):
        if s >= e:
            raise ValueError(f"control_guidance_start {s} must be below control_guidance_end {e}")
    controls = []
    for net, image, scale, start, stop in zip(nets, images, scales, starts, stops, strict=True):
        if net.config.extra_channels and mask is None:
            raise ValueError("an inpainting ControlNet (extra mask channel) needs a mask: pass control_mask= (or "
                             "inpaint with mask=)")
        latents = encode_control(pipe, net, image, mask, batch, height, width, rng)
        controls.append(Control(net, latents, scale, start, stop))
    return controls


def encode_control(pipe, net: ControlNet, image, mask, batch: int, height: int, width: int, rng) -> torch.Tensor:
    """Control image (+ mask for the inpainting ControlNet) -> (batch, C + extra, h, w) model-space latents."""
    c, vae = net.config, pipe.vae
    pixels = preprocess_image(image, height, width)  # (n, 3, H, W) in [-1, 1]
    if c.extra_channels:  # diffusers' inpainting ControlNet pipeline: repainted pixels set to -1
        pixel_mask = preprocess_mask(mask, height, width)  # (n, 1, H, W), 1 = repaint
        pixels = torch.where(pixel_mask > 0.5, -1.0, pixels)
    elif c.control_type == "canny":
        pixels = (pixels + 1) / 2 * 255 * 0.5 + 0.5  # sd3_infer.py vae_encode, controlnet_type == 1
    pixels = pixels.to(pipe.device, vae.dtype)
    posteriors = [vae.encode(p[None]) for p in pixels]  # one at a time, as prepare_edit
    mean = _repeat_to(torch.cat([q.mean for q in posteriors]), batch)
    std = _repeat_to(torch.cat([q.std for q in posteriors]), batch)
    z = mean + std * noise_to(rng.draw(mean.shape), pipe.device).to(mean.dtype)
    shift = 0.0 if c.zero_pooled and not c.extra_channels else vae.config.shift_factor
    latents = (z - shift) * vae.config.scaling_factor
    if c.extra_channels:
        keep = 1 - mask_to_latents(_repeat_to(pixel_mask, batch), tuple(latents.shape[-2:]))
        latents = torch.cat([latents, keep.to(latents)], dim=1)
    check_finite(latents, "control latents", pipe.describe())
    return latents.to(pipe.dtype)


def _repeat_to(x: torch.Tensor, batch: int) -> torch.Tensor:
    """n images for a batch of n * k: image j for outputs j*k .. j*k + k - 1 (prompt j's, as diffusers)."""
    if batch % x.shape[0]:
        raise ValueError(f"{x.shape[0]} control images for {batch} outputs: give one, or one per prompt")
    return x.repeat_interleave(batch // x.shape[0], dim=0)
