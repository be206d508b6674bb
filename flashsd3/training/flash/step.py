"""One Flash Diffusion iteration: start points, the teacher target, the student's one-step x0, DMD and GAN inputs,
and the generator / discriminator losses ([M] = gojasper/flash-diffusion @ 3ffd9a83
`src/flash/models/flash_sd3/flash_diffusion_model.py` L236-602; [TR] = its `src/flash/trainer/trainer.py`).

Models are plain callables `fn(x, t, *cond) -> velocity` with t = 1000 sigma (FlashModels), so the pieces can be
checked on hand-made stand-ins; `mmdit_flash_models` builds them from one MMDiT carrying trainable adapters: the
teacher is the same module with its adapters off (no second copy of the weights).

Randomness (flashsd3.rng): batch-level draws (k, w, w') come from generator(seed, step, pass, BATCH) and
per-sample draws (noises, DMD sigma, GAN sigma) from one generator per global sample index, so a run sharded
over ranks, or resumed, draws exactly what the single-process uninterrupted run draws.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ... import rng
from ...sampling import cfg_denoiser, flash_sigmas, forward_process, sample_euler
from ...sampling.flash import flash_step as sampler_step
from ...sampling.flow_match import NUM_TRAIN_TIMESTEPS
from ..objectives import training_sigma_table
from .discriminator import lsgan_discriminator_loss, lsgan_generator_loss
from .losses import distill_l2, dmd_loss
from .recipe import FlashRecipe, draw_guidance, draw_start_index

ModelFn = Callable[..., torch.Tensor]  # (x (B,C,H,W), t (B,), *cond) -> velocity or features
G_PASS, D_PASS = 0, 1  # the two passes of a batch, keys of their random streams
BATCH = -1  # key of a pass's batch-level stream (per-sample streams are keyed by sample ids >= 0)
CHAIN = -2  # key of a pass's chain-start streams: the batch's coin, then per sample id the chain's re-noise


@dataclass
class FlashBatch:
    """x0 data latents (B, C, H, W); cond/uncond tuples batched like x0 (uncond: the negative prompt);
    ids (B,) global sample indices (e.g. rank offset + position in the global batch), used to seed noise;
    examples (B,) the rows' example indices in their dataset (a start function may look them up)."""

    x0: torch.Tensor
    cond: tuple[torch.Tensor, ...]
    uncond: tuple[torch.Tensor, ...]
    ids: Sequence[int]
    examples: Sequence[int] = ()


