"""SD3's rectified-flow training objective, as small functions of tensors.

SD3 paper (Esser et al. 2024, arXiv 2403.03206) sec. 2 and 3.1: x_sigma = sigma * noise + (1 - sigma) * x0,
the model predicts the velocity v = noise - x0 (the conditional flow-matching target), and sigma is drawn from
a logit-normal density (mean 0, std 1 was the paper's best, "lognorm(0.00, 1.00)"). The resolution shift
s*sigma / (1 + (s-1)*sigma) moves sigmas towards noise (sec. 5.3.2). minRF (cloneofsimo/minRF, `rf.py`) states
the same thing in 25 lines; diffusers `training_utils.py` (`compute_density_for_timestep_sampling`) and
`examples/dreambooth/train_dreambooth_lora_sd3.py` are the library equivalents.

`model_fn(x, t, *cond) -> velocity` is any MMDiT-shaped callable; t = 1000 * sigma (flashsd3.sampling).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..sampling import forward_process, shift_sigmas
from ..sampling.flow_match import NUM_TRAIN_TIMESTEPS

ModelFn = Callable[..., torch.Tensor]


def logit_normal_sigmas(n: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) float32 sigmas = shift(sigmoid(mean + std * N(0, 1))) on the generator's device (SD3 eq. 19)."""
    device = generator.device if generator is not None else None
    u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    return shift_sigmas(u, shift)


def uniform_sigmas(n: int, *, shift: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) float32 sigmas = shift(U(0, 1)) (rectified flow with uniform t, SD3 "rf" baseline)."""
    device = generator.device if generator is not None else None
    return shift_sigmas(torch.rand(n, generator=generator, device=device), shift)


def discrete_sigmas(n: int, table: torch.Tensor, *,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n entries uniformly from a sigma grid (e.g. the 1000-entry training table); returns (sigmas, indices)."""
    table = torch.as_tensor(table, dtype=torch.float32)
    device = generator.device if generator is not None else None
    idx = torch.randint(len(table), (n,), generator=generator, device=device)
    return table.to(idx.device)[idx], idx


def training_sigma_table(shift: float = 3.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """(N,) float32 training grid sigma_j = shift((N - j) / N), j = 0..N-1, from 1 down to shift(1/N)
    (diffusers `FlowMatchEulerDiscreteScheduler.__init__`: its `sigmas` before `set_timesteps`)."""
    t = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32)
    return shift_sigmas(t / num_train_timesteps, shift)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_sigma / d sigma = noise - x0: what the model is trained to predict."""
    return noise - x0


def flow_matching_loss(model_fn: ModelFn, x0: torch.Tensor, cond: Sequence[torch.Tensor], sigma: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """mean || model(x_sigma, 1000 sigma, *cond) - (noise - x0) ||^2, the loss in float32.

    x0, noise (B, C, H, W) in the model's dtype; sigma (B,) float32, one per sample; cond e.g. (context, pooled).
    """
    x_sigma = forward_process(x0, noise, sigma)
    t = (sigma * NUM_TRAIN_TIMESTEPS).to(x0.device, torch.float32)
    v = model_fn(x_sigma, t, *cond)
    return F.mse_loss(v.float(), velocity_target(x0, noise).float())


def drop_conditioning(cond: Sequence[torch.Tensor], empty: Sequence[torch.Tensor], p: float,
                      generator: torch.Generator | None = None, *, u: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Replace each sample's conditioning by the empty prompt's with probability p (caption dropout, which
    teaches the unconditional velocity that classifier-free guidance needs). empty: tensors of batch 1 or B.

    u: (B,) uniform draws to use instead of drawing them (a run draws them for its whole global batch, so
    which samples drop does not depend on how the batch is split over ranks); sample b drops if u[b] < p.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
    B = cond[0].shape[0]
    if u is None:
        device = generator.device if generator is not None else None
        u = torch.rand(B, generator=generator, device=device)
    elif u.shape != (B,):
        raise ValueError(f"u must have shape ({B},), one draw per sample, got {tuple(u.shape)}")
    drop = (u < p).to(cond[0].device)
    out = []
    for c, e in zip(cond, empty):
        mask = drop.view(-1, *([1] * (c.ndim - 1)))
        out.append(torch.where(mask, e.to(c.device, c.dtype).expand_as(c), c))
    return tuple(out)
