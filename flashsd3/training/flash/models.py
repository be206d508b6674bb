"""Flash distillation's models from one MMDiT with trainable adapters: the student (adapters on), the teacher
(the same module with its adapters off: no second copy of the weights), the discriminator's input and head."""
from __future__ import annotations

import torch
from einops import rearrange

from ...mmdit.model import Capture, MMDiT
from .losses import DiscriminatorHead, distill_l2
from .recipe import FlashRecipe, disc_head_downsamples
from .step import FlashModels


def make_head(recipe: FlashRecipe, model: MMDiT, latent_side: int, width: int = 64) -> DiscriminatorHead:
    """The discriminator head for `latent_side`-pixel latents: on the teacher's output (C channels, full side)
    or on the chosen blocks' image tokens (D channels per block, side / patch)."""
    c = model.config
    if recipe.disc_input == "output":
        channels, side = c.out_channels, latent_side
    else:
        bad = [i for i in recipe.disc_blocks if not 0 <= i < c.depth]
        if bad:
            raise ValueError(f"disc_blocks {bad} outside the model's blocks 0..{c.depth - 1}")
        channels, side = c.hidden_size * len(recipe.disc_blocks), latent_side // c.patch_size
    return DiscriminatorHead(channels, disc_head_downsamples(side), width)


def mmdit_flash_models(model: MMDiT, head: torch.nn.Module, recipe: FlashRecipe, distill=distill_l2) -> FlashModels:
    """FlashModels over `model` (adapters added with flashsd3.lora.add_lora). Teacher calls run the same module
    under `lora_disabled`; the student call runs it as it is."""
    from ...lora import lora_disabled

    def teacher(x, t, *cond):
        with lora_disabled(model):
            return model(x, t, *cond)

    def features(x, t, *cond):
        if recipe.disc_input == "output":
            return teacher(x, t, *cond)
        cap, last = Capture(blocks=True), max(recipe.disc_blocks)
        with lora_disabled(model):  # blocks after the last one needed are skipped
            model(x, t, *cond, capture=cap, skip_blocks=tuple(range(last + 1, model.config.depth)))
        h = x.shape[-2] // model.config.patch_size
        tokens = [cap.block_outputs[i][1] for i in recipe.disc_blocks]  # (B, N, D) each
        return torch.cat([rearrange(tk, "b (h w) d -> b d h w", h=h) for tk in tokens], 1)

    return FlashModels(student=model, teacher=teacher, features=features, head=head, distill=distill)
