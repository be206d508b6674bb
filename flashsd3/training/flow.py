"""`flashsd3-train flow`: fine-tune SD3 with its own objective (rectified flow / flow matching).

Per step, for the whole global batch (objectives.py has the formulas): sigma ~ logit-normal(0, 1) then the
shift map, noise ~ N(0, I), x_sigma = sigma * noise + (1 - sigma) * x0, captions dropped to the empty prompt
with probability p, loss = || v(x_sigma, 1000 sigma, text) - (noise - x0) ||^2. Each rank takes its rows.
diffusers: `examples/dreambooth/train_dreambooth_lora_sd3.py` (same objective, SD3's "logit_normal" weighting).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipeline import SHIFT
from ..sampling import cfg_denoiser, flow_match_sigmas, sample_euler
from .config import TrainConfig, opt
from .loop import Batch
from .objectives import (
    drop_conditioning,
    flow_matching_loss,
    logit_normal_sigmas,
    uniform_sigmas,
)
from .trainable import make_trainable, save_trained


@dataclass(frozen=True)
class FlowConfig(TrainConfig):
    """A flow-matching fine-tuning run."""

    weighting: str = opt("logit-normal", "training sigma density: logit-normal (SD3) or uniform",
                         choices=("logit-normal", "uniform"))
    logit_mean: float = opt(0.0, "logit-normal mean (SD3 paper: 0)")
    logit_std: float = opt(1.0, "logit-normal std (SD3 paper: 1)")
    shift: float = opt(SHIFT, "shift map applied to the drawn sigmas (SD3-medium scheduler: 3.0; 1 = none)")
    caption_dropout: float = opt(0.1, "probability of training a sample on the empty prompt (for CFG)")

    command = "flow"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.caption_dropout <= 1 or not self.shift > 0 or not self.logit_std > 0:
            raise ValueError(f"need 0 <= caption_dropout <= 1, shift > 0, logit_std > 0; got {self.caption_dropout}, "
                             f"{self.shift}, {self.logit_std}")


class FlowTask:
    """SD3's objective on adapters or chosen weights of the transformer (loop.Task)."""

    def __init__(self, cfg: FlowConfig, transformer, data, ranks):
        make_trainable(cfg, transformer)
        self.cfg, self.module = cfg, transformer
        context, pooled, _ = data.prompt_file("empty.safetensors")
        self.empty = (context.to(ranks.device, torch.float32), pooled.to(ranks.device, torch.float32))

    def sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        c = self.cfg
        if c.weighting == "uniform":
            return uniform_sigmas(n, shift=c.shift, generator=generator)
        return logit_normal_sigmas(n, mean=c.logit_mean, std=c.logit_std, shift=c.shift, generator=generator)

    def loss(self, module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        B, rows, x0 = batch.global_size, batch.rows, batch.latents
        sigma = self.sigmas(B, generator)[rows]  # draws for the global batch, this rank's rows
        noise = torch.randn((B, *x0.shape[1:]), generator=generator)[rows].to(x0.device, x0.dtype)
        u = torch.rand(B, generator=generator)[rows]
        cond = drop_conditioning((batch.context, batch.pooled), self.empty, self.cfg.caption_dropout, u=u)
        loss = flow_matching_loss(module, x0, cond, sigma.to(x0.device), noise)
        return loss, {"sigma": sigma.mean().item(), "dropped": (u < self.cfg.caption_dropout).float().mean().item()}

    @torch.no_grad()
    def sample(self, context: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Euler with CFG against the empty prompt, as `flashsd3-sample --sampler euler --guidance G`."""
        n = noise.shape[0]
        uncond = tuple(e.expand(n, *e.shape[1:]).to(noise.device) for e in self.empty)
        denoise = cfg_denoiser(self.module, (context, pooled), uncond, self.cfg.sample_guidance)
        return sample_euler(denoise, noise, flow_match_sigmas(self.cfg.sample_steps, SHIFT))

    def save_final(self, out: Path) -> None:
        save_trained(self.cfg, self.module, out)
