"""Flash Diffusion's discriminator, all of it: what it reads (features of the frozen teacher), its head, the
head's sizing, and the two LSGAN losses. The paper's per-block heads would replace `make_head` and
`teacher_features` here and nothing else.

Official code: gojasper/flash-diffusion `src/flash/models/flash_sd3/flash_diffusion_model.py` ([M]) L545-602,
head `examples/train_flash_sd3.py` ([T]) L144-183.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from ...mmdit.model import Capture, MMDiT
from .recipe import FlashRecipe


class DiscriminatorHead(nn.Module):
    """The recipe's conv head ([T] L144-183): Conv(c->64, k4 s2 p1) SiLU, then Conv(k4 s2 p1) GroupNorm(4) SiLU
    doubling the width, `n_down` stride-2 convs in all, then Conv(->1, k4 s1 p0) and flatten -> (B, patches)
    logits. Bias-free convs, no spectral norm. On the 16 x 128 x 128 teacher output: 4 downsamples, 25 logits.
    """

    def __init__(self, in_channels: int, n_down: int = 4, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c_out = in_channels, width
        for i in range(n_down):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False))
            if i > 0:
                layers.append(nn.GroupNorm(4, c_out))
            layers.append(nn.SiLU())
            c_in, c_out = c_out, c_out * 2
        layers += [nn.Conv2d(c_in, 1, 4, 1, 0, bias=False), nn.Flatten()]
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.float())  # the head trains in float32 on features of any dtype


def disc_head_downsamples(side: int, max_down: int = 4) -> int:
    """Stride-2 convs of the discriminator head for a `side`-pixel input: the recipe's 4, fewer for small
    inputs so the final 4x4 valid conv still sees >= 4x4."""
    n = min(max_down, int(math.log2(side)) - 2)
    if n < 0:
        raise ValueError(f"discriminator input side {side} is below 4")
    return n


def make_head(recipe: FlashRecipe, model: MMDiT, latent_side: int) -> DiscriminatorHead:
    """The discriminator head for `latent_side`-pixel latents: on the teacher's output (C channels, full side)
    or on the chosen blocks' image tokens (D channels per block, side / patch). Its convs initialise from the
    global CPU generator (run it under `flashsd3.rng.seeded`) on the CPU, whatever the device the caller moves
    it to; on the meta device for a meta model (a check before any weight is loaded)."""
    c = model.config
    if recipe.disc_input == "output":
        channels, side, what = c.out_channels, latent_side, "--disc-input output: the latents are"
    else:
        blocks = ",".join(map(str, recipe.disc_blocks))
        bad = [i for i in recipe.disc_blocks if not 0 <= i < c.depth]
        if bad:
            raise ValueError(f"--disc-blocks {blocks}: outside the model's blocks 0..{c.depth - 1}")
        channels, side = c.hidden_size * len(recipe.disc_blocks), latent_side // c.patch_size
        what = f"--disc-blocks {blocks}: the image tokens are"
    if side < 4:
        raise ValueError(f"{what} {side}x{side} at this resolution, below the discriminator head's 4x4 minimum")
    with torch.device("meta" if model.pos_embed.is_meta else "cpu"):
        return DiscriminatorHead(channels, disc_head_downsamples(side), recipe.disc_width)


def teacher_features(model: MMDiT, recipe: FlashRecipe, teacher: Callable[..., torch.Tensor]):
    """features(x, t, *cond): the discriminator's input from the frozen teacher: its output (velocity), or the
    chosen blocks' image tokens as (B, D * blocks, h, w) maps (blocks after the last one needed are skipped)."""
    from ...lora import lora_disabled

    def features(x, t, *cond):
        if recipe.disc_input == "output":
            return teacher(x, t, *cond)
        cap, last = Capture(blocks=True), max(recipe.disc_blocks)
        with lora_disabled(model):
            model(x, t, *cond, capture=cap, skip_blocks=tuple(range(last + 1, model.config.depth)))
        h = x.shape[-2] // model.config.patch_size
        tokens = [cap.block_outputs[i][1] for i in recipe.disc_blocks]  # (B, N, D) each
        return torch.cat([rearrange(tk, "b (h w) d -> b d h w", h=h) for tk in tokens], 1)

    return features


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def lsgan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_adv = mean (sigmoid(D(h_fake)) - 1)^2 ([M] L582-590: LSGAN on sigmoid outputs)."""
    return (torch.sigmoid(_up(logits_fake)) - 1).pow(2).mean()


def lsgan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = 1/2 [mean (sigmoid(D(h_real)) - 1)^2 + mean sigmoid(D(h_fake))^2] ([M] L592-602); logits_fake
    must come from detached features. At the LSGAN equilibrium (D outputs 1/2 everywhere) L_D = 0.25."""
    real = (torch.sigmoid(_up(logits_real)) - 1).pow(2).mean()
    fake = torch.sigmoid(_up(logits_fake)).pow(2).mean()
    return 0.5 * (real + fake)
