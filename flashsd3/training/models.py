"""The models a training command loads, each only where it is needed.

`prepare` loads the VAE and the two CLIP encoders (never the transformer); `flow` loads the transformer, and
the VAE only on the rank that draws sample grids. `DEMO_MODEL` names the offline demo (FlashSD3Pipeline.demo,
seed 0): the same random weights `flashsd3-sample --demo` builds, so an adapter trained on it loads there.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import SD3_MEDIUM
from ..hub import PIPELINE_PATTERNS, looks_like_repo_id, resolve

DEMO_MODEL = "demo"


def model_id(model: str) -> str:
    """How a cache and a run record their model: "demo", a hub repo id, or an absolute local path."""
    if model == DEMO_MODEL or looks_like_repo_id(model):
        return model
    return str(Path(model).expanduser().resolve())


def _demo():
    from ..pipeline import FlashSD3Pipeline

    return FlashSD3Pipeline.demo(seed=0)


def _root(model: str) -> Path:
    return resolve(model, patterns=PIPELINE_PATTERNS, what="model")


def context_dim(root: Path) -> int:
    """Text-token width of the transformer (joint_attention_dim), read without loading it."""
    config = root / "transformer" / "config.json"
    if root.is_dir() and config.is_file():
        return json.loads(config.read_text())["joint_attention_dim"]
    return SD3_MEDIUM.context_dim  # a Stability single file: SD3's 4096


def load_encoders(model: str, dtype: torch.dtype, device: torch.device):
    """(VAE, TextEncoders) of `model` (a diffusers folder, a single file, a hub id or "demo"), frozen, eval."""
    from ..text_encoders import TextEncoders
    from ..vae import load_vae

    if model == DEMO_MODEL:
        pipe = _demo()
        vae, text = pipe.vae, pipe.text_encoders
    else:
        root = _root(model)
        vae = load_vae(root if root.is_file() else root / "vae", dtype=dtype, device=device)
        make = TextEncoders.from_single_file if root.is_file() else TextEncoders.from_diffusers_folder
        text = make(root, dtype=dtype, device=device, context_dim=context_dim(root))
    return vae.to(device, dtype).requires_grad_(False).eval(), text.to(device, dtype)


def load_transformer(model: str, dtype: torch.dtype, device: torch.device):
    """The MMDiT to fine-tune, all weights frozen (the caller chooses what trains)."""
    from ..mmdit import load_transformer as load

    if model == DEMO_MODEL:
        transformer = _demo().transformer
    else:
        root = _root(model)
        transformer = load(root if root.is_file() else root / "transformer", dtype=dtype, device=device)
    return transformer.to(device, dtype).requires_grad_(False)


def load_vae(model: str, dtype: torch.dtype, device: torch.device):
    """The VAE alone (sample grids decode with it)."""
    from ..vae import load_vae as load

    if model == DEMO_MODEL:
        vae = _demo().vae
    else:
        root = _root(model)
        vae = load(root if root.is_file() else root / "vae", dtype=dtype, device=device)
    return vae.to(device, dtype).requires_grad_(False).eval()

