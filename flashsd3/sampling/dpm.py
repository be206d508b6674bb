"""DPM-Solver++(2M) on a flow model, as the default sampler of Stability's SD3.5 reference computes it.

Stability-AI/sd3.5 `sd3_impls.py` `sample_dpmpp_2m` (the k-diffusion form of Lu et al. 2022, "DPM-Solver++",
Algorithm 2 with alpha = 1): the model's data prediction is x0 = x - sigma * v (`ModelSamplingDiscreteFlow.
calculate_denoised`) and the log-SNR variable is t = -log(sigma), i.e. the rectified-flow latent is treated as if
it were x0 + sigma * noise. diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True)` instead uses
lambda = log((1 - sigma) / sigma) and scales x by (1 - sigma); the two agree on the first-order step's x0 term
but differ in the second-order correction, so they are different samplers with the same name.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .flow_match import Denoiser, check_sigmas, loop_timesteps


def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, prev_x0: torch.Tensor | None,
                  sigma_prev, sigma, sigma_next) -> torch.Tensor:
    """One DPM-Solver++(2M) step from sigma to sigma_next, in x0's dtype (float32 at least).

    t = -log sigma, h = t_next - t; first order (first step, and the last one into sigma_next = 0):
    x' = (sigma_next / sigma) x - expm1(-h) x0. Second order: x0 replaced by
    (1 + 1/(2r)) x0 - 1/(2r) prev_x0 with r = (t - t_prev) / h (sd3_impls.py `sample_dpmpp_2m`).
    """
    sigma_next = torch.as_tensor(sigma_next, dtype=x0.dtype)
    if sigma_next == 0:  # the first-order formula at t_next = inf: exactly x0
        return x0
    t, t_next = -torch.as_tensor(sigma, dtype=x0.dtype).log(), -sigma_next.log()
    h = t_next - t
    d = x0
    if prev_x0 is not None:
        r = (t + torch.as_tensor(sigma_prev, dtype=x0.dtype).log()) / h  # (t - t_prev) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
    return (torch.exp(-t_next) / torch.exp(-t)) * x.to(x0.dtype) - torch.expm1(-h) * d


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run DPM-Solver++(2M) from sigmas[0] to 0; x: (B, C, H, W) at sigmas[0]. One model call per step.

    The x0 prediction and the update are computed in float32 (float64 for float64 latents), as Stability's
    `calculate_denoised` runs on the model output cast to float32; the state is returned in x's dtype.
    callback(i, x) after step i.
    """
    sigmas = check_sigmas(sigmas)
    timesteps = loop_timesteps(sigmas, x)
    dtype = torch.promote_types(x.dtype, torch.float32)
    prev_x0 = None
    for i in range(len(sigmas) - 1):
        velocity = denoise(x, timesteps[i])
        x0 = x.to(dtype) - sigmas[i].to(dtype) * velocity.to(dtype)
        sigma_prev = sigmas[i - 1] if i > 0 else None
        x = dpmpp_2m_step(x, x0, prev_x0, sigma_prev, sigmas[i], sigmas[i + 1]).to(x.dtype)
        prev_x0 = x0
        if callback is not None:
            callback(i, x)
    return x
