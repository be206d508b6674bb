"""Samplers as plain functions over a sigma table: flow-matching Euler (SD3) and Flash (Flash SD3)."""
from .flash import draw_noise, flash_sigmas, flash_step, noise_to, sample_flash
from .flow_match import (
    cfg_combine,
    cfg_denoiser,
    check_sigmas,
    euler_step,
    flow_match_sigmas,
    forward_process,
    sample_euler,
    shift_sigmas,
    loop_timesteps,
    to_timesteps,
)

__all__ = [
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
