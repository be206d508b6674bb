"""Flash Diffusion distillation (arXiv 2406.02347): recipe, losses, one iteration, models from one MMDiT."""
from .losses import (
    DiscriminatorHead,
    LpipsDistill,
    distill_l2,
    dmd_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
)
from .models import make_head, mmdit_flash_models
from .recipe import (
    FlashRecipe,
    disc_head_downsamples,
    draw_guidance,
    draw_start_index,
    expected_teacher_steps,
    mixture_probs,
)
from .step import (
    BankStart,
    FlashBatch,
    FlashModels,
    StepRandom,
    discriminator_loss,
    dmd_velocities,
    flash_update,
    generator_loss,
    student_x0,
    teacher_target,
)

__all__ = ["BankStart", "DiscriminatorHead", "FlashBatch", "FlashModels", "FlashRecipe", "LpipsDistill", "StepRandom",
           "disc_head_downsamples", "discriminator_loss", "distill_l2", "dmd_loss", "dmd_velocities",
           "draw_guidance", "draw_start_index", "expected_teacher_steps", "flash_update", "generator_loss",
           "lsgan_discriminator_loss", "lsgan_generator_loss", "make_head", "mixture_probs", "mmdit_flash_models",
           "student_x0", "teacher_target"]
