"""One Flash Diffusion iteration: start points, the teacher target, the student's one-step x0, DMD and GAN inputs,
and the generator / discriminator losses ([M] = gojasper/flash-diffusion @ 3ffd9a83
`src/flash/models/flash_sd3/flash_diffusion_model.py` L236-602; [TR] = its `src/flash/trainer/trainer.py`).

Models are plain callables `fn(x, t, *cond) -> velocity` with t = 1000 sigma (FlashModels), so the pieces can be
checked on hand-made stand-ins; `mmdit_flash_models` builds them from one MMDiT carrying trainable adapters: the
teacher is the same module with its adapters off (no second copy of the weights).

Randomness: batch-level draws (k, w, w') come from a generator seeded by (seed, step, pass) and per-sample draws
(noises, DMD sigma, GAN sigma) from one generator per sample seeded by (seed, step, pass, global sample index),
so a run sharded over ranks, or resumed, draws exactly what the single-process uninterrupted run draws.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ...sampling import cfg_denoiser, forward_process, sample_euler
from ...sampling.flow_match import NUM_TRAIN_TIMESTEPS
from ..objectives import training_sigma_table
from .losses import distill_l2, dmd_loss, lsgan_discriminator_loss, lsgan_generator_loss
from .recipe import FlashRecipe, draw_guidance, draw_start_index

ModelFn = Callable[..., torch.Tensor]  # (x (B,C,H,W), t (B,), *cond) -> velocity or features


@dataclass
class FlashModels:
    """The callables one iteration needs; `head` is the trainable discriminator head."""

    student: ModelFn  # adapters on, conditional only
    teacher: ModelFn  # adapters off, frozen
    features: ModelFn  # discriminator input from the frozen teacher (its output, or block tokens)
    head: nn.Module
    distill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = distill_l2  # or losses.LpipsDistill


@dataclass
class BankStart:
    """A precomputed start point and target (the "bank" option for small models, not the recipe): x_k is a state
    of a stored teacher CFG trajectory at grid index k (not noised data) and y that trajectory's end."""

    k: int
    x_k: torch.Tensor  # (B, C, H, W)
    target: torch.Tensor  # (B, C, H, W)
    guidance: float  # the w the trajectories were solved with (for logging)


@dataclass
class FlashBatch:
    """x0 data latents (B, C, H, W); cond/uncond tuples batched like x0 (uncond: the negative prompt);
    ids (B,) global sample indices (e.g. rank offset + position in the global batch), used to seed noise.
    start: a BankStart replaces the drawn start point and the teacher solve (option; needs d_pass='reuse')."""

    x0: torch.Tensor
    cond: tuple[torch.Tensor, ...]
    uncond: tuple[torch.Tensor, ...]
    ids: Sequence[int]
    start: BankStart | None = None


def _mix(*xs: int) -> int:
    h = 0x2545F4914F6CDD1D
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 % (1 << 64)
        h ^= h >> 29
    return h % (1 << 63)


