"""flashsd3: a readable, fast PyTorch Stable Diffusion 3 with the Flash SD3 LoRA."""
from .config import SD3_MEDIUM, TINY, MMDiTConfig, VAEConfig
from .lora import load_lora, merge_lora, unmerge_lora
from .mmdit import Capture, MMDiT, load_transformer
from .pipeline import FlashSD3Pipeline
from .text_encoders import TextEncoders
from .vae import VAE, load_vae

__all__ = [
    "FlashSD3Pipeline", "MMDiT", "Capture", "VAE", "TextEncoders", "MMDiTConfig", "VAEConfig", "SD3_MEDIUM", "TINY",
    "load_transformer", "load_vae", "load_lora", "merge_lora", "unmerge_lora",
]
