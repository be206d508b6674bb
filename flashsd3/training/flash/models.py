"""Flash distillation's models from one MMDiT with trainable adapters: the student (adapters on), the teacher
(the same module with its adapters off: no second copy of the weights), the discriminator's input and head."""
from __future__ import annotations

import torch

from ...mmdit.model import MMDiT
from .discriminator import teacher_features
from .losses import distill_l2
from .recipe import FlashRecipe
from .step import FlashModels, StartFn, recipe_start


def mmdit_flash_models(model: MMDiT, head: torch.nn.Module, recipe: FlashRecipe, distill=distill_l2,
                       start: StartFn = recipe_start) -> FlashModels:
    """FlashModels over `model` (adapters added with flashsd3.lora.add_lora). Teacher calls run the same module
    under `lora_disabled`; the student call runs it as it is. `start`: the start-point function (by default the
    recipe's noised data, or the chain start option as recipe.chain_starts says)."""
    from ...lora import lora_disabled

    def teacher(x, t, *cond):
        with lora_disabled(model):
            return model(x, t, *cond)

    return FlashModels(student=model, teacher=teacher, features=teacher_features(model, recipe, teacher), head=head,
                       distill=distill, start=start)
