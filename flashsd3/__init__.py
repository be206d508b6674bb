"""flashsd3: a readable, fast PyTorch Stable Diffusion 3 with the Flash SD3 LoRA."""
from .config import SD3_MEDIUM, TINY, MMDiTConfig, VAEConfig
from .mmdit import MMDiT, Capture, load_transformer

__all__ = ["MMDiT", "Capture", "MMDiTConfig", "VAEConfig", "SD3_MEDIUM", "TINY", "load_transformer"]