@dataclass
class StepRandom:
    """Random draws of one pass (G_PASS or D_PASS) of batch `step`, for samples `ids`."""

    seed: int
    step: int
    pass_: int
    ids: Sequence[int]
    batch: torch.Generator = field(init=False)
    samples: list = field(init=False)

    def __post_init__(self):
        self.batch = rng.generator(self.seed, self.step, self.pass_, BATCH)
        self.samples = rng.sample_generators(self.seed, self.step, self.pass_, ids=self.ids)

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        """Per-sample N(0, 1) shaped like `like` (B, ...), drawn in float32 on the CPU, in like's dtype/device."""
        return rng.randn(self.samples, like.shape[1:]).to(like.device, like.dtype)

    def choice(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) per-sample uniform picks from `values` (1-D)."""
        idx = torch.stack([torch.randint(len(values), (), generator=g) for g in self.samples])
        return values[idx]


@dataclass
class Start:
    """Where the student starts and what it is pulled towards: x_k at grid index k (B, C, H, W), the guidance w
    of the target, and the target itself, computed only when asked for (the discriminator's pass needs none).
    `sigma`: x_k's noise level where it is not the grid's sigma_k (a chain start sits at the sampler's sigmas)."""

    k: int
    guidance: float
    x_k: torch.Tensor
    target: Callable[[], torch.Tensor]
    sigma: torch.Tensor | None = None


StartFn = Callable[["FlashModels", FlashRecipe, FlashBatch, int, StepRandom], Start]  # (.., phase, rnd) -> Start


def noised_data_start(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, phase: int,
                      rnd: StepRandom) -> Start:
    """The recipe's start ([M] L236-300): k ~ pi_phase and w ~ U[w_min, w_max] for the batch (times
    --late-guidance where k's nearest mode is a later sampler step), then `noised_data_start_at`."""
    k, w = draw_start_index(recipe, phase, rnd.batch), draw_guidance(recipe, rnd.batch)
    return noised_data_start_at(models, recipe, batch, k, recipe.step_guidance(w, recipe.chain_step(k)), rnd)


def noised_data_start_at(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, k: int, w: float,
                         rnd: StepRandom) -> Start:
    """x_k = the data noised at sigma_k (k = 0: sigma 1, exactly the noise), target = the teacher's CFG solve
    from x_k to 0 over recipe.target_sigmas(k) (the K-grid's sigma_k..0 in the recipe)."""
    x_k = forward_process(batch.x0, rnd.randn(batch.x0), recipe.grid()[k])
    sigmas = recipe.target_sigmas(k)
    return Start(k, w, x_k, lambda: teacher_target(models.teacher, x_k, sigmas, batch.cond, batch.uncond, w))


def chain_start(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, phase: int, rnd: StepRandom) -> Start:
    """A start on the student's own Flash sampler chain (option --chain-starts): k and w drawn as the recipe's
    (w times --late-guidance for a chain step after the first), then `chain_start_at`."""
    k, w = draw_start_index(recipe, phase, rnd.batch), draw_guidance(recipe, rnd.batch)
    return chain_start_at(models, recipe, batch, k, recipe.step_guidance(w, recipe.chain_step(k)), rnd)


def chain_noise(recipe: FlashRecipe, z: torch.Tensor, streams) -> torch.Tensor:
    """The re-noise of one chain step: z itself (--renoise initial, the flash_initial sampler) or the next draw
    of the per-sample streams keyed CHAIN (fresh, the released sampler)."""
    return z if recipe.renoise == "initial" else rng.randn(streams, z.shape[1:]).to(z.device, z.dtype)


def chain_start_at(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, k: int, w: float,
                   rnd: StepRandom) -> Start:
    """z = the noise the recipe's start would draw; the student (adapters on, no grad) runs the Flash sampler
    from z over its sigmas s_0 = 1 > ... > s_j, j = recipe.chain_step(k), re-noising with per-sample streams keyed
    CHAIN (--renoise fresh) or with z itself (--renoise initial, the flash_initial sampler); the target is the
    teacher's CFG solve from z over recipe.target_sigmas(0). So a student that meets it at every step ends its
    chain on the teacher's sample from z; at j = 0 this is the recipe's start at k = 0."""
    z, j = rnd.randn(batch.x0), recipe.chain_step(k)
    sigmas = flash_sigmas(recipe.sampler_steps, recipe.shift)[: j + 1]
    streams = rng.sample_generators(rnd.seed, rnd.step, rnd.pass_, CHAIN, ids=rnd.ids)
    x = z
    with torch.no_grad():
        for i in range(j):
            v = models.student(x, (sigmas[i] * NUM_TRAIN_TIMESTEPS).expand(len(x)).to(x.device), *batch.cond)
            e = chain_noise(recipe, z, streams)
            x = sampler_step(x, v, sigmas[i], sigmas[i + 1], e)
    target = recipe.target_sigmas(0)
    return Start(recipe.mode_indices()[j], w, x,
                 lambda: teacher_target(models.teacher, z, target, batch.cond, batch.uncond, w), sigma=sigmas[j])


def chain_all_loss(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, phase: int,
                   rnd: StepRandom) -> tuple[torch.Tensor, torch.Tensor, float]:
    """--chain-steps all: z and w drawn as a chain start draws them, the teacher's CFG solve y from z once, then
    the student's Flash sampler chain from z over every sampler step j (re-noise as chain_start_at), its x0 at
    each step regressed onto y, weighted by recipe.chain_step_weights(phase): the expectation of the drawn chain
    start's loss over its step. Steps whose mode weighs 0 in the phase (probability < 1e-31) only advance the
    chain, without gradient. With --late-guidance != 1 the steps after the first have their own solve, at
    late_guidance * w (each solve only where a step it serves is trained). Returns (loss, the last step's x0, w)."""
    w = draw_guidance(recipe, rnd.batch)
    z = rnd.randn(batch.x0)
    weights, trained = recipe.chain_step_weights(phase), recipe.mode_weights[phase]
    solves = {}  # guidance -> the teacher's CFG solve from z, computed once on first use

    def target(j: int) -> torch.Tensor:
        g = recipe.step_guidance(w, j)
        if g not in solves:
            solves[g] = teacher_target(models.teacher, z, recipe.target_sigmas(0), batch.cond, batch.uncond, g)
        return solves[g]

    sigmas = flash_sigmas(recipe.sampler_steps, recipe.shift)
    streams = rng.sample_generators(rnd.seed, rnd.step, rnd.pass_, CHAIN, ids=rnd.ids)
    x, loss = z, torch.zeros((), device=z.device)
    for j in range(recipe.sampler_steps):
        with torch.set_grad_enabled(trained[j] > 0):
            x0_hat = student_x0(models.student, x, sigmas[j].expand(len(x)).clone(), batch.cond)
        if trained[j] > 0:
            loss = loss + weights[j] * models.distill(x0_hat, target(j))
        if j + 1 < recipe.sampler_steps:
            e = chain_noise(recipe, z, streams)
            x = forward_process(x0_hat.detach().to(x.dtype), e, sigmas[j + 1].to(x.device))
    return loss, x0_hat.detach(), w


def recipe_start(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, phase: int, rnd: StepRandom) -> Start:
    """The recipe's noised-data start, or with probability recipe.chain_starts (one coin per batch, its own
    stream keyed CHAIN) a chain start; chain_starts 0 (the recipe) draws no coin."""
    if recipe.chain_starts > 0 and \
            float(torch.rand((), generator=rng.generator(rnd.seed, rnd.step, rnd.pass_, CHAIN))) < recipe.chain_starts:
        return chain_start(models, recipe, batch, phase, rnd)
    return noised_data_start(models, recipe, batch, phase, rnd)


@dataclass
class FlashModels:
    """The callables one iteration needs; `head` is the trainable discriminator head, `start` makes each pass's
    start point (the recipe's, or an experiment's such as the toy's trajectory bank)."""

    student: ModelFn  # adapters on, conditional only
    teacher: ModelFn  # adapters off, frozen
    features: ModelFn  # discriminator input from the frozen teacher (its output, or block tokens)
    head: nn.Module
    distill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = distill_l2  # or losses.LpipsDistill
    start: StartFn = recipe_start


def teacher_target(teacher: ModelFn, x_k: torch.Tensor, sigmas: torch.Tensor, cond, uncond,
                   guidance: float) -> torch.Tensor:
    """y = the teacher's CFG Euler solve from sigmas[0] (x_k's level) to sigmas[-1] = 0 (the recipe: the K-grid's
    sigma_k..0, K - k steps) of x <- x + (sigma_{i+1} - sigma_i) (v(x, c_neg) + w (v(x, c) - v(x, c_neg))), one
    batched [neg, c] call each."""
    with torch.no_grad():
        return sample_euler(cfg_denoiser(teacher, cond, uncond, guidance), x_k, sigmas)


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


def _start(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, rnd: StepRandom, grad: bool):
    start = models.start(models, recipe, batch, recipe.phase(rnd.step), rnd)
    sigma = recipe.grid()[start.k] if start.sigma is None else start.sigma
    sigma_k = sigma.expand(len(batch.x0)).clone()
    with torch.set_grad_enabled(grad):
        x0_hat = student_x0(models.student, start.x_k, sigma_k, batch.cond)
    return start, x0_hat


def generator_loss(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, step: int, seed: int):
    """L_G = l_distill d(x0_hat, y) + l_dmd L_DMD + l_adv L_adv for batch `step` ([M] L236-354); returns
    (loss, Pass). Terms with weight 0 are skipped (the code computes and multiplies them by 0)."""
    phase, rnd = recipe.phase(step), StepRandom(seed, step, G_PASS, batch.ids)
    if recipe.chain_steps == "all":  # no DMD, no GAN (FlashRecipe checks): the distillation term over the chain
        loss, x0_last, w = chain_all_loss(models, recipe, batch, phase, rnd)
        loss = recipe.lambda_distill[phase] * loss
        out = Pass(x0_last, torch.zeros(len(x0_last)), torch.zeros_like(x0_last), recipe.mode_indices()[-1], w)
        out.losses.update(distill=loss.detach() / max(recipe.lambda_distill[phase], 1e-12), g_total=loss.detach())
        return loss, out
    start, x0_hat = _start(models, recipe, batch, rnd, grad=True)
    y = start.target()
    dmd_sigma = rnd.choice(training_sigma_table(recipe.shift))
    dmd_noise, w_dmd = rnd.randn(batch.x0), draw_guidance(recipe, rnd.batch)
    adv_sigma, adv_noise = rnd.choice(recipe.adv_sigmas()), rnd.randn(batch.x0)
    out = Pass(x0_hat.detach(), adv_sigma, adv_noise, start.k, start.guidance)
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
    and per-sample sigma_a ([M] L545-602). Fresh randomness and student forward (D_PASS, the recipe) unless
    `reuse` passes the generator pass's draws (recipe.d_pass='reuse'). Returns (loss, Pass)."""
    if reuse is None:
        rnd = StepRandom(seed, step, D_PASS, batch.ids)
        start, x0_hat = _start(models, recipe, batch, rnd, grad=False)
        reuse = Pass(x0_hat, rnd.choice(recipe.adv_sigmas()), rnd.randn(batch.x0), start.k, start.guidance)
    s, e = reuse.adv_sigma, reuse.adv_noise
    with torch.no_grad():
        h_fake = models.features(forward_process(reuse.x0_hat.to(batch.x0.dtype), e, s), s * 1000, *batch.cond)
        h_real = models.features(forward_process(batch.x0, e, s), s * 1000, *batch.cond)
    loss = lsgan_discriminator_loss(models.head(h_real), models.head(h_fake))
    out = Pass(reuse.x0_hat, s, e, reuse.k, reuse.guidance, {"d": loss.detach()})
    return loss, out


def flash_step(models: FlashModels, recipe: FlashRecipe, batch: FlashBatch, step: int, seed: int,
               update: Callable[[torch.Tensor], float], autocast=None) -> dict:
    """Batch `step` of the alternating 1:1 scheme ([TR] L186-218): a generator pass and its update (the adapters:
    the head is frozen in it), then a discriminator pass and its update (the head: its features are detached).
    One optimiser may hold both, as AdamW skips a parameter without a gradient. `update(loss) -> grad norm`
    is the training loop's optimizer step (backward, gradient sync, clip, step, zero: loop.OptimizerStep);
    `autocast` wraps the forward passes. A recipe whose adversarial weight is 0 in every phase makes no
    discriminator pass or update (nothing would use the head). Returns the logged scalars, the generator's total
    loss first."""
    autocast = autocast if autocast is not None else nullcontext()
    with autocast:
        loss_g, g = generator_loss(models, recipe, batch, step, seed)
    logs = {"grad_norm": update(loss_g)}
    if recipe.uses_discriminator():
        with autocast:
            loss_d, d = discriminator_loss(models, recipe, batch, step, seed,
                                           reuse=g if recipe.d_pass == "reuse" else None)
        logs["grad_norm_d"] = update(loss_d)
        g.losses.update(d.losses)
    scalars = {name: float(v) for name, v in g.losses.items()}
    return {"loss": scalars.pop("g_total"), **scalars, **logs, "k": g.k, "w": g.guidance, "phase": recipe.phase(step)}
