"""ControlNet for SD3 / SD3.5: the model, its residuals, loaders and control-image helpers.

Names are imported on first use (PEP 562), so flashsd3-sample can read `controlnet.flags` before torch loads.
"""
from importlib import import_module

_EXPORTS = {
    "ControlNet": "model", "ControlNetResiduals": "model",
    "ControlNetConfig": "config", "CONTROLNET_PRESETS": "config", "DEMO_CONTROLNET": "config",
    "controlnet_config": "loading", "controlnet_from_state_dict": "loading", "load_controlnet": "loading",
    "to_diffusers_state_dict": "loading",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flashsd3.controlnet' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
