"""Sample grids during training: fixed prompts (cached by `prepare`) and fixed seeds, one PNG per N steps."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .. import rng
from ..outputs import atomic_write
from . import models


def save_grid(images: torch.Tensor, path: Path, columns: int, text: dict[str, str]) -> None:
    """Tile (n, 3, H, W) images in [0, 1] row-major into one PNG with `text` in its metadata."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = images.new_zeros(3, rows * h, columns * w)
    for k in range(n):
        grid[:, (k // columns) * h:(k // columns + 1) * h, (k % columns) * w:(k % columns + 1) * w] = images[k]
    pixels = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")  # as diffusers' numpy_to_pil
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info))


class GridMaker:
    """Rank 0's sample grids: holds the VAE (decoder use only) and the cached prompt embeddings."""

    def __init__(self, cfg, data, model: str, device: torch.device):
        self.cfg, self.device = cfg, device
        self.context, self.pooled, self.prompts = data.prompt_file("prompts.safetensors")
        self.vae = models.training_vae(model, torch.float32, device)
        size = data.spec.resolution // self.vae.downscale
        # image k's noise from sample_seed + k (CPU generator, as the pipeline), the same at every grid
        self.noise = rng.randn([rng.offset_generator(cfg.sample_seed, k) for k in range(len(self.prompts))],
                               (data.spec.latent_channels, size, size))

    @torch.no_grad()
    def save(self, task, step: int, autocast) -> Path:
        dev = self.device
        with autocast:
            latents = task.sample(self.context.to(dev), self.pooled.to(dev), self.noise.to(dev))
        image = self.vae.decode(self.vae.latents_to_vae(latents.float()))
        images = ((image.float() + 1) / 2).clamp(0, 1)
        path = Path(self.cfg.out) / "samples" / f"step-{step:07d}.png"
        text = {"step": str(step), "prompts": "\n".join(self.prompts), "seed": str(self.cfg.sample_seed)}
        save_grid(images, path, columns=min(4, len(images)), text=text)
        return path
