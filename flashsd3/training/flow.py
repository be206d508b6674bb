"""`flashsd3-train flow`: fine-tune SD3 with its own objective (rectified flow / flow matching).

Per step, for the whole global batch (objectives.py has the formulas): sigma ~ logit-normal(0, 1) then the
shift map, noise ~ N(0, I), x_sigma = sigma * noise + (1 - sigma) * x0, captions dropped to the empty prompt
with probability p, loss = || v(x_sigma, 1000 sigma, text) - (noise - x0) ||^2. Each rank takes its rows.
diffusers: `examples/dreambooth/train_dreambooth_lora_sd3.py` (same objective, SD3's "logit_normal" weighting).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import rng
from ..sampling import cfg_denoiser, flow_match_sigmas, sample_euler
from .config import TrainConfig, flag, opt
from .loop import Batch
from .objectives import (
    drop_conditioning,
    flow_matching_loss,
    logit_normal_sigmas,
    uniform_sigmas,
)
from .trainable import save_trained, set_trainable

SHIFT = 3.0  # SD3-medium scheduler_config.json, as pipeline.SHIFT (not imported: pipeline imports transformers)
STEP_DRAWS = 0  # the key of a step's draws (sigmas, noise, caption dropout): rng.step_generator(seed, step, 0)


@dataclass(frozen=True)
class FlowConfig(TrainConfig):
    """A flow-matching fine-tuning run."""

    weighting: str = opt("logit-normal", "training sigma density: logit-normal (SD3) or uniform",
                         choices=("logit-normal", "uniform"))
    logit_mean: float = opt(0.0, "logit-normal mean (SD3 paper: 0)")
    logit_std: float = opt(1.0, "logit-normal std (SD3 paper: 1)")
    shift: float = opt(SHIFT, "shift map applied to the drawn sigmas (1 = none)")
    caption_dropout: float = opt(0.1, "probability of training a sample on the empty prompt (for CFG)")

    command = "flow"

    def __post_init__(self):
        super().__post_init__()
        bad = [f"{flag(n)} must be {rule}, got {getattr(self, n)}" for n, rule, ok in (
            ("caption_dropout", "in [0, 1]", 0 <= self.caption_dropout <= 1),
            ("shift", "finite and > 0", 0 < self.shift < math.inf),
            ("logit_std", "finite and > 0", 0 < self.logit_std < math.inf),
            ("logit_mean", "finite", math.isfinite(self.logit_mean))) if not ok]
        if bad:
            raise ValueError("; ".join(bad))


class FlowTask:
    """SD3's objective on adapters or chosen weights of the transformer (loop.Task)."""

    def __init__(self, cfg: FlowConfig, transformer, data, device: torch.device, autocast):
        self.cfg, self.autocast = cfg, autocast
        self.module = self.trained_module(cfg, transformer, data.latent_side)
        context, pooled, _ = data.prompt_file("empty.safetensors")
        self.empty = (context.to(device, torch.float32), pooled.to(device, torch.float32))

    @staticmethod
    def trained_module(cfg: FlowConfig, transformer: nn.Module, latent_side: int) -> nn.Module:
        set_trainable(cfg, transformer)
        return transformer

    def sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        c = self.cfg
        if c.weighting == "uniform":
            return uniform_sigmas(n, shift=c.shift, generator=generator)
        return logit_normal_sigmas(n, mean=c.logit_mean, std=c.logit_std, shift=c.shift, generator=generator)

    def step(self, batch: Batch, update: Callable[[torch.Tensor], float]) -> dict:
        """One flow-matching update on this rank's rows; every draw is made for the global batch."""
        B, rows, x0 = batch.global_size, batch.rows, batch.latents
        generator = rng.step_generator(self.cfg.seed, batch.step, STEP_DRAWS)
        sigma = self.sigmas(B, generator)[rows]  # draws for the global batch, this rank's rows
        noise = torch.randn((B, *x0.shape[1:]), generator=generator)[rows].to(x0.device, x0.dtype)
        u = torch.rand(B, generator=generator)[rows]
        with self.autocast:
            cond = drop_conditioning((batch.context, batch.pooled), self.empty, self.cfg.caption_dropout, u=u)
            loss = flow_matching_loss(self.module, x0, cond, sigma.to(x0.device), noise)
        return {"loss": loss.item(), "grad_norm": update(loss), "sigma": sigma.mean().item(),
                "dropped": (u < self.cfg.caption_dropout).float().mean().item()}

    @torch.no_grad()
    def sample(self, context: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Euler with CFG against the empty prompt, as `flashsd3-sample --sampler euler --guidance G`."""
        n = noise.shape[0]
        uncond = tuple(e.expand(n, *e.shape[1:]).to(noise.device) for e in self.empty)
        denoise = cfg_denoiser(self.module, (context, pooled), uncond, self.cfg.sample_guidance)
        return sample_euler(denoise, noise, flow_match_sigmas(self.cfg.sample_steps, SHIFT))

    def save_final(self, out: Path) -> None:
        save_trained(self.cfg, self.module, out)
