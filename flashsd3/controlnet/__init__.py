"""ControlNet for SD3 / SD3.5: the model, its residuals, loaders and control-image helpers."""
from .config import CONTROLNET_PRESETS, DEMO_CONTROLNET, ControlNetConfig
from .loading import controlnet_config, controlnet_from_state_dict, load_controlnet, to_diffusers_state_dict
from .model import ControlNet, ControlNetResiduals

__all__ = ["ControlNet", "ControlNetConfig", "ControlNetResiduals", "CONTROLNET_PRESETS", "DEMO_CONTROLNET",
           "controlnet_config", "controlnet_from_state_dict", "load_controlnet", "to_diffusers_state_dict"]
