"""SD3's VAE: the model (`model.py`) and its strict loader (`loading.py`)."""
from .loading import infer_architecture, load_vae
from .model import VAE, AttnBlock, DiagonalGaussian, decode_tiled

__all__ = ["VAE", "AttnBlock", "DiagonalGaussian", "decode_tiled", "infer_architecture", "load_vae"]
