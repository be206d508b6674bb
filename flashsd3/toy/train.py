"""Train the toy teacher from scratch with SD3's flow objective: a single-process loop on in-memory data.

Each step draws a fresh procedural batch (infinite data, fixed by the seed), encodes its captions with the
learnt attribute tokens, drops 10% of them to the empty prompt (so CFG has an unconditional velocity), draws
logit-normal sigmas and takes one AdamW step on `flow_matching_loss`. An exponential moving average of the
weights (model and text tokens) is kept and is what gets sampled and saved, as DiT and SD3 do.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..mmdit import MMDiT
from ..rng import offset_generator
from ..training.objectives import drop_conditioning, flow_matching_loss, logit_normal_sigmas
from .data import make_batch
from .model import TOY_TEACHER, TOY_TEXT, AttributeText, build_teacher


@dataclass(frozen=True)
class TeacherRecipe:
    steps: int = 3000  # AdamW steps; shape adherence appears late (~1,800 steps at batch 64)
    batch: int = 64
    lr: float = 1e-3  # peak; linear warm-up then cosine decay to lr_final_ratio * lr
    lr_final_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # probability of the empty prompt (CFG's unconditional branch)
    sigma_mean: float = 0.0  # logit-normal sigma sampler (SD3's "lognorm(0.00, 1.00)")
    sigma_std: float = 1.0
    sigma_shift: float = 1.0  # training shift; 16x16 pixels need no resolution shift
    ema_decay: float = 0.999
    resolution: int = 16


# `scripts/toy.py --quick`: 2/3 of the reference teacher's steps, past where shape adherence appears (~1,800)
QUICK_RECIPE = TeacherRecipe(steps=2000, warmup=150)


def lr_factor(step: int, recipe: TeacherRecipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(recipe.steps - recipe.warmup, 1)
    lo = recipe.lr_final_ratio
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """Exponential moving average of parameters; decay ramps up as (1 + n) / (10 + n) early on (timm style)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        targets = [p for m in modules for p in m.parameters()]
        for t, s in zip(targets, self.shadow, strict=True):
            t.copy_(s)


@dataclass
class TrainResult:
    model: MMDiT  # EMA weights, eval mode
    text: AttributeText
    losses: list[float]
    wall_s: float


def train_teacher(recipe: TeacherRecipe, seed: int, *,
                  monitor: Callable[[int, MMDiT, AttributeText], None] | None = None, monitor_every: int = 500,
                  log: Callable[[str], None] = print) -> TrainResult:
    """Train from scratch; `monitor(step, ema_model, ema_text)` is called every monitor_every steps."""
    model, text = build_teacher(TOY_TEACHER, TOY_TEXT, seed)
    ema_model, ema_text = build_teacher(TOY_TEACHER, TOY_TEXT, seed)
    ema = EMA([model, text], recipe.ema_decay)
    params = list(model.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe))
    gen = offset_generator(seed)  # the batches, caption dropout, sigmas and noise, in that order per step
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        x0, labels = make_batch(recipe.batch, gen, recipe.resolution)
        cond = drop_conditioning(text(labels), text.empty(1), recipe.caption_dropout, gen)
        sigma = logit_normal_sigmas(recipe.batch, mean=recipe.sigma_mean, std=recipe.sigma_std,
                                    shift=recipe.sigma_shift, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_matching_loss(model, x0, cond, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        ema.update()
        losses.append(loss.item())
        done = step + 1
        if done % 100 == 0 or done == recipe.steps:
            rate = done / (time.perf_counter() - t0)
            log(f"step {done}/{recipe.steps} loss(avg 100) {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {rate:.2f} it/s")
        if monitor is not None and (done % monitor_every == 0 or done == recipe.steps):
            ema.copy_to([ema_model, ema_text])
            monitor(done, ema_model.eval(), ema_text.eval())
    ema.copy_to([ema_model, ema_text])
    return TrainResult(ema_model.eval(), ema_text.eval(), losses, time.perf_counter() - t0)
