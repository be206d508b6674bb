"""The SD3 MMDiT transformer."""
from .loading import from_diffusers_state_dict, load_transformer, to_diffusers_state_dict, transformer_config
from .model import Capture, MMDiT

__all__ = ["MMDiT", "Capture", "load_transformer", "from_diffusers_state_dict", "to_diffusers_state_dict",
           "transformer_config"]
