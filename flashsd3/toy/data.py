"""A procedural image-caption world small enough to train a diffusion model on a CPU.

Each image is one coloured shape on a textured grey background; its caption names the three attributes:
"a red circle at the top left". 3 shapes x 4 colours x 4 positions = 48 captions. Everything is drawn from
a torch.Generator, so a seed fixes the data exactly. Pixels are RGB in [-1, 1] (the model's space: this
toy diffuses in pixel space, no VAE).

Why these choices: colour jitter, size and position jitter and a background texture make the classes
overlap enough that guidance matters and give few-step samplers texture to lose; shapes are drawn on a 4x
supersampled grid and averaged, so edges are anti-aliased and a circle, a square and a triangle differ in
more than one pixel even at 16x16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rng import offset_generator

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = (SHAPES, COLOURS, POSITIONS)  # label columns: (shape, colour, position)
NUM_CAPTIONS = len(SHAPES) * len(COLOURS) * len(POSITIONS)

# RGB in [0, 1]; each sample's colour is jittered by up to COLOUR_JITTER per channel.
PALETTE = torch.tensor([[0.90, 0.15, 0.15], [0.15, 0.75, 0.20], [0.20, 0.30, 0.95], [0.95, 0.85, 0.15]])
COLOUR_JITTER = 0.10
SUPERSAMPLE = 4  # shapes are rendered at 4x and box-filtered down (anti-aliasing)


def caption(labels: torch.Tensor | tuple[int, int, int]) -> str:
    """(shape, colour, position) indices -> "a red circle at the top left"."""
    s, c, p = (int(v) for v in labels)
    return f"a {COLOURS[c]} {SHAPES[s]} at the {POSITIONS[p]}"


def random_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) long labels (shape, colour, position), uniform over the 48 captions."""
    return torch.stack([torch.randint(len(a), (n,), generator=generator) for a in ATTRIBUTES], dim=1)


def balanced_labels(n: int) -> torch.Tensor:
    """(n, 3) labels cycling through all 48 captions in a fixed order (evaluation prompts)."""
    i = torch.arange(n)
    return torch.stack([i % 3, (i // 3) % 4, (i // 12) % 4], dim=1)


def _shape_masks(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside-masks on the supersampled grid; dx, dy (B, S, S) offsets from the centre, r (B, 1, 1) size."""
    circle = dx**2 + dy**2 <= r**2
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.9 * r  # about the circle's area, corners well outside it
    # upright triangle: apex at -1.1 r, base at +0.9 r, half-width 1.15 r at the base
    depth = (dy + 1.1 * r) / (2.0 * r)
    triangle = (dy <= 0.9 * r) & (dy >= -1.1 * r) & (dx.abs() <= 1.15 * r * depth)
    s = shape.view(-1, 1, 1)
    return torch.where(s == 0, circle, torch.where(s == 1, square, triangle)).float()


def _background(n: int, res: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, res, res) in [0, 1]: a grey level, a faint tint, a smooth 4x4 texture and fine pixel noise."""
    grey = 0.15 + 0.30 * torch.rand(n, 1, 1, 1, generator=generator)
    tint = 0.04 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    coarse = 0.08 * torch.randn(n, 1, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(res, res), mode="bilinear", align_corners=False)
    fine = 0.03 * torch.randn(n, 3, res, res, generator=generator)
    return grey + tint + smooth + fine


def render(labels: torch.Tensor, generator: torch.Generator, resolution: int = 16,
           supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Draw images for (n, 3) labels -> (n, 3, resolution, resolution) float32 RGB in [-1, 1].

    Position = the quadrant of the shape's centre (at 0.28 / 0.72 of the side, jittered by up to 1/32 of it);
    size = a half-extent of 0.21-0.27 of the side (a shape ~8 px across at 16x16: big enough that circle,
    square and triangle differ in many pixels); colour = the palette entry jittered per channel.
    supersample: samples per pixel side (1 = hard, aliased edges; the evaluator's classifier also sees those).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim != 2 or labels.shape[1] != 3:
        raise ValueError(f"labels must be (n, 3) (shape, colour, position), got {tuple(labels.shape)}")
    for col, (values, name) in enumerate(zip(ATTRIBUTES, ("shape", "colour", "position"), strict=True)):
        if labels[:, col].min() < 0 or labels[:, col].max() >= len(values):
            raise ValueError(f"{name} labels must be in 0..{len(values) - 1}, got {labels[:, col].unique().tolist()}")
    n, res = labels.shape[0], resolution
    shape, colour, pos = labels.unbind(1)
    side = torch.tensor(float(res))
    jitter = (2 * torch.rand(n, 2, generator=generator) - 1) * side / 32
    cx = torch.where(pos % 2 == 0, 0.28, 0.72) * side + jitter[:, 0]
    cy = torch.where(pos < 2, 0.28, 0.72) * side + jitter[:, 1]
    r = (0.21 + 0.06 * torch.rand(n, generator=generator)) * side
    rgb = PALETTE[colour] + COLOUR_JITTER * (2 * torch.rand(n, 3, generator=generator) - 1)

    S = res * supersample
    grid = (torch.arange(S, dtype=torch.float32) + 0.5) / supersample  # pixel-unit sample positions
    dy = grid.view(1, S, 1) - cy.view(-1, 1, 1)
    dx = grid.view(1, 1, S) - cx.view(-1, 1, 1)
    mask = _shape_masks(shape, dx.expand(n, S, S), dy.expand(n, S, S), r.view(-1, 1, 1))
    alpha = F.avg_pool2d(mask.unsqueeze(1), supersample)  # (n, 1, res, res) coverage
    image = (1 - alpha) * _background(n, res, generator) + alpha * rgb.clamp(0, 1).view(n, 3, 1, 1)
    return (image.clamp(0, 1) * 2 - 1).contiguous()


def make_batch(n: int, generator: torch.Generator, resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """n fresh random (images (n, 3, R, R), labels (n, 3)) from the generator (training draws)."""
    labels = random_labels(n, generator)
    return render(labels, generator, resolution), labels


def make_dataset(n: int, seed: int, resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of n (images, labels), the same for the same seed on every machine."""
    return make_batch(n, offset_generator(seed), resolution)
