"""Samplers as plain functions over a sigma table: flow-matching Euler (SD3), Flash (Flash SD3) and
DPM-Solver++(2M) (SD3.5), their table by name, and the denoiser stages (CFG, skip-layer guidance, inpainting)."""
from .dpm import dpmpp_2m_step, sample_dpmpp_2m
from .flash import draw_noise, flash_sigmas, flash_step, noise_to, sample_flash
from .flow_match import (
    cfg_combine,
    cfg_denoiser,
    check_sigmas,
    euler_step,
    flow_match_sigmas,
    forward_process,
    loop_timesteps,
    sample_euler,
    shift_sigmas,
    to_timesteps,
)
from .guidance import InpaintConstraint, SkipLayerGuidance, skip_layer_denoiser
from .table import SAMPLERS, Sampler, get_sampler

__all__ = [
    "InpaintConstraint",
    "SAMPLERS",
    "Sampler",
    "SkipLayerGuidance",
    "dpmpp_2m_step",
    "get_sampler",
    "sample_dpmpp_2m",
    "skip_layer_denoiser",
    "cfg_combine",
    "cfg_denoiser",
    "check_sigmas",
    "draw_noise",
    "euler_step",
    "flash_sigmas",
    "flash_step",
    "noise_to",
    "flow_match_sigmas",
    "forward_process",
    "sample_euler",
    "sample_flash",
    "shift_sigmas",
    "loop_timesteps",
    "to_timesteps",
]
