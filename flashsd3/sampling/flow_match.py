"""Rectified-flow sampling: sigma tables, the Euler ODE step and loop, classifier-free guidance.

SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 2 and 5.3.2) moves a latent along
x_sigma = (1 - sigma) * x0 + sigma * noise from sigma = 1 (noise) to sigma = 0 (image); the model predicts
the velocity v = noise - x0. The sigma grid is "shifted" towards high noise: s*sigma / (1 + (s-1)*sigma).

References: Stability-AI/sd3.5 `sd3_impls.py` (`ModelSamplingDiscreteFlow`, `sample_euler`);
diffusers `schedulers/scheduling_flow_match_euler_discrete.py` (`FlowMatchEulerDiscreteScheduler`) and
`pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py` (guidance). Tables here are bit-identical
to diffusers 0.42.1 (tests/test_sampling.py checks steps 1..30 for shifts 1, 3, 6).

Everything is a plain function over a sigma tensor: no scheduler object, no hidden step index.
`denoise(x, t) -> velocity` is the model (plus guidance); `t` is the (B,) float32 timestep sigma * 1000.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,C,H,W), t (B,)) -> velocity
NUM_TRAIN_TIMESTEPS = 1000  # scheduler_config.json num_train_timesteps; t = sigma * 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift s*sigma / (1 + (s-1)*sigma) in the dtype of `sigmas` (SD3 paper eq. 23, shift = sqrt(m/n)).

    Operation order as diffusers, so float32/float64 results are bitwise the same.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _linspace_like_numpy(start: float, stop: float, num: int) -> torch.Tensor:
    # numpy (used by diffusers) computes start + i*step for every point and pins the last one;
    # torch.linspace fills the second half backwards from `stop` and differs in the last float64 bit
    # for most lengths, so we follow numpy's recipe.
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    y = torch.arange(num, dtype=torch.float64) * ((stop - start) / (num - 1)) + start
    y[-1] = stop
    return y


def flow_match_sigmas(
    num_steps: int, shift: float = 3.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """(num_steps + 1,) float32 sigmas from 1 down to ..., ending in 0 (diffusers `set_timesteps(n)`).

    shift 3.0: SD3-medium scheduler/scheduler_config.json. Recipe (diffusers 0.42.1, no dynamic shift):
    the training table sigma = t/N for t = N..1 is shifted once in float32; its ends sigma_max = 1 and
    sigma_min = shift(1/N) are spread over `num_steps` points in float64 (numpy linspace on the t scale),
    divided by N, shifted *again* (so sigma_min is shifted twice), cast to float32, and a 0 appended.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    train_t = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32)  # N..1
    train_sigmas = shift_sigmas(train_t / num_train_timesteps, shift)  # float32, as the diffusers table
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    t = _linspace_like_numpy(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = shift_sigmas(t / num_train_timesteps, shift).to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def forward_process(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The rectified-flow forward (noising) process x_sigma = sigma * noise + (1 - sigma) * x0.

    SD3 paper eq. 3 with a_t = 1 - t, b_t = t (diffusers `FlowMatchEulerDiscreteScheduler.scale_noise`).
    sigma: a float, a 0-dim tensor or one value per sample (B,); computed in float32 (float64 for float64
    inputs) and returned in x0's dtype. Used by training (noised data), img2img and the Flash sampler's re-noise.
    """
    dtype = torch.promote_types(x0.dtype, torch.float32)
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x0.device)
    if sigma.ndim == 1:  # per-sample sigmas broadcast over (C, H, W)
        sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (sigma * noise.to(x0.device, dtype) + (1 - sigma) * x0.to(dtype)).to(x0.dtype)


def to_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Model timesteps t = sigma * N in float32 (diffusers `scheduler.timesteps` = sigmas[:-1] * N)."""
    return torch.as_tensor(sigmas, dtype=torch.float32) * num_train_timesteps


def check_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Validate a custom schedule and return it as a float32 CPU tensor ending in 0.

    Must be 1-D, finite, within [0, 1] and strictly decreasing; a 0 is appended if it does not end in 0.
    Used as given: unlike diffusers' `set_timesteps(sigmas=...)`, no shift is applied (call shift_sigmas).
    """
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float32)
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or s.min() < 0 or s.max() > 1:
        raise ValueError(f"sigmas must be finite and within [0, 1], got {s.tolist()}")
    if s[-1] != 0:
        s = torch.cat([s, s.new_zeros(1)])
    if s.numel() < 2 or not (s[1:] < s[:-1]).all():
        raise ValueError(f"sigmas must be strictly decreasing with at least one step, got {s.tolist()}")
    return s


def loop_timesteps(sigmas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(steps, B) float32 timesteps t = sigma * 1000 on x's device, one row per step, copied once.

    One copy before the loop, not one per step: a blocking host-to-device copy inside the loop would
    make the host wait for the GPU at every step. float32 even for fp16/bf16 models, as diffusers'
    SD3 pipeline: fp16 would round t=857.69 to 857.5.
    """
    return to_timesteps(sigmas[:-1]).to(x.device)[:, None].expand(-1, x.shape[0])


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One flow-matching Euler ODE step x + (sigma_next - sigma) * v, in float32, returned in x's dtype.

    As diffusers `FlowMatchEulerDiscreteScheduler.step` (which upcasts the sample to float32; we upcast the
    velocity too). sigma, sigma_next: floats or 0-dim float32 tensors from the table.
    """
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return (x.float() + dt * velocity.float()).to(x.dtype)


def sample_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE from sigmas[0] to 0 with Euler steps; x: (B, C, H, W) noise at sigmas[0].

    callback(i, x) is called after step i with the new state.
    """
    sigmas = check_sigmas(sigmas)
    timesteps = loop_timesteps(sigmas, x)
    for i in range(len(sigmas) - 1):
        velocity = denoise(x, timesteps[i])
        x = euler_step(x, velocity, sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i, x)
    return x


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance v_u + g * (v_c - v_u), in the model dtype as diffusers' SD3 pipeline."""
    return v_uncond + guidance * (v_cond - v_uncond)


def cfg_denoiser(
    model_fn: Callable[..., torch.Tensor],
    cond: Sequence[torch.Tensor],
    uncond: Sequence[torch.Tensor] | None = None,
    guidance: float = 1.0,
) -> Denoiser:
    """Wrap `model_fn(x, t, *cond) -> velocity` into `denoise(x, t)` with classifier-free guidance.

    cond / uncond: conditioning tensors batched on dim 0, e.g. (context (B, L, 4096), pooled (B, 2048)).
    Guidance only when guidance > 1 (diffusers `do_classifier_free_guidance`); then one model call on the
    batch [uncond, cond] (diffusers: cat([negative, positive])) and its halves are combined.
    """
    cond = tuple(cond)
    if guidance <= 1:
        return lambda x, t: model_fn(x, t, *cond)
    uncond = None if uncond is None else tuple(uncond)
    if uncond is None or len(uncond) != len(cond):
        raise ValueError(f"guidance {guidance} > 1 needs `uncond` with the same {len(cond)} tensors as `cond`")
    both = tuple(torch.cat([u, c]) for u, c in zip(uncond, cond, strict=True))

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_uncond, v_cond = model_fn(torch.cat([x, x]), torch.cat([t, t]), *both).chunk(2)
        return cfg_combine(v_uncond, v_cond, guidance)

    return denoise
