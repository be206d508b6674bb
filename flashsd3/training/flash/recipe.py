"""Flash Diffusion's recipe for SD3 as data: phases, the start-index mixture, loss weights, guidance range.

Chadebec et al. 2024, "Flash Diffusion" (arXiv 2406.02347); numbers from the official code
gojasper/flash-diffusion @ 3ffd9a83: `examples/configs/flash_sd3.yaml` ([Y]),
`src/flash/models/flash_sd3/flash_diffusion_model.py` ([M]), `examples/train_flash_sd3.py` ([T]) and
`src/flash/trainer/trainer.py` ([TR]).

Training starts from data noised at sigma_k of a K-step teacher grid; k is drawn from a phase-dependent
mixture of narrow Gaussians over the grid indices (modes at 0, K/4, K/2, 3K/4) whose mass moves towards
full noise (index 0) phase by phase, while the DMD and adversarial weights grow.

`FlashRecipe` is every knob of the method: each field is a `flashsd3-train flash` flag and a config-file key
(`teacher_steps` -> --teacher-steps, training/config.py), so a new knob is one field here. Variants (the toy's
sizes, an experiment) are `dataclasses.replace(FlashRecipe(), ...)`; the named ones are `RECIPES`, picked with
--recipe (its fields are the base that explicit flags override):

    flash-sd3  the released recipe (the defaults)
    distill    the distillation term only (no DMD, no GAN: neither is computed, nor the discriminator step), on
               chain starts: z, then the student's own Flash sampler steps from z up to the drawn mode (no grad),
               re-noising with z itself (--renoise initial), pulled towards the teacher's CFG solve from z on a
               16-step grid, at the batch's w for the sampler's first step and 0.8 w for the later ones
               (--late-guidance); the modes at the Flash sampler's sigmas with the recipe's phase weights. Sample its
               adapters with the `flash_initial` sampler (4 steps) or 1 Flash step. Why: the DMD term compares
               the teacher's CFG velocity with the student's own (conditional) one, and the teacher's CFG output is
               no fixed point of it, so DMD students stay as saturated as few-step CFG; the distillation term alone
               reproduces the many-step teacher; and a sampler that re-noises with fresh noise hides which
               teacher sample a chain should end on, so an L2 student learns an average of them, while re-noising
               with z keeps it a function of the point (results/toy/FLASH_DIAGNOSIS.md). The late steps' lower
               w: the 1-step sample reproduces the teacher at w, the 4-step one a less saturated teacher sample,
               nearer the data (on the toy: RESULTS.md, the --late-guidance section).

Options over either preset: --chain-starts p (p = 1 in distill; 0: the recipe's noised-data starts, data noised
at sigma_k pulled towards the teacher's solve from there) and --renoise fresh | initial (the sampler the chains
are rolled with, and that the student is trained for).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ...sampling import flash_sigmas, flow_match_sigmas
from ..config import flag, opt
from ..objectives import training_sigma_table

CHOICES = {"mixture_modes": ("recipe", "sampler"), "distill_loss": ("l2", "lpips"), "disc_input": ("output", "blocks"),
           "d_pass": ("fresh", "reuse"), "renoise": ("fresh", "initial"), "chain_steps": ("drawn", "all")}


@dataclass(frozen=True)
class FlashRecipe:
    """Hyper-parameters of Flash distillation; defaults are the released SD3 recipe."""

    recipe: str = opt("flash-sd3", "named recipe whose values are the defaults of every other recipe setting "
                                   "(explicit flags and config keys override them): flash-sd3 (the released "
                                   "one) or distill (distillation term only, on the student's own sampler chains; "
                                   "see flashsd3/training/flash/recipe.py)",
                      choices=("flash-sd3", "distill"))
    teacher_steps: int = opt(32, "K: steps of the teacher's Euler grid ([Y] L14 K: [32, 32, 32, 32])")
    target_steps: int = opt(0, "solve the teacher's target on the points of this many-step grid (same shift) "
                               "below sigma_k instead of the K-grid's (0: the K-grid, the recipe)")
    shift: float = opt(3.0, "shift of the teacher grid and of the Flash sampler (SD3-medium scheduler_config.json)")
    guidance_min: float = opt(7.0, "teacher guidance w ~ U[min, max], one per batch ([Y] L16-17)")
    guidance_max: float = opt(13.0, "see --guidance-min")
    late_guidance: float = opt(1.0, "factor on the drawn w for the targets of the Flash sampler's steps after the "
                                    "first (chain step, or the nearest mode's step, j >= 1): the 1-step sample "
                                    "reproduces the teacher at w, the n-step one at this times w (1: one w, the "
                                    "recipe; distill: 0.8)")
    # The code's counter counts model forwards and advances twice per batch (G and D pass, [M] L236-240), so
    # its 5000 per phase are 2500 batches.
    phase_batches: tuple[int, ...] = opt((2500, 2500, 2500), "batches of phases 0, 1, 2 (the last phase runs on)")
    lambda_distill: tuple[float, ...] = opt((1.0, 1.0, 1.0, 1.0), "distillation weight per phase ([Y] L24)")
    lambda_adv: tuple[float, ...] = opt((0.0, 0.1, 0.3, 0.5), "adversarial weight per phase ([Y] L25)")
    lambda_dmd: tuple[float, ...] = opt((0.0, 0.3, 0.5, 0.7), "DMD weight per phase ([Y] L26)")
    mode_weights: tuple[tuple[float, ...], ...] = opt(
        ((0.0, 0.0, 0.5, 0.5), (0.1, 0.3, 0.3, 0.3), (0.25, 0.25, 0.25, 0.25), (0.4, 0.2, 0.2, 0.2)),
        "start-index mixture weights per phase at the modes, phases separated by '/' ([Y] L28-33)")
    mixture_std: float = opt(0.5, "std of each mode in grid indices ([Y] L22 MIXTURE_VAR 0.5 -> exp(-d^2 / 0.5))")
    mixture_modes: str = opt("recipe", "start-index modes: recipe (m * K // n, [M] L157-177) or sampler (the grid "
                                       "indices nearest the Flash sampler's sigmas: an option, not the recipe)",
                             choices=CHOICES["mixture_modes"])
    sampler_steps: int = opt(4, "Flash sampler steps whose sigmas place the modes (--mixture-modes sampler) and "
                                "whose chain --chain-starts rolls")
    chain_starts: float = opt(0.0, "probability per batch of a chain start (distill: 1; not the released recipe): "
                                   "pure noise z, the student's own Flash sampler steps from z (no grad, re-noise "
                                   "as --renoise says) up to the sampler step of the drawn mode, pulled towards the "
                                   "teacher's CFG solve from z; else the recipe's noised-data start (0: always)")
    renoise: str = opt("fresh", "re-noise of the Flash sampler the student is trained for, in the chain starts: fresh "
                                "noise per step (the released sampler, `flash`) or the chain's initial noise z "
                                "(distill; sample with the `flash_initial` sampler)", choices=CHOICES["renoise"])
    chain_steps: str = opt("drawn", "chain starts: one sampler step per batch drawn from the mixture (drawn), or "
                                    "every step of the chain against its one teacher solve, each weighted by the "
                                    "probability the draw gives it (all: the drawn loss's expectation at a "
                                    "quarter of the teacher calls per trained point; needs --chain-starts 1 and "
                                    "no DMD or adversarial term)", choices=CHOICES["chain_steps"])
    # -> sigma 0.0294, 0.5, 0.75, 0.9 on the 1000-entry training grid ([M] L523-535)
    adv_positions: tuple[int, ...] = opt((-10, -250, -500, -750), "adversarial noise levels: positions in the "
                                                                  "1000-entry training sigma table")
    distill_loss: str = opt("l2", "l2 (latent) or lpips (the released recipe's; needs the lpips package, VGG weights "
                                  "and the VAE)", choices=CHOICES["distill_loss"])
    disc_input: str = opt("output", "discriminator input: the teacher's output (the released code, [M] L545-602) or "
                                    "blocks (--disc-blocks' image tokens, the paper's intent)",
                          choices=CHOICES["disc_input"])
    disc_blocks: tuple[int, ...] = opt((), "teacher blocks whose image tokens the discriminator reads (blocks)")
    disc_width: int = opt(64, "channels of the discriminator head's first conv ([T] L144-183)")
    d_pass: str = opt("fresh", "discriminator step on a fresh forward with new randomness (recipe, [TR] L186-218) "
                               "or reusing the generator pass's", choices=CHOICES["d_pass"])

    def __post_init__(self):
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> list[str]:
        n = self.num_phases
        bad = [f"{flag(k)} must be one of {', '.join(v)}, got {getattr(self, k)!r}" for k, v in CHOICES.items()
               if getattr(self, k) not in v]
        if self.target_steps < 0:
            bad.append(f"--target-steps must be >= 0 (0: the K-grid), got {self.target_steps}")
        bad += [f"{flag(k)} must be >= 1, got {getattr(self, k)}" for k in ("teacher_steps", "sampler_steps",
                                                                          "disc_width") if getattr(self, k) < 1]
        bad += [f"{flag(k)} must be a finite number > 0, got {getattr(self, k)}" for k in ("shift", "mixture_std")
                if not 0 < getattr(self, k) < math.inf]
        if len(self.phase_batches) != n - 1 or any(b < 0 for b in self.phase_batches):
            bad.append(f"--phase-batches needs {n - 1} batch counts >= 0 (phases 0..{n - 2}; the last phase runs "
                       f"to the end), got {','.join(map(str, self.phase_batches))}")
        for name in ("lambda_distill", "lambda_adv", "lambda_dmd"):
            values = getattr(self, name)
            if len(values) != n or not all(0 <= v < math.inf for v in values):
                bad.append(f"{flag(name)} needs {n} finite weights >= 0 (one per phase), got {values}")
        modes = {len(w) for w in self.mode_weights}
        if len(modes) != 1 or not all(0 <= v < math.inf for w in self.mode_weights for v in w) or \
                not all(sum(w) > 0 for w in self.mode_weights):
            bad.append(f"--mode-weights needs rows of equal length, weights >= 0 and a positive sum per phase, "
                       f"got {self.mode_weights}")
        elif (self.mixture_modes == "sampler" or self.chain_starts > 0) and self.sampler_steps != modes.pop():
            why = "--mixture-modes sampler places" if self.mixture_modes == "sampler" else "--chain-starts maps"
            bad.append(f"{why} one mode per sampler step: --sampler-steps {self.sampler_steps} needs as many "
                       f"weights per phase, got {len(self.mode_weights[0])}")
        if not 0 <= self.chain_starts <= 1:
            bad.append(f"--chain-starts is a probability in [0, 1], got {self.chain_starts}")
        if self.chain_steps == "all" and (self.chain_starts != 1 or any(self.lambda_dmd) or any(self.lambda_adv)):
            bad.append("--chain-steps all trains every chain step against one teacher solve: it needs --chain-starts 1 "
                       f"and --lambda-dmd / --lambda-adv 0 in every phase, got --chain-starts {self.chain_starts}, "
                       f"--lambda-dmd {self.lambda_dmd}, --lambda-adv {self.lambda_adv}")
        if not 0 < self.late_guidance < math.inf:
            bad.append(f"--late-guidance must be a finite factor > 0, got {self.late_guidance}")
        if not 0 < self.guidance_min <= self.guidance_max < math.inf:
            bad.append(f"--guidance-min {self.guidance_min} and --guidance-max {self.guidance_max} must be finite "
                       "with 0 < min <= max")
        if not self.adv_positions or not all(-1000 <= p < 1000 for p in self.adv_positions):
            bad.append(f"--adv-positions needs positions in -1000 .. 999, got {self.adv_positions}")
        if (self.disc_input == "blocks") != bool(self.disc_blocks) or any(b < 0 for b in self.disc_blocks):
            bad.append("--disc-blocks (block indices >= 0) must be given exactly when --disc-input is blocks, got "
                       f"--disc-input {self.disc_input} --disc-blocks {','.join(map(str, self.disc_blocks)) or '-'}")
        return bad

    @property
    def num_phases(self) -> int:
        return len(self.mode_weights)

    @property
    def guidance(self) -> tuple[float, float]:
        return self.guidance_min, self.guidance_max

    def grid(self) -> torch.Tensor:
        """(K + 1,) float32 teacher grid sigma_0 = 1 > ... > sigma_{K-1} > 0 (the K-step inference table)."""
        return flow_match_sigmas(self.teacher_steps, self.shift)

    def target_sigmas(self, k: int) -> torch.Tensor:
        """Sigmas of the teacher's CFG solve from grid index k to 0: the K-grid's sigma_k..0 (the recipe), or
        sigma_k then the points of the target_steps grid below it: at K = 32 and 8 target steps, from k = 10
        (sigma 0.8635) the solve visits 0.8008, 0.6938, 0.5480, 0.3380, 0.0089, 0 (6 CFG calls instead of 22)."""
        grid = self.grid()
        if self.target_steps == 0:
            return grid[k:]
        coarse = flow_match_sigmas(self.target_steps, self.shift)
        return torch.cat([grid[k].view(1), coarse[coarse < grid[k] - 1e-6]])

    @property
    def sampler(self) -> str:
        """The sampler (flashsd3.sampling.SAMPLERS) the student is trained for: flash, or flash_initial."""
        return {"fresh": "flash", "initial": "flash_initial"}[self.renoise]

    def uses_discriminator(self) -> bool:
        """Whether any phase weighs the adversarial term (else no discriminator step is computed at all)."""
        return any(w > 0 for w in self.lambda_adv)

    def mode_indices(self) -> tuple[int, ...]:
        """Grid indices of the mixture's modes: 0, 8, 16, 24 for K = 32 (recipe), or the nearest grid
        indices to the Flash sampler's sigmas (option); e.g. 4 steps at K = 32 -> 0, 10, 21, 31."""
        n = len(self.mode_weights[0])
        if self.mixture_modes == "recipe":
            return tuple(m * (self.teacher_steps // n) for m in range(n))
        grid = self.grid()[:-1]
        return tuple(int((grid - s).abs().argmin()) for s in flash_sigmas(self.sampler_steps, self.shift)[:-1])

    def chain_step_weights(self, phase: int) -> tuple[float, ...]:
        """Per sampler step j, the probability that a chain start of `phase` lands on step j: the mixture's mass
        on the grid indices whose nearest mode is j (chain_step). --chain-steps all weighs step j's loss by it."""
        probs = mixture_probs(self, phase)
        out = [0.0] * len(self.mode_indices())
        for k, p in enumerate(probs.tolist()):
            out[self.chain_step(k)] += p
        return tuple(out)

    def chain_step(self, k: int) -> int:
        """The Flash sampler step j of start index k for a chain start: the mode nearest k (mode j <-> step j;
        the first on a tie), e.g. k = 9, 10, 11 -> 1 for the modes 0, 10, 21, 31."""
        modes = self.mode_indices()
        return min(range(len(modes)), key=lambda j: abs(modes[j] - k))

    def step_guidance(self, w: float, j: int) -> float:
        """The guidance of the target of sampler step j for the batch's drawn w: w at j = 0 (the 1-step
        sampler's only step), late_guidance * w after it."""
        return w if j == 0 else self.late_guidance * w

    def phase(self, step: int) -> int:
        """Phase (0-based) of batch `step` (0-based)."""
        ends = [sum(self.phase_batches[: i + 1]) for i in range(len(self.phase_batches))]
        return sum(step >= e for e in ends)

    def adv_sigmas(self) -> torch.Tensor:
        """(n,) float32 sigmas of the adversarial noise levels on the 1000-entry training grid."""
        table = training_sigma_table(self.shift)
        return table[list(self.adv_positions)]


ZERO_WEIGHTS = (0.0, 0.0, 0.0, 0.0)
# The named recipes' values (each a complete FlashRecipe below); a preset is the base that explicit settings override.
# distill's targets are solved on a 16-step grid: a student cannot beat its targets, and on the toy the teacher's
# 8-step CFG solve is itself 15.5 fd_ref from its 32-step reference, the 16-step one 1.4 (results/toy/RESULTS.md).
# Its later sampler steps target the teacher at 0.8 w (--late-guidance): the 4-step sample lands nearer the data
# than the reference (fd_data 286 / 331 against 497 on the toy) while the 1-step one stays near it (8.4 / 10.3).
PRESETS: dict[str, dict] = {
    "flash-sd3": {},
    "distill": {"lambda_adv": ZERO_WEIGHTS, "lambda_dmd": ZERO_WEIGHTS, "mixture_modes": "sampler", "target_steps": 16,
                "chain_starts": 1.0, "renoise": "initial", "late_guidance": 0.8},
}
RECIPES: dict[str, FlashRecipe] = {name: FlashRecipe(recipe=name, **values) for name, values in PRESETS.items()}


def named_recipe(name: str, **changes) -> FlashRecipe:
    """RECIPES[name] with `changes` (FlashRecipe fields) applied over it; ValueError naming --recipe if unknown."""
    if name not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return replace(RECIPES[name], **changes)


def preset_for(values: dict) -> FlashRecipe:
    """The named recipe that settings `values` select (their "recipe" entry, else the released one): the base
    their other values override (training/config.make_config)."""
    return named_recipe(values.get("recipe", FlashRecipe.recipe))


def mixture_probs(recipe: FlashRecipe, phase: int) -> torch.Tensor:
    """(K,) float64 pi_p(i) proportional to sum_m w_{p,m} exp(-(i - mu_m)^2 / (2 std^2)), renormalised
    over i = 0..K-1 ([M] L21-41). Phase 3 of the recipe: P(0) = 0.3287, P(8) = P(16) = P(24) = 0.1643."""
    if not 0 <= phase < recipe.num_phases:
        raise ValueError(f"phase {phase} outside 0..{recipe.num_phases - 1}")
    i = torch.arange(recipe.teacher_steps, dtype=torch.float64)
    mass = torch.zeros(recipe.teacher_steps, dtype=torch.float64)
    for w, mu in zip(recipe.mode_weights[phase], recipe.mode_indices(), strict=True):
        mass += w * torch.exp(-((i - mu) ** 2) / (2 * recipe.mixture_std**2))
    return mass / mass.sum()


def draw_start_index(recipe: FlashRecipe, phase: int, generator: torch.Generator | None = None) -> int:
    """One start index k ~ pi_phase for the whole batch ([M] L146-185)."""
    return int(torch.multinomial(mixture_probs(recipe, phase).float(), 1, generator=generator))


def draw_guidance(recipe: FlashRecipe, generator: torch.Generator | None = None) -> float:
    """One guidance scale w ~ U[w_min, w_max] for the whole batch ([M] L277-279)."""
    lo, hi = recipe.guidance
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def expected_teacher_steps(recipe: FlashRecipe, phase: int) -> float:
    """E[K - k] under pi_phase: CFG Euler steps of the target solve per batch (recipe: 12.0, 17.4, 19.6, 21.9)."""
    p = mixture_probs(recipe, phase)
    return float((p * (recipe.teacher_steps - torch.arange(recipe.teacher_steps, dtype=torch.float64))).sum())