@dataclass
class StepRandom:
    """Random draws of one pass (pass 0 = generator, 1 = discriminator) of batch `step`, for samples `ids`."""

    seed: int
    step: int
    pass_: int
    ids: Sequence[int]
    batch: torch.Generator = field(init=False)
    samples: list = field(init=False)

    def __post_init__(self):
        self.batch = torch.Generator().manual_seed(_mix(self.seed, self.step, self.pass_, -1))
        self.samples = [torch.Generator().manual_seed(_mix(self.seed, self.step, self.pass_, i)) for i in self.ids]

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        """Per-sample N(0, 1) shaped like `like` (B, ...), drawn in float32 on the CPU, in like's dtype/device."""
        e = torch.stack([torch.randn(like.shape[1:], generator=g) for g in self.samples])
        return e.to(like.device, like.dtype)

    def choice(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) per-sample uniform picks from `values` (1-D)."""
        idx = torch.stack([torch.randint(len(values), (), generator=g) for g in self.samples])
        return values[idx]


def teacher_target(teacher: ModelFn, x_k: torch.Tensor, grid: torch.Tensor, k: int, cond, uncond,
                   guidance: float) -> torch.Tensor:
    """y = the teacher's CFG Euler solve from sigma_k to 0 on the K-grid: K - k steps of
    x <- x + (sigma_{i+1} - sigma_i) (v(x, c_neg) + w (v(x, c) - v(x, c_neg))), one batched [neg, c] call each."""
    with torch.no_grad():
        return sample_euler(cfg_denoiser(teacher, cond, uncond, guidance), x_k, grid[k:])


def student_x0(student: ModelFn, x_k: torch.Tensor, sigma_k: torch.Tensor, cond) -> torch.Tensor:
    """x0_hat = x_k - sigma_k v_S(x_k, 1000 sigma_k, c) in float32; sigma_k (B,) float32."""
    v = student(x_k, sigma_k.to(x_k.device) * NUM_TRAIN_TIMESTEPS, *cond)
    return x_k.float() - sigma_k.to(x_k.device).view(-1, 1, 1, 1) * v.float()


def dmd_velocities(models: FlashModels, x0_hat: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, cond,
                   uncond, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_real, v_fake) at x' = sigma' e' + (1 - sigma') sg(x0_hat): the teacher's CFG velocity with w' and the
    student's own conditional velocity, no grad ([M] L415-470)."""
    with torch.no_grad():
        x = forward_process(x0_hat.detach(), noise, sigma.to(x0_hat.device))
        t = sigma.to(x0_hat.device) * NUM_TRAIN_TIMESTEPS
        v_real = cfg_denoiser(models.teacher, cond, uncond, guidance)(x, t)
        v_fake = models.student(x, t, *cond)
    return v_real, v_fake


@contextmanager
def frozen(module: nn.Module):
    """Parameters of `module` require no grad inside (Lightning's toggle_optimizer for the G pass)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)


@dataclass
class Pass:
    """What a pass computed, kept for logging and for the discriminator when d_pass='reuse'."""

    x0_hat: torch.Tensor
    adv_sigma: torch.Tensor
    adv_noise: torch.Tensor
    k: int
    guidance: float
    losses: dict = field(default_factory=dict)


def _start(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, phase: int, rnd: StepRandom, grad: bool):
    grid = recipe.grid()
    k, w = draw_start_index(recipe, phase, rnd.batch), draw_guidance(recipe, rnd.batch)
    noise = rnd.randn(batch.x0)
    if batch.start is not None:  # the bank option: start and target were drawn by the caller
        k, w, x_k = batch.start.k, batch.start.guidance, batch.start.x_k
    else:
        x_k = forward_process(batch.x0, noise, grid[k])  # k = 0: sigma 1, exactly the noise
    sigma_k = grid[k].expand(len(batch.x0)).clone()
    with torch.set_grad_enabled(grad):
        x0_hat = student_x0(models.student, x_k, sigma_k, batch.cond)
    return grid, k, w, x_k, x0_hat


def generator_loss(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, step: int, seed: int):
    """L_G = l_distill d(x0_hat, y) + l_dmd L_DMD + l_adv L_adv for batch `step` ([M] L236-354); returns
    (loss, Pass). Terms with weight 0 are skipped (the code computes and multiplies them by 0)."""
    phase, rnd = recipe.phase(step), StepRandom(seed, step, 0, batch.ids)
    grid, k, w, x_k, x0_hat = _start(models, recipe, batch, phase, rnd, grad=True)
    if batch.start is not None:
        y = batch.start.target
    else:
        y = teacher_target(models.teacher, x_k, grid, k, batch.cond, batch.uncond, w)
    dmd_sigma = rnd.choice(training_sigma_table(recipe.shift))
    dmd_noise, w_dmd = rnd.randn(batch.x0), draw_guidance(recipe, rnd.batch)
    adv_sigma, adv_noise = rnd.choice(recipe.adv_sigmas()), rnd.randn(batch.x0)
    out = Pass(x0_hat.detach(), adv_sigma, adv_noise, k, w)
    loss = recipe.lambda_distill[phase] * models.distill(x0_hat, y)
    out.losses["distill"] = loss.detach() / max(recipe.lambda_distill[phase], 1e-12)
    if recipe.lambda_dmd[phase] > 0:
        v_real, v_fake = dmd_velocities(models, x0_hat, dmd_sigma, dmd_noise, batch.cond, batch.uncond, w_dmd)
        l_dmd = dmd_loss(x0_hat, v_real, v_fake)
        loss = loss + recipe.lambda_dmd[phase] * l_dmd
        out.losses["dmd"] = l_dmd.detach()
    if recipe.lambda_adv[phase] > 0:
        fake_in = forward_process(x0_hat, adv_noise, adv_sigma)  # gradients reach x0_hat through the teacher
        with frozen(models.head):
            l_adv = lsgan_generator_loss(models.head(models.features(fake_in, adv_sigma * 1000, *batch.cond)))
        loss = loss + recipe.lambda_adv[phase] * l_adv
        out.losses["adv"] = l_adv.detach()
    out.losses["g_total"] = loss.detach()
    return loss, out


def discriminator_loss(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, step: int, seed: int,
                       reuse: Pass | None = None):
    """L_D on the teacher features of the noised student x0_hat (fake) and noised data (real), one shared noise
    and per-sample sigma_a ([M] L545-602). Fresh randomness and student forward (pass 1, the recipe) unless
    `reuse` passes the generator pass's draws (recipe.d_pass='reuse'). Returns (loss, Pass)."""
    if reuse is None:
        if batch.start is not None:
            raise ValueError("a bank batch (FlashBatch.start) has no fresh start point: use d_pass='reuse'")
        rnd = StepRandom(seed, step, 1, batch.ids)
        _, k, w, _, x0_hat = _start(models, recipe, batch, recipe.phase(step), rnd, grad=False)
        reuse = Pass(x0_hat, rnd.choice(recipe.adv_sigmas()), rnd.randn(batch.x0), k, w)
    s, e = reuse.adv_sigma, reuse.adv_noise
    with torch.no_grad():
        h_fake = models.features(forward_process(reuse.x0_hat.to(batch.x0.dtype), e, s), s * 1000, *batch.cond)
        h_real = models.features(forward_process(batch.x0, e, s), s * 1000, *batch.cond)
    loss = lsgan_discriminator_loss(models.head(h_real), models.head(h_fake))
    out = Pass(reuse.x0_hat, s, e, reuse.k, reuse.guidance, {"d": loss.detach()})
    return loss, out


