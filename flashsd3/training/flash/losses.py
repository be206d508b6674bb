"""The generator's distillation and DMD losses of Flash Diffusion as small functions of tensors (the adversarial
pair lives with the discriminator, discriminator.py).

Official code: gojasper/flash-diffusion `src/flash/models/flash_sd3/flash_diffusion_model.py` ([M]) L373-496.
All losses are computed in float32 (float64 for float64 inputs) and return a 0-dim tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def distill_l2(x0_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_distill = mean_b mean_{c,h,w} (x0_hat - y)^2: the code's "l2" option ([M] L377-383), in latent space."""
    return (_up(x0_hat) - _up(target)).pow(2).flatten(1).mean(1).mean()


LPIPS_MISSING = ("distill_loss='lpips' needs the `lpips` package and its VGG weights (pip install lpips; the "
                 "weights download on first use); use distill_loss='l2' otherwise")


def check_lpips() -> None:
    """A ValueError naming what is missing when the recipe's LPIPS loss is asked for without the package."""
    import importlib.util

    if importlib.util.find_spec("lpips") is None:
        raise ValueError(LPIPS_MISSING)


class LpipsDistill(nn.Module):
    """The released distillation loss: LPIPS-VGG between the decoded central crops of x0_hat and the target
    ([M] L385-411): crop `crop` latent pixels around the centre (64 of 128 at 1024^2), decode with the frozen
    VAE (gradients flow through it for x0_hat), clamp to [-1, 1], mean LPIPS.

    decode: latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], e.g. flashsd3's VAE decoder with its
    scaling (the recipe divides by the scaling factor and ignores SD3's shift factor, [V] L63-78).
    """

    def __init__(self, decode, crop: int = 64):
        super().__init__()
        check_lpips()
        import lpips  # optional: pip install lpips (its VGG weights download on first use)

        self.lpips = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
        self.decode, self.crop = decode, crop

    def _centre(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        c = min(self.crop, h, w)
        top, left = (h - c) // 2, (w - c) // 2
        return z[..., top : top + c, left : left + c]

    def forward(self, x0_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a = self.decode(self._centre(x0_hat)).clamp(-1, 1)
        b = self.decode(self._centre(target)).clamp(-1, 1)
        return self.lpips(a.float(), b.float()).mean()


def dmd_loss(x0_hat: torch.Tensor, v_real: torch.Tensor, v_fake: torch.Tensor) -> torch.Tensor:
    """Distribution-matching loss in the recipe's form ([M] L415-496):

        g = v_real - v_fake                                 (score_fake - score_real with score = -velocity)
        lambda_b = 1 / (mean_{c,h,w} |x0_hat - v_real| + 1e-5)   per sample, stop-grad (the code compares
                                                            x0_hat with the *velocity*: a quirk, kept)
        L = mean (x0_hat - sg(x0_hat - lambda g))^2

    d L / d x0_hat = (2 / numel) lambda g, so a descent step moves x0_hat along -(v_real - v_fake), which is
    +(x0_real - x0_fake) / sigma' with x0_. = x' - sigma' v_. (both velocities taken at the same x').
    v_real: the teacher's CFG velocity at x' = sigma' e + (1 - sigma') x0_hat; v_fake: the student's own
    conditional velocity there (no separate fake-score network).
    """
    x0 = _up(x0_hat)
    v_r, v_f = _up(v_real.detach()), _up(v_fake.detach())
    norm = 1.0 / ((x0.detach() - v_r).abs().flatten(1).mean(1) + 1e-5)  # (B,)
    grad = norm.view(-1, *([1] * (x0.ndim - 1))) * (v_r - v_f)
    return F.mse_loss(x0, (x0 - grad).detach())
