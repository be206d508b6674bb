"""The SD3 MMDiT transformer."""
from .loading import load_transformer, to_diffusers_state_dict
from .model import MMDiT, Capture

__all__ = ["MMDiT", "Capture", "load_transformer", "to_diffusers_state_dict"]
