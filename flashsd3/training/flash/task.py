"""`flashsd3-train flash`: Flash Diffusion distillation of the cached dataset's model into a LoRA (loop.Task).

Teacher = the transformer with its adapters off, student = the same transformer with trainable adapters, plus
a discriminator head; one AdamW holds both (torch defaults but the recipe's lr 1e-5, weight decay 0.01) and
each batch makes a generator step then a discriminator step: a parameter without a gradient is skipped by
AdamW, so the two steps equal the recipe's two optimisers (gojasper/flash-diffusion
`examples/train_flash_sd3.py` L289-298). Gradients are averaged over ranks
by hand (the passes call the transformer several times, which DDP's reducer does not follow).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ...sampling import (
    cfg_denoiser,
    flash_sigmas,
    flow_match_sigmas,
    sample_euler,
    sample_flash,
)
from ..config import TrainConfig, opt
from ..loop import Batch
from ..trainable import make_trainable, save_trained
from .losses import check_lpips
from .models import make_head, mmdit_flash_models
from .recipe import FlashRecipe
from .step import FlashBatch, flash_update

SAMPLE_STEPS = (1, 2, 4)  # student columns of the sample grid; the teacher's is the last column


@dataclass(frozen=True)
class FlashConfig(TrainConfig):
    """Flash Diffusion distillation into a LoRA (defaults: the released SD3 recipe, gojasper/flash-diffusion
    `examples/configs/flash_sd3.yaml`)."""

    lr: float = opt(1e-5, "AdamW learning rate of the adapters and the head (recipe 1e-5)")
    weight_decay: float = opt(0.01, "AdamW weight decay (torch default, as the recipe)")
    grad_clip: float = opt(0.0, "clip each pass's gradient norm to this (0: off, as the recipe)")
    batch_size: int = opt(4, "global batch (recipe: 2 per GPU on 2 GPUs)")
    lora_rank: int = opt(64, "LoRA rank (flash-sd3: 64)")
    lora_alpha: float = opt(8.0, "LoRA alpha (flash-sd3: 8, scale 0.125)")
    teacher_steps: int = opt(32, "K: steps of the teacher's Euler grid")
    shift: float = opt(3.0, "shift of the teacher grid and of the Flash sampler (SD3-medium: 3)")
    guidance_min: float = opt(7.0, "teacher guidance w ~ U[min, max], one per batch")
    guidance_max: float = opt(13.0, "see guidance_min")
    phase_batches: tuple[str, ...] = opt(("2500", "2500", "2500"), "batches of phases 0, 1, 2 (phase 3 runs on)")
    lambda_adv: tuple[str, ...] = opt(("0", "0.1", "0.3", "0.5"), "adversarial weight per phase")
    lambda_dmd: tuple[str, ...] = opt(("0", "0.3", "0.5", "0.7"), "DMD weight per phase")
    mixture_modes: str = opt("recipe", "start-index modes: recipe (0, K/4, K/2, 3K/4) or sampler (the 4-step "
                                       "sampler's sigmas: an option, not the recipe)", choices=("recipe", "sampler"))
    distill_loss: str = opt("l2", "l2 (latent) or lpips (the recipe's; needs the lpips package, VGG weights and "
                                  "the VAE)", choices=("l2", "lpips"))
    disc_input: str = opt("output", "discriminator input: the teacher's output (released code) or blocks "
                                    "(--disc-blocks' image tokens)", choices=("output", "blocks"))
    disc_blocks: tuple[str, ...] = opt((), "teacher blocks whose image tokens the discriminator reads (blocks)")
    d_pass: str = opt("fresh", "discriminator step on a fresh forward (recipe) or reusing the generator pass's",
                      choices=("fresh", "reuse"))
    negative: str = opt("recipe", "CFG negative: the recipe's negative prompt (cached by prepare) or empty",
                        choices=("recipe", "empty"))

    command = "flash"

    def __post_init__(self):
        super().__post_init__()
        if self.train_modules:
            raise ValueError("flash distils into LoRA adapters (the teacher is the model with them off): "
                             "--train-modules is not supported")
        self.recipe()  # its checks, with the field names
        if self.distill_loss == "lpips":
            check_lpips()

    def recipe(self) -> FlashRecipe:
        def floats(xs):
            return tuple(float(x) for x in xs)

        return FlashRecipe(
            K=self.teacher_steps, shift=self.shift, guidance=(self.guidance_min, self.guidance_max),
            phase_batches=tuple(int(x) for x in self.phase_batches), lambda_adv=floats(self.lambda_adv),
            lambda_dmd=floats(self.lambda_dmd), modes=self.mixture_modes, distill_loss=self.distill_loss,
            disc_input=self.disc_input, disc_blocks=tuple(int(x) for x in self.disc_blocks), d_pass=self.d_pass)


class FlashModule(nn.Module):
    """Everything trained: the transformer's adapters and the discriminator head (one checkpoint)."""

    def __init__(self, transformer: nn.Module, head: nn.Module):
        super().__init__()
        self.transformer, self.head = transformer, head