def flash_update(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, step: int, seed: int,
                 opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                 sync: Callable[[torch.optim.Optimizer], None] | None = None, autocast=None, clip: float = 0.0) -> dict:
    """One batch of the alternating 1:1 scheme ([TR] L186-218): a generator pass and AdamW step on the adapters,
    then a discriminator pass and AdamW step on the head. opt_g and opt_d may be one optimiser holding both:
    gradients are reset to None before each pass and AdamW skips parameters without one. `sync(opt)` averages
    gradients over ranks before a step (None: one process); `autocast` wraps the forward passes; clip > 0 clips
    each pass's gradient norm. Returns the logged scalars."""
    autocast = autocast if autocast is not None else nullcontext()
    opt_g.zero_grad(set_to_none=True)
    opt_d.zero_grad(set_to_none=True)
    with autocast:
        loss_g, g = generator_loss(models, recipe, batch, step, seed)
    loss_g.backward()
    norm_g = _finish(opt_g, sync, clip)
    opt_g.zero_grad(set_to_none=True)
    opt_d.zero_grad(set_to_none=True)
    with autocast:
        loss_d, d = discriminator_loss(models, recipe, batch, step, seed,
                                       reuse=g if recipe.d_pass == "reuse" else None)
    loss_d.backward()
    norm_d = _finish(opt_d, sync, clip)
    opt_d.zero_grad(set_to_none=True)
    scalars = {name: float(v) for name, v in {**g.losses, **d.losses}.items()}
    return {**scalars, "grad_norm": norm_g, "grad_norm_d": norm_d, "k": g.k, "w": g.guidance,
            "phase": recipe.phase(step)}


def _finish(opt: torch.optim.Optimizer, sync, clip: float) -> float:
    if sync is not None:
        sync(opt)
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    opt.step()
    return float(norm)
