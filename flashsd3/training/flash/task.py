"""`flashsd3-train flash`: Flash Diffusion distillation of the cached dataset's model into a LoRA (loop.Task).

Teacher = the transformer with its adapters off, student = the same transformer with trainable adapters, plus
a discriminator head; one AdamW holds both (torch defaults but the recipe's lr 1e-5, weight decay 0.01) and
each batch makes a generator update then a discriminator update (flash_step): a parameter without a gradient
is skipped by AdamW, so the two updates equal the recipe's two optimisers (gojasper/flash-diffusion
`examples/train_flash_sd3.py` L289-298). Every setting of the method is a field of `FlashRecipe` (recipe.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ... import rng
from ...sampling import cfg_denoiser, flash_sigmas, flow_match_sigmas, get_sampler, sample_euler
from ..config import TrainConfig, opt
from ..loop import Batch
from ..trainable import save_trained, set_trainable
from .discriminator import make_head
from .losses import check_lpips
from .models import mmdit_flash_models
from .recipe import FlashRecipe, preset_for
from .step import FlashBatch, flash_step

SAMPLE_STEPS = (1, 2, 4)  # student columns of the sample grid; the teacher's is the last column
HEAD_SEED, RENOISE_SEED = 1, 1000  # offsets from --seed (the head's init) and --sample-seed (the grid's re-noise)


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
    negative: str = opt("recipe", "CFG negative: the recipe's negative prompt (cached by prepare) or empty",
                        choices=("recipe", "empty"))
    # its fields are settings of their own (--teacher-steps, ...); --recipe names the preset the others override
    recipe: FlashRecipe = field(default=FlashRecipe(), metadata={"preset": preset_for})

    command = "flash"

    def __post_init__(self):
        super().__post_init__()
        if self.train_modules:
            raise ValueError("flash distils into LoRA adapters (the teacher is the model with them off): "
                             "--train-modules is not supported")
        if self.recipe.distill_loss == "lpips":
            check_lpips()


class FlashModule(nn.Module):
    """Everything trained: the transformer's adapters and the discriminator head (one checkpoint)."""

    def __init__(self, transformer: nn.Module, head: nn.Module):
        super().__init__()
        self.transformer, self.head = transformer, head


class FlashTask:
    """Flash distillation as a loop.Task: each step is a generator and a discriminator update."""

    def __init__(self, cfg: FlashConfig, transformer, data, device: torch.device, autocast):
        self.cfg, self.recipe, self.autocast = cfg, cfg.recipe, autocast
        self.module = self.trained_module(cfg, transformer, data.latent_side).to(device)
        distill = {"distill": self._lpips(data, device)} if self.recipe.distill_loss == "lpips" else {}
        self.models = mmdit_flash_models(transformer, self.module.head, self.recipe, **distill)
        name = "negative.safetensors" if cfg.negative == "recipe" else "empty.safetensors"
        if not (data.folder / name).is_file():
            raise ValueError(f"the cache {data.folder} has no {name} (made before negative prompts were cached): "
                             "run `flashsd3-train prepare` again into a new folder, or pass --negative empty")
        context, pooled, _ = data.prompt_file(name)
        self.uncond = (context.to(device, torch.float32), pooled.to(device, torch.float32))

    @staticmethod
    def trained_module(cfg: FlashConfig, transformer: nn.Module, latent_side: int) -> FlashModule:
        set_trainable(cfg, transformer)
        with rng.seeded(cfg.seed + HEAD_SEED):  # the same head on every rank
            head = make_head(cfg.recipe, transformer, latent_side)
        return FlashModule(transformer, head)

    @staticmethod
    def _lpips(data, device):
        from .. import models
        from .losses import LpipsDistill

        vae = models.training_vae(data.spec.model, torch.float32, device)
        return LpipsDistill(lambda z: vae.decode(vae.latents_to_vae(z))).to(device)

    def _negative(self, n: int) -> tuple[torch.Tensor, ...]:
        return tuple(u.expand(n, *u.shape[1:]) for u in self.uncond)

    def step(self, batch: Batch, update: Callable[[torch.Tensor], float]) -> dict:
        """Both updates of batch `batch.step`; randomness keyed by (seed, step, pass, global row)."""
        fb = FlashBatch(batch.latents, (batch.context, batch.pooled), self._negative(len(batch.latents)),
                        ids=list(range(batch.rows.start, batch.rows.stop)), examples=batch.indices)
        return flash_step(self.models, self.recipe, fb, batch.step, self.cfg.seed, update, self.autocast)

    @torch.no_grad()
    def sample(self, context: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per prompt: the student at 1, 2 and 4 steps of its own Flash sampler (no guidance), then the teacher
        (sample_steps Euler steps, CFG sample_guidance against the negative); (4n, C, h, w), one row of 4 per
        prompt."""
        model, n, shift = self.module.transformer, noise.shape[0], self.recipe.shift

        def renoise(i, x):  # re-noise of step i, the same for every grid
            return torch.randn(x.shape, generator=rng.offset_generator(self.cfg.sample_seed, RENOISE_SEED + i)).to(x)

        def student(x, t):
            return model(x, t, context, pooled)

        own = get_sampler(self.recipe.sampler)  # the sampler the student is trained for (--renoise)
        cols = [own.run(student, noise, flash_sigmas(s, shift), noise if own.same_noise else renoise, None)
                for s in SAMPLE_STEPS]
        teacher = cfg_denoiser(self.models.teacher, (context, pooled), self._negative(n), self.cfg.sample_guidance)
        cols.append(sample_euler(teacher, noise, flow_match_sigmas(self.cfg.sample_steps, shift)))
        return torch.stack(cols, 1).flatten(0, 1)

    def save_final(self, out: Path) -> None:
        saved = save_trained(self.cfg, self.module.transformer, out)
        if self.recipe.sampler != "flash":  # the student expects its own sampler, not the released one
            print(f"{saved}: sample it with --sampler {self.recipe.sampler} (4 steps) or --steps 1 (--renoise "
                  f"{self.recipe.renoise})", flush=True)
