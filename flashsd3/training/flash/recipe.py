"""Flash Diffusion's recipe for SD3 as data: phases, the start-index mixture, loss weights, guidance range.

Chadebec et al. 2024, "Flash Diffusion" (arXiv 2406.02347); numbers from the official code
gojasper/flash-diffusion @ 3ffd9a83 `examples/configs/flash_sd3.yaml` ([Y]) and
`src/flash/models/flash_sd3/flash_diffusion_model.py` ([M]).

Training starts from data noised at sigma_k of a K-step teacher grid; k is drawn from a phase-dependent
mixture of narrow Gaussians over the grid indices (modes at 0, K/4, K/2, 3K/4) whose mass moves towards
full noise (index 0) phase by phase, while the DMD and adversarial weights grow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...sampling import flash_sigmas, flow_match_sigmas
from ..objectives import training_sigma_table


@dataclass(frozen=True)
class FlashRecipe:
    """Hyper-parameters of Flash distillation; defaults are the released SD3 recipe."""

    K: int = 32  # teacher grid steps ([Y] L14 K: [32, 32, 32, 32])
    shift: float = 3.0  # flow-matching shift of the grids (SD3-medium scheduler_config.json)
    # Mode weights per phase at the mode indices ([Y] L28-33 MIXTURE_WEIGHTS).
    mode_weights: tuple[tuple[float, ...], ...] = ((0.0, 0.0, 0.5, 0.5), (0.1, 0.3, 0.3, 0.3),
                                                   (0.25, 0.25, 0.25, 0.25), (0.4, 0.2, 0.2, 0.2))
    mixture_std: float = 0.5  # std of each mode in index units ([Y] L22 MIXTURE_VAR 0.5 -> exp(-d^2 / 0.5))
    # "recipe": modes at m * (K // n_modes) ([M] L157-177); "sampler" (an option, not the recipe): modes at the
    # K-grid indices nearest to the `sampler_steps`-step Flash sampler's own sigmas.
    modes: str = "recipe"
    sampler_steps: int = 4
    # Batches in phases 0, 1, 2; phase 3 runs to the end. The code's counter counts model forwards and
    # advances twice per batch (G and D pass, [M] L236-240), so its 5000 per phase are 2500 batches.
    phase_batches: tuple[int, ...] = (2500, 2500, 2500)
    lambda_distill: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)  # [Y] L24
    lambda_adv: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)  # [Y] L25
    lambda_dmd: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7)  # [Y] L26
    guidance: tuple[float, float] = (7.0, 13.0)  # w ~ U[7, 13], one per batch ([Y] L16-17)
    # Adversarial noise levels: positions in the 1000-entry training grid ([M] L523-535) -> sigma
    # 0.0294, 0.5, 0.75, 0.9.
    adv_positions: tuple[int, ...] = (-10, -250, -500, -750)
    distill_loss: str = "l2"  # "lpips" in the released recipe (needs the lpips package + VGG weights), or "l2"
    disc_input: str = "output"  # "output": the teacher's velocity, as the released code (its issue #20);
    disc_blocks: tuple[int, ...] = ()  # "blocks": these teacher blocks' image tokens (the paper's intent)
    d_pass: str = "fresh"  # "fresh": D update on a second forward with new randomness ([TR] L186-218); "reuse"

    def __post_init__(self):
        n_phases = len(self.mode_weights)
        for name in ("lambda_distill", "lambda_adv", "lambda_dmd"):
            if len(getattr(self, name)) != n_phases:
                raise ValueError(f"FlashRecipe.{name} needs {n_phases} entries (one per phase), "
                                 f"got {getattr(self, name)}")
        if len(self.phase_batches) != n_phases - 1:
            raise ValueError(f"FlashRecipe.phase_batches needs {n_phases - 1} lengths (the last phase runs to "
                             f"the end), got {self.phase_batches}")
        if len({len(w) for w in self.mode_weights}) != 1:
            raise ValueError(f"FlashRecipe.mode_weights rows differ in length: {self.mode_weights}")
        if self.modes not in ("recipe", "sampler"):
            raise ValueError(f"FlashRecipe.modes must be 'recipe' or 'sampler', got {self.modes!r}")
        if self.modes == "sampler" and self.sampler_steps != len(self.mode_weights[0]):
            raise ValueError(f"modes='sampler' needs one weight per sampler step ({self.sampler_steps}), "
                             f"got {len(self.mode_weights[0])} per phase")
        if self.distill_loss not in ("l2", "lpips"):
            raise ValueError(f"FlashRecipe.distill_loss must be 'l2' or 'lpips', got {self.distill_loss!r}")
        if self.disc_input not in ("output", "blocks"):
            raise ValueError(f"FlashRecipe.disc_input must be 'output' or 'blocks', got {self.disc_input!r}")
        if (self.disc_input == "blocks") != bool(self.disc_blocks):
            raise ValueError("FlashRecipe.disc_blocks must be given exactly when disc_input='blocks', "
                             f"got disc_input={self.disc_input!r}, disc_blocks={self.disc_blocks}")
        if self.d_pass not in ("fresh", "reuse"):
            raise ValueError(f"FlashRecipe.d_pass must be 'fresh' or 'reuse', got {self.d_pass!r}")
        if not 0 < self.guidance[0] <= self.guidance[1]:
            raise ValueError(f"FlashRecipe.guidance must be (w_min, w_max) with 0 < w_min <= w_max, "
                             f"got {self.guidance}")

    @property
    def num_phases(self) -> int:
        return len(self.mode_weights)

    def grid(self) -> torch.Tensor:
        """(K + 1,) float32 teacher grid sigma_0 = 1 > ... > sigma_{K-1} > 0 (the K-step inference table)."""
        return flow_match_sigmas(self.K, self.shift)

    def mode_indices(self) -> tuple[int, ...]:
        """Grid indices of the mixture's modes: 0, 8, 16, 24 for K = 32 (recipe), or the nearest grid
        indices to the Flash sampler's sigmas (option); e.g. 4 steps at K = 32 -> 0, 10, 21, 31."""
        n = len(self.mode_weights[0])
        if self.modes == "recipe":
            return tuple(m * (self.K // n) for m in range(n))
        grid = self.grid()[:-1]
        return tuple(int((grid - s).abs().argmin()) for s in flash_sigmas(self.sampler_steps, self.shift)[:-1])

    def phase(self, step: int) -> int:
        """Phase (0-based) of batch `step` (0-based)."""
        ends = [sum(self.phase_batches[: i + 1]) for i in range(len(self.phase_batches))]
        return sum(step >= e for e in ends)

    def adv_sigmas(self) -> torch.Tensor:
        """(n,) float32 sigmas of the adversarial noise levels on the 1000-entry training grid."""
        table = training_sigma_table(self.shift)
        return table[list(self.adv_positions)]


def mixture_probs(recipe: FlashRecipe, phase: int) -> torch.Tensor:
    """(K,) float64 pi_p(i) proportional to sum_m w_{p,m} exp(-(i - mu_m)^2 / (2 std^2)), renormalised
    over i = 0..K-1 ([M] L21-41). Phase 3 of the recipe: P(0) = 0.3287, P(8) = P(16) = P(24) = 0.1643."""
    if not 0 <= phase < recipe.num_phases:
        raise ValueError(f"phase {phase} outside 0..{recipe.num_phases - 1}")
    i = torch.arange(recipe.K, dtype=torch.float64)
    mass = torch.zeros(recipe.K, dtype=torch.float64)
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
    return float((p * (recipe.K - torch.arange(recipe.K, dtype=torch.float64))).sum())


def disc_head_downsamples(side: int, max_down: int = 4) -> int:
    """Stride-2 convs of the discriminator head for a `side`-pixel input: the recipe's 4, fewer for small
    inputs so the final 4x4 valid conv still sees >= 4x4 (reference §5.2)."""
    n = min(max_down, int(math.log2(side)) - 2)
    if n < 0:
        raise ValueError(f"discriminator input side {side} is below 4")
    return n
