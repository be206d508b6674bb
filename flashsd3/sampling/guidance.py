"""Denoiser stages after the velocity model and classifier-free guidance: skip-layer guidance and the
inpainting constraint. Each wraps or builds a `denoise(x, t) -> velocity`; the pipeline composes
velocity model -> CFG -> skip-layer guidance -> inpainting constraint, each optional.

Both stages depend on the step, which `denoise(x, t)` does not receive: they count their calls, one per
step, as Stability's reference does (sd3_impls.py `SkipLayerCFGDenoiser.step`). Every sampler here calls
`denoise` exactly once per step, in order; a stage called more often than its schedule has steps raises.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..rules import slg_guides
from .flow_match import Denoiser, cfg_combine, forward_process


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (SLG): v += scale * (v_cond - v_cond_without(layers)) on steps i with
    start * steps < i < stop * steps. diffusers `StableDiffusion3Pipeline` (skip_guidance_layers,
    skip_layer_guidance_scale/start/stop); Stability-AI/sd3.5 sd3_infer.py CONFIGS["sd3.5_medium"]."""

    layers: tuple[int, ...]  # joint blocks bypassed in the extra pass (diffusers skip_guidance_layers)
    scale: float = 2.8  # diffusers' default skip_layer_guidance_scale (Stability's SD3.5-medium config: 2.5)
    start: float = 0.01  # fraction of the steps after which SLG starts (strict, as both references)
    stop: float = 0.2  # fraction of the steps before which SLG stops

    def __post_init__(self):
        layers = self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"skip_guidance_layers must be a non-empty list of block indices >= 0, got {layers!r}")
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        for name in ("scale", "start", "stop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"skip_layer_guidance_{name} must be a finite number, got {v!r}")
        if not 0 <= self.start < self.stop <= 1:
            raise ValueError(f"skip-layer guidance needs 0 <= skip_layer_guidance_start < skip_layer_guidance_stop "
                             f"<= 1, got start {self.start}, stop {self.stop}")

    def active(self, step: int, num_steps: int) -> bool:
        """Whether step `step` (0-based) of `num_steps` gets the extra pass (diffusers' and Stability's rule)."""
        return slg_guides(step, num_steps, self.start, self.stop)


def skip_layer_denoiser(model_fn: Callable[..., torch.Tensor], cond: Sequence[torch.Tensor],
                        uncond: Sequence[torch.Tensor], guidance: float, slg: SkipLayerGuidance,
                        num_steps: int) -> Denoiser:
    """CFG as `cfg_denoiser` (one call on [uncond, cond]), plus on SLG steps a second call on the
    conditional half with `skip_blocks=slg.layers`: v + (v_cond - v_skip) * scale, in diffusers' order.
    model_fn(x, t, *cond, skip_blocks=...) -> velocity (MMDiT.forward)."""
    cond = tuple(cond)
    both = tuple(torch.cat([u, c]) for u, c in zip(uncond, cond, strict=True))
    step = _Counter(num_steps, "skip-layer guidance")

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_uncond, v_cond = model_fn(torch.cat([x, x]), torch.cat([t, t]), *both).chunk(2)
        v = cfg_combine(v_uncond, v_cond, guidance)
        if slg.active(step.next(), num_steps):
            v = v + (v_cond - model_fn(x, t, *cond, skip_blocks=slg.layers)) * slg.scale
        return v

    return denoise


@dataclass
class InpaintConstraint:
    """Keep the image outside the mask: the latents there follow the image's own forward process
    x_sigma = sigma * noise + (1 - sigma) * image_latents, with the noise that started the run.

    diffusers `StableDiffusion3InpaintPipeline` blends the latents after each scheduler step with the
    image noised to the next sigma (and with the clean image after the last step). Here the blend is
    applied to the denoiser's input instead (as ComfyUI's `KSamplerX0Inpaint`): the model sees the same
    latents, every sampler step is elementwise, so the repainted region evolves identically, and `finish`
    blends the sampler's state at any step (the pipeline applies it to callbacks and to the result).
    """

    image_latents: torch.Tensor  # (B, C, h, w) model-space latents of the image
    noise: torch.Tensor  # (B, C, h, w) the initial noise
    mask: torch.Tensor  # (B, 1, h, w) 1 = repaint, 0 = keep (binary, latent resolution)
    sigmas: torch.Tensor  # the run's schedule, ending in 0

    def blend(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """x with the kept region replaced by the image at sigmas[step] (diffusers' formula, exact for a
        binary mask): (1 - mask) * image_sigma + mask * x."""
        known = forward_process(self.image_latents, self.noise, self.sigmas[step])
        return (1 - self.mask) * known + self.mask * x

    def wrap(self, denoise: Denoiser) -> Denoiser:
        step = _Counter(len(self.sigmas) - 1, "the inpainting constraint")
        return lambda x, t: denoise(self.blend(x, step.next()), t)

    def finish(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The sampler's state after step i, blended as diffusers' latents after step i."""
        return self.blend(x, i + 1)


class _Counter:
    """Steps 0, 1, ... of a schedule of `num_steps` steps; raises past the end."""

    def __init__(self, num_steps: int, what: str):
        self.i, self.num_steps, self.what = -1, num_steps, what

    def next(self) -> int:
        self.i += 1
        if self.i >= self.num_steps:
            raise RuntimeError(f"{self.what} was called {self.i + 1} times for {self.num_steps} steps: "
                               "it needs a sampler that calls the denoiser once per step")
        return self.i
