"""The samplers by name, behind one calling convention, so callers look a sampler up instead of testing
strings: `SAMPLERS[name].run(denoise, x, sigmas, noise, callback)`.

`noise` is the re-noise source of stochastic samplers (a list indexed by step, or a callable (i, x) ->
tensor, see `sample_flash`); deterministic samplers ignore it, and callers need not draw it for them.
`flash_initial` re-noises with the run's initial noise at every step: callers pass that noise as `noise`
(`Sampler.same_noise`), as a student trained with `--renoise initial` expects.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .dpm import sample_dpmpp_2m
from .flash import NoiseSource, flash_sigmas, sample_flash
from .flow_match import Denoiser, flow_match_sigmas, sample_euler

Callback = Callable[[int, torch.Tensor], None] | None


@dataclass(frozen=True)
class Sampler:
    """A sampling loop with its sigma table."""

    run: Callable[[Denoiser, torch.Tensor, torch.Tensor, NoiseSource | None, Callback], torch.Tensor]
    sigmas: Callable[[int, float], torch.Tensor]  # (num_steps, shift) -> (num_steps + 1,) ending in 0
    stochastic: bool  # draws fresh noise at every step but the last
    about: str
    same_noise: bool = False  # re-noises with the initial noise: `noise` is that one tensor for every step


def _flash(denoise, x, sigmas, noise, callback):
    return sample_flash(denoise, x, sigmas, noise=noise, callback=callback)


def _flash_initial(denoise, x, sigmas, noise, callback):
    if not isinstance(noise, torch.Tensor):
        raise ValueError("the flash_initial sampler re-noises with the initial noise: pass it as one tensor")
    return sample_flash(denoise, x, sigmas, noise=lambda i, _: noise, callback=callback)


def _euler(denoise, x, sigmas, noise, callback):
    return sample_euler(denoise, x, sigmas, callback=callback)


def _dpmpp_2m(denoise, x, sigmas, noise, callback):
    return sample_dpmpp_2m(denoise, x, sigmas, callback=callback)


SAMPLERS: dict[str, Sampler] = {
    "flash": Sampler(_flash, flash_sigmas, True, "x0 then re-noise (Flash SD3; diffusers stochastic_sampling)"),
    "flash_initial": Sampler(_flash_initial, flash_sigmas, False, "x0 then re-noise with the initial noise (a "
                             "student distilled with --renoise initial)", same_noise=True),
    "euler": Sampler(_euler, flow_match_sigmas, False, "flow ODE, Euler (SD3; diffusers FlowMatchEuler)"),
    "dpmpp_2m": Sampler(_dpmpp_2m, flow_match_sigmas, False, "DPM-Solver++(2M) (Stability's SD3.5 default)"),
}


def get_sampler(name: str) -> Sampler:
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]
