"""The models a training command loads, each only where it is needed, from the name a cache and a run record.

`prepare` loads the VAE and the two CLIP encoders (never the transformer); `flow` and `flash` load the
transformer, and the VAE only on the rank that draws sample grids (or for Flash's LPIPS loss). Before any of
that, a run checks itself against the transformer's config alone (`meta_transformer`: no weight read).
`DEMO_MODEL` names the offline demo (flashsd3/demo.py, seed 0): the same random weights `flashsd3-sample --demo`
builds, so an adapter trained on it loads there.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import DEMO, SD3_MEDIUM, MMDiTConfig
from ..hub import PIPELINE_PATTERNS, looks_like_repo_id, resolve
from ..rules import VAE_DOWNSCALE

DEMO_MODEL = "demo"


def model_id(model: str) -> str:
    """How a cache and a run record their model: "demo", a hub repo id, or an absolute local path."""
    if model == DEMO_MODEL or looks_like_repo_id(model):
        return model
    return str(Path(model).expanduser().resolve())


def _root(model: str) -> Path:
    return resolve(model, patterns=PIPELINE_PATTERNS, what="model")


def _part(root: Path, name: str) -> Path:
    return root if root.is_file() else root / name


def context_dim(root: Path) -> int:
    """Text-token width of the transformer (joint_attention_dim), read without loading it."""
    config = root / "transformer" / "config.json"
    if root.is_dir() and config.is_file():
        return json.loads(config.read_text())["joint_attention_dim"]
    return SD3_MEDIUM.context_dim  # a Stability single file: SD3's 4096


def transformer_config(model: str) -> MMDiTConfig:
    """The transformer's config, from config.json or the safetensors headers (no tensor is read)."""
    if model == DEMO_MODEL:
        return DEMO
    from ..mmdit.loading import transformer_config as read

    return read(_part(_root(model), "transformer"))


def meta_transformer(model: str, resolution: int, images: str):
    """The MMDiT of `model` on the meta device (shapes and names, no weights), checked to take `resolution`-pixel
    `images` (its position table: pos_embed_max_size tokens of patch x VAE pixels a side)."""
    from ..mmdit import MMDiT

    config = transformer_config(model)
    factor = config.patch_size * VAE_DOWNSCALE
    if resolution // factor > config.pos_embed_max_size:
        raise ValueError(f"{images} holds {resolution}-pixel images, beyond the position table of the model "
                         f"{model}: at most {config.pos_embed_max_size * factor} pixels a side")
    with torch.device("meta"):
        return MMDiT(config)


def load_encoders(model: str, dtype: torch.dtype, device: torch.device):
    """(VAE, TextEncoders) of `model` (a diffusers folder, a single file, a hub id or "demo"), frozen, eval."""
    from ..text_encoders import TextEncoders
    from ..vae import load_vae

    if model == DEMO_MODEL:
        from ..demo import demo_text_encoders

        vae, text = training_vae(model, dtype, device), demo_text_encoders(DEMO, seed=0)
    else:
        root = _root(model)
        vae = load_vae(_part(root, "vae"), dtype=dtype, device=device)
        make = TextEncoders.from_single_file if root.is_file() else TextEncoders.from_diffusers_folder
        text = make(root, dtype=dtype, device=device, context_dim=context_dim(root))
    return vae.to(device, dtype).requires_grad_(False).eval(), text.to(device, dtype)


def training_transformer(model: str, dtype: torch.dtype, device: torch.device):
    """The MMDiT to train, all weights frozen (the task chooses what trains)."""
    if model == DEMO_MODEL:
        from ..demo import demo_transformer_and_vae

        transformer = demo_transformer_and_vae(seed=0)[0]
    else:
        from ..mmdit import load_transformer

        transformer = load_transformer(_part(_root(model), "transformer"), dtype=dtype, device=device)
    return transformer.to(device, dtype).requires_grad_(False)


def training_vae(model: str, dtype: torch.dtype, device: torch.device):
    """The VAE alone (sample grids and Flash's LPIPS loss decode with it), frozen, eval."""
    if model == DEMO_MODEL:
        from ..demo import demo_transformer_and_vae

        vae = demo_transformer_and_vae(seed=0)[1]
    else:
        from ..vae import load_vae

        vae = load_vae(_part(_root(model), "vae"), dtype=dtype, device=device)
    return vae.to(device, dtype).requires_grad_(False).eval()