class FlashTask:
    """Flash distillation as a loop.Task with its own update (two alternating steps per batch)."""

    def __init__(self, cfg: FlashConfig, transformer, data, ranks):
        make_trainable(cfg, transformer)
        self.cfg, self.recipe, self.ranks = cfg, cfg.recipe(), ranks
        side = data.batch([0])[0].shape[-1]
        torch.manual_seed(cfg.seed + 1)  # the head: the same on every rank
        head = make_head(self.recipe, transformer, side).to(ranks.device)
        self.module = FlashModule(transformer, head)
        distill = self._lpips(data) if cfg.distill_loss == "lpips" else None
        self.models = mmdit_flash_models(transformer, head, self.recipe, **({"distill": distill} if distill else {}))
        name = "negative.safetensors" if cfg.negative == "recipe" else "empty.safetensors"
        if not (data.folder / name).is_file():
            raise ValueError(f"the cache {data.folder} has no {name} (made before negative prompts were cached): "
                             "run `flashsd3-train prepare` again into a new folder, or pass --negative empty")
        context, pooled, _ = data.prompt_file(name)
        self.uncond = (context.to(ranks.device, torch.float32), pooled.to(ranks.device, torch.float32))

    def _lpips(self, data):
        from .. import models
        from .losses import LpipsDistill

        vae = models.load_vae(data.spec.model, torch.float32, self.ranks.device)
        return LpipsDistill(lambda z: vae.decode(vae.latents_to_vae(z))).to(self.ranks.device)

    def _negative(self, n: int) -> tuple[torch.Tensor, ...]:
        return tuple(u.expand(n, *u.shape[1:]) for u in self.uncond)

    def _sync(self, optimizer: torch.optim.Optimizer) -> None:
        """Average this step's gradients over ranks (those that exist: the other pass's are None)."""
        if self.ranks.world == 1:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.ranks.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def update(self, module, batch: Batch, generator, optimizer, autocast) -> dict:
        """Both steps of batch `batch.step`; randomness keyed by (seed, step, global row), not `generator`."""
        fb = FlashBatch(batch.latents, (batch.context, batch.pooled), self._negative(len(batch.latents)),
                        ids=list(range(batch.rows.start, batch.rows.stop)))
        logs = flash_update(self.models, self.recipe, fb, batch.step, self.cfg.seed, optimizer, optimizer,
                            sync=self._sync, autocast=autocast, clip=self.cfg.grad_clip)
        return {"loss": logs.pop("g_total"), **logs}

    @torch.no_grad()
    def sample(self, context: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per prompt: the student at 1, 2 and 4 Flash steps (no guidance), then the teacher (sample_steps Euler
        steps, CFG sample_guidance against the negative); (4n, C, h, w), one row of 4 per prompt."""
        model, n = self.module.transformer, noise.shape[0]
        def renoise(i, x):  # re-noise of step i, the same for every grid
            return torch.randn(x.shape, generator=torch.Generator().manual_seed(self.cfg.sample_seed + 1000 + i)).to(x)

        def student(x, t):
            return model(x, t, context, pooled)

        cols = [sample_flash(student, noise, flash_sigmas(s, self.cfg.shift), noise=renoise) for s in SAMPLE_STEPS]
        teacher = cfg_denoiser(self.models.teacher, (context, pooled), self._negative(n), self.cfg.sample_guidance)
        cols.append(sample_euler(teacher, noise, flow_match_sigmas(self.cfg.sample_steps, self.cfg.shift)))
        return torch.stack(cols, 1).flatten(0, 1)

    def save_final(self, out: Path) -> None:
        save_trained(self.cfg, self.module.transformer, out)
