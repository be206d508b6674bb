"""flashsd3: a readable, fast PyTorch Stable Diffusion 3 with the Flash SD3 LoRA.

Entry points are imported on first use (PEP 562), so `flashsd3-sample --help` or a bad flag answers
without importing transformers.
"""
from importlib import import_module

_EXPORTS = {
    "FlashSD3Pipeline": "pipeline", "MMDiT": "mmdit", "Capture": "mmdit", "load_transformer": "mmdit",
    "VAE": "vae", "load_vae": "vae", "TextEncoders": "text_encoders",
    "load_lora": "lora", "merge_lora": "lora", "unmerge_lora": "lora", "add_lora": "lora", "save_lora": "lora",
    "Recipe": "recipes", "RECIPES": "recipes",
    "ControlNet": "controlnet", "load_controlnet": "controlnet",
    "MMDiTConfig": "config", "VAEConfig": "config", "SD3_MEDIUM": "config", "TINY": "config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flashsd3' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
