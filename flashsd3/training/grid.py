"""Sample grids during training: fixed prompts (cached by `prepare`) and fixed seeds, one PNG per N steps."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from . import models


def save_grid(images: list[Image.Image], path: Path, columns: int, text: dict[str, str]) -> None:
    """Tile equal-size images row-major into one PNG with `text` in its metadata."""
    from .checkpoint import atomic_file

    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for k, im in enumerate(images):
        grid.paste(im, ((k % columns) * w, (k // columns) * h))
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    atomic_file(path, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))


class GridMaker:
    """Rank 0's sample grids: holds the VAE (decoder use only) and the cached prompt embeddings."""

    def __init__(self, cfg, data, model: str, ranks):
        self.cfg, self.device = cfg, ranks.device
        self.context, self.pooled, self.prompts = data.prompt_file("prompts.safetensors")
        self.vae = models.load_vae(model, torch.float32, ranks.device)
        size = data.spec.resolution // self.vae.downscale
        # image k's noise from sample_seed + k (CPU generator, as the pipeline), the same at every grid
        self.noise = torch.stack([torch.randn(data.spec.latent_channels, size, size,
                                              generator=torch.Generator().manual_seed(cfg.sample_seed + k))
                                  for k in range(len(self.prompts))])

    @torch.no_grad()
    def save(self, task, step: int, autocast) -> Path:
        from ..pipeline import to_pil

        dev = self.device
        with autocast:
            latents = task.sample(self.context.to(dev), self.pooled.to(dev), self.noise.to(dev))
        image = self.vae.decode(self.vae.latents_to_vae(latents.float()))
        pils = to_pil(((image + 1) / 2).clamp(0, 1))
        path = Path(self.cfg.out) / "samples" / f"step-{step:07d}.png"
        text = {"step": str(step), "prompts": "\n".join(self.prompts), "seed": str(self.cfg.sample_seed)}
        save_grid(pils, path, columns=min(4, len(pils)), text=text)
        return path
