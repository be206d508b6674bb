"""Flash Diffusion sampler for Flash SD3 (Chadebec et al. 2024, "Flash Diffusion", arXiv:2406.02347).

The distilled student predicts x0 in one shot at each sigma; between steps the x0 guess is re-noised to the
next sigma with *fresh* Gaussian noise (a stochastic, consistency-model-like sampler), not integrated as an
ODE. The last step returns the x0 prediction itself.

Reference: initml/diffusers fork, `schedulers/scheduling_flash_flow_match_euler_discrete.py`
(`FlashFlowMatchEulerDiscreteScheduler`); stock diffusers 0.42.1 `FlowMatchEulerDiscreteScheduler(
stochastic_sampling=True)` takes the same step. The schedule is the stock flow-matching table (the
fork's `set_timesteps` gives bitwise the same sigmas as diffusers' FlowMatchEulerDiscreteScheduler), so
`flash_sigmas` is `flow_match_sigmas` with the Flash SD3 shift. Flash SD3 runs 4 steps without guidance
(model card: num_inference_steps=4, guidance_scale=0).

Differences from the fork, on purpose: the update is computed in float32 (the fork computes in the latent
dtype, fp16 in the card), and re-noise comes from a caller's generator, or the global CPU RNG, drawn in
float32 and moved to the latents' device (the fork draws from the global RNG of the latents' device in
their dtype), so a seed gives the same image on any device.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .flow_match import NUM_TRAIN_TIMESTEPS, Denoiser, check_sigmas, flow_match_sigmas, forward_process, loop_timesteps

NoiseSource = Sequence[torch.Tensor] | Callable[[int, torch.Tensor], torch.Tensor]  # step i, x -> noise


def flash_sigmas(
    num_steps: int, shift: float = 3.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """(num_steps + 1,) float32 Flash sigmas ending in 0; 4 steps -> [1, 0.8577, 0.6022, 0.0089, 0].

    shift 3.0: SD3-medium scheduler/scheduler_config.json, the scheduler config the Flash SD3 card loads.
    """
    return flow_match_sigmas(num_steps, shift, num_train_timesteps)


def flash_step(x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, noise: torch.Tensor | None):
    """One Flash step in float32, returned in x's dtype; sigma, sigma_next: floats or 0-dim tensors.

    x0 = x - sigma * v; at sigma_next == 0 (the last step) return x0, otherwise re-noise it to
    sigma_next * noise + (1 - sigma_next) * x0 (the forward process at sigma_next).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32)
    x0 = x.float() - sigma * velocity.float()
    if sigma_next == 0:
        return x0.to(x.dtype)
    if noise is None or noise.shape != x.shape:
        raise ValueError(f"flash_step at sigma_next={sigma_next.item()} needs noise of shape {tuple(x.shape)}, "
                         f"got {None if noise is None else tuple(noise.shape)}")
    return forward_process(x0, noise, sigma_next).to(x.dtype)  # float32 x0: computed in float32


def draw_noise(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 standard normal shaped like x, drawn on the generator's device (global CPU RNG if None),
    then moved to x's device: the same seed gives the same noise on CPU and any GPU."""
    device = generator.device if generator is not None else torch.device("cpu")
    return noise_to(torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32), x.device)


def noise_to(e: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move CPU-drawn noise to `device`; to CUDA through pinned memory without blocking the host."""
    if e.device != device and device.type == "cuda":
        return e.pin_memory().to(device, non_blocking=True)
    return e.to(device)


def _noise_for_step(i: int, x: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
    if callable(noise):
        return noise(i, x)
    if i >= len(noise):
        raise ValueError(f"noise list has {len(noise)} tensors but step {i} needs one (one per step but the last)")
    return noise[i]


def sample_flash(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the Flash sampler; x: (B, C, H, W) noise at sigmas[0]. Returns the final x0 prediction.

    Re-noise for step i (all steps but the last) comes from `noise` (a list indexed by step, or a callable
    (i, x) -> tensor) if given, else from `generator` (global CPU RNG if None). callback(i, x) after step i.
    """
    if generator is not None and noise is not None:
        raise ValueError("pass either `generator` or `noise`, not both")
    sigmas = check_sigmas(sigmas)
    timesteps = loop_timesteps(sigmas, x)
    if noise is None:  # draw every re-noise up front (same draws, same order): no host sync in the loop
        noise = [draw_noise(x, generator) for _ in range(len(sigmas) - 2)]
    for i in range(len(sigmas) - 1):
        velocity = denoise(x, timesteps[i])
        e = _noise_for_step(i, x, noise) if sigmas[i + 1] > 0 else None
        x = flash_step(x, velocity, sigmas[i], sigmas[i + 1], e)
        if callback is not None:
            callback(i, x)
    return x
