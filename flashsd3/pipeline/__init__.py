"""The inference pipeline: `FlashSD3Pipeline` (core.py), its randomness (noise.py) and argument checks (checks.py)."""
from .checks import check_finite
from .core import Edit, FlashSD3Pipeline, PipelineOutput, to_pil
from .noise import PerImageNoise, SharedNoise, image_seeds

__all__ = ["Edit", "FlashSD3Pipeline", "PerImageNoise", "PipelineOutput", "SharedNoise", "check_finite", "image_seeds",
           "to_pil"]
