"""Flash Diffusion distillation (arXiv 2406.02347), one concept per file:

recipe.py         FlashRecipe (every setting, cited), the named recipes and the start-index mixture
cost.py           counting model forwards and backwards of an iteration (bench/flash_cost.py)
losses.py         the distillation loss (L2, LPIPS) and the DMD term
discriminator.py  the discriminator: teacher features, head and its sizing, both LSGAN losses
step.py           one iteration: start points, teacher target, generator and discriminator losses, flash_step
models.py         the student, teacher and features from one MMDiT with trainable adapters
task.py           FlashConfig and FlashTask: `flashsd3-train flash` on the training loop
"""
from .discriminator import (
    DiscriminatorHead,
    disc_head_downsamples,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    make_head,
    teacher_features,
)
from .losses import LpipsDistill, distill_l2, dmd_loss
from .models import mmdit_flash_models
from .recipe import (
    RECIPES,
    FlashRecipe,
    draw_guidance,
    draw_start_index,
    expected_teacher_steps,
    mixture_probs,
    named_recipe,
)
from .step import (
    FlashBatch,
    FlashModels,
    Start,
    StepRandom,
    chain_all_loss,
    chain_start,
    chain_start_at,
    discriminator_loss,
    dmd_velocities,
    flash_step,
    generator_loss,
    noised_data_start,
    noised_data_start_at,
    recipe_start,
    student_x0,
    teacher_target,
)

__all__ = ["RECIPES", "DiscriminatorHead", "FlashBatch", "FlashModels", "FlashRecipe", "LpipsDistill", "Start",
           "StepRandom", "chain_all_loss", "chain_start", "chain_start_at", "disc_head_downsamples",
           "discriminator_loss",
           "distill_l2", "dmd_loss", "dmd_velocities", "draw_guidance", "draw_start_index", "expected_teacher_steps",
           "flash_step", "generator_loss", "lsgan_discriminator_loss", "lsgan_generator_loss", "make_head",
           "mixture_probs", "mmdit_flash_models", "named_recipe", "noised_data_start", "noised_data_start_at",
           "recipe_start", "student_x0", "teacher_features", "teacher_target"]
