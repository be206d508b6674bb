"""`load_controlnet`: a ControlNet from a diffusers folder/file or a Stability single file, strictly.

Sources (layout detected from the keys, never from the file name):
  * diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` (InstantX/SD3-Controlnet-Canny, -Pose,
    -Tile; alimama-creative/SD3-Controlnet-Inpainting; converted SD3.5 ControlNets), or that file alone, or a hub id;
  * Stability's single files (stabilityai/stable-diffusion-3.5-controlnets: sd3.5_large_controlnet_{blur,canny,
    depth}.safetensors), read as Stability-AI/sd3.5 `sd3_infer.py` (SD3.__init__, CONTROLNET_MAP) reads them.
Without config.json the config is read from a few tensors (`infer_config`); every key is mapped or named.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from .. import hub
from ..keymaps import controlnet as km
from ..keymaps.rules import export_state_dict
from ..weights import (
    DIFFUSERS_WEIGHTS,
    CheckpointError,
    Reader,
    StateDictReader,
    detect_layout,
    load_into,
    open_checkpoint,
    read_config,
)
from .config import CONTROL_TYPES, CONTROLNET_PRESETS, ControlNetConfig
from .model import ControlNet, check_compatible

# Single files store no head count; SD3 uses 64-channel heads (Stability-AI/sd3.5 sd3_impls.py BaseModel:
# hidden_size = 64 * depth, num_heads = depth).
HEAD_DIM = 64
HUB_PATTERNS = ["config.json", "diffusion_pytorch_model*.safetensors*"]


def load_controlnet(source: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    transformer=None, config: ControlNetConfig | None = None,
                    control_type: str | None = None) -> ControlNet:
    """Load a ControlNet strictly. transformer: the MMDiT it will run with; required by ControlNets that use the
    transformer's patch embedding (Stability's SD3.5 files, diffusers' use_pos_embed=False), and checked against
    every ControlNet's width when given. dtype None keeps the file's. `config` overrides config.json/inference;
    control_type ("canny" for the diffusers copy of Stability's canny ControlNet) sets its pixel convention."""
    reader, config_json = _open(source)
    config = config or read_config(config_json, ControlNetConfig.from_diffusers, "SD3ControlNetModel")
    if control_type is not None:
        config = replace(config or infer_config(reader, _layout(reader), _config_of(transformer)),
                         control_type=control_type)
    return controlnet_from_reader(reader, config, dtype=dtype, device=device, transformer=transformer)


def controlnet_config(source: str | Path) -> ControlNetConfig:
    """The config `load_controlnet(source)` would use, from config.json or the safetensors headers (checks
    before anything is loaded; Stability files: also their 4-byte `control_type`)."""
    reader, config_json = _open(source)
    config = read_config(config_json, ControlNetConfig.from_diffusers, "SD3ControlNetModel")
    return config or infer_config(reader, _layout(reader))


def _layout(reader: Reader) -> str:
    return detect_layout(reader, km.LAYOUTS, "SD3 ControlNet").name


def _config_of(transformer):
    return None if transformer is None else transformer.config


def _open(source: str | Path):
    path = Path(source).expanduser()
    if not path.exists() and hub.looks_like_repo_id(str(source)):
        path = hub.resolve(str(source), patterns=HUB_PATTERNS, what="ControlNet")
    return open_checkpoint(path, weights_name=DIFFUSERS_WEIGHTS, subfolder="controlnet", what="ControlNet")


def controlnet_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: ControlNetConfig | None = None, *,
                               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                               transformer=None) -> ControlNet:
    """Our ControlNet from a diffusers `SD3ControlNetModel.state_dict()` (or a Stability state dict) in memory,
    through the same strict loader as a file (copies)."""
    reader = StateDictReader(state_dict, "ControlNet state dict")
    return controlnet_from_reader(reader, config, dtype=dtype, device=device, transformer=transformer)


def to_diffusers_state_dict(controlnet: ControlNet) -> dict[str, torch.Tensor]:
    """Our state dict in diffusers' `SD3ControlNetModel` names (the table inverted), as copies."""
    return export_state_dict(controlnet.state_dict(), km.DIFFUSERS)


def controlnet_from_reader(reader: Reader, config: ControlNetConfig | None = None, *, dtype=None, device=None,
                           transformer=None) -> ControlNet:
    """Build on the meta device and fill from any Reader, in whichever layout its keys are."""
    layout = _layout(reader)
    if transformer is None and (layout == "stability" or config is not None and not config.own_embedding):
        raise ValueError(f"{reader.name}: this ControlNet uses the transformer's patch embedding (as Stability's "
                         "SD3.5 ControlNets do): pass transformer=<the MMDiT it runs with>")
    config = config or infer_config(reader, layout, _config_of(transformer))
    if layout == "stability" and config.residual_rule != "stability":
        raise CheckpointError(f"{reader.name}: a Stability ControlNet file adds its residuals by Stability's rule; "
                              f"the given config has residual_rule {config.residual_rule!r}")
    if not config.own_embedding and transformer is None:
        raise ValueError(f"{reader.name}: this ControlNet uses the transformer's patch embedding: pass "
                         "transformer=<the MMDiT it runs with>")
    if transformer is not None:
        try:
            check_compatible(config, transformer.config)
        except ValueError as e:
            raise CheckpointError(f"{reader.name}: {e}") from None
    with torch.device("meta"):
        model = ControlNet(config)
    table, ignore = (km.STABILITY, km.STABILITY_IGNORE) if layout == "stability" else (km.DIFFUSERS, ())
    load_into(model, reader, table, ignore=ignore, dtype=dtype, device=device)
    if transformer is not None:
        model.attach(transformer)
    return model.eval()


def infer_config(reader: Reader, layout: str, mmdit=None) -> ControlNetConfig:
    """Read the architecture from tensor shapes (probes in keymaps/controlnet.py); warn if it matches no preset.
    Heads: those of the transformer (`mmdit`, an MMDiTConfig, whose width must match), else 64-channel heads."""
    probe, keys = km.PROBES[layout], reader.keys()

    def shape(name: str) -> tuple[int, ...]:
        if probe[name] not in keys:
            raise CheckpointError(f"{reader.name}: cannot infer the ControlNet config, key {probe[name]!r} is missing")
        return reader.shape(probe[name])

    hidden, control_channels, patch, _ = shape("control")
    if mmdit is not None and mmdit.hidden_size != hidden:
        raise CheckpointError(f"{reader.name}: ControlNet width {hidden} does not match the transformer's "
                              f"{mmdit.hidden_size}: it was made for another model")
    head_dim = mmdit.head_dim if mmdit is not None else HEAD_DIM
    if hidden % head_dim:
        raise CheckpointError(f"{reader.name}: width {hidden} is not a multiple of {head_dim}, so the head count "
                              "cannot be inferred; pass config= (or use a folder with config.json)")
    depth = len({m.group(1) for k in keys if (m := re.match(probe["block"], k))})
    pooled = shape("pooled")[1]
    common = dict(depth=depth, num_heads=hidden // head_dim, head_dim=head_dim, patch_size=patch,
                  pooled_dim=pooled, mlp_ratio=shape("fc1")[0] / hidden)
    if layout == "stability":
        config = ControlNetConfig(**common, in_channels=control_channels, context_dim=None, pos_embed_max_size=None,
                                  zero_pooled=False, residual_rule="stability", control_type=_control_type(reader))
        # sd3_infer.py line 188: the 8B path iff y_embedder takes the pooled text (2048 features); the 2B path feeds
        # it the transformer's embedded y instead, and no 2B weights are published
        text = mmdit.pooled_dim if mmdit is not None else 2048
        if pooled != text:
            raise CheckpointError(f"{reader.name}: its y_embedder takes {pooled} features, not the {text} of the "
                                  "pooled text, so sd3_infer.py would run it as the unpublished 2B variant; only the "
                                  "8B SD3.5-large ControlNets are supported")
    else:
        own = probe["patch"] in keys
        in_channels = shape("patch")[1] if own else control_channels  # without its own embedding: no extra channels
        joint = probe["context"] in keys
        config = ControlNetConfig(
            **common, in_channels=in_channels, extra_channels=control_channels - in_channels,
            context_dim=shape("context")[1] if joint else None,
            pos_embed_max_size=round(shape("pos")[1] ** 0.5) if own else None,
            qk_norm="rms_norm" if probe["qk"] in keys else None,
            dual_attention_layers=tuple(sorted(int(m.group(1)) for k in keys if (m := re.match(probe["dual"], k)))),
            zero_pooled=joint,  # diffusers' default for InstantX-style files; the converted SD3.5 ones say False
        )
    known = {name: p for name, p in CONTROLNET_PRESETS.items() if p == _without_type(config)}
    if not known:
        warnings.warn(f"{reader.name}: inferred ControlNet config matches no preset ({', '.join(CONTROLNET_PRESETS)}): "
                      f"{config}", stacklevel=3)
    return config


def _without_type(config: ControlNetConfig) -> ControlNetConfig:
    return replace(config, control_type=None)


def _control_type(reader: Reader) -> str | None:
    """Stability's int32 `control_type` tensor (0 blur, 1 canny, 2 depth) as a name; None without one (sd3_infer.py
    then keeps ControlNetEmbedder's default 0, whose pixels are those of None: [-1, 1])."""
    if km.CONTROL_TYPE_KEY not in reader.keys():
        return None
    value = reader.get(km.CONTROL_TYPE_KEY)
    if value.numel() != 1 or not 0 <= int(value.flatten()[0]) < len(CONTROL_TYPES):
        raise CheckpointError(f"{reader.name}: {km.CONTROL_TYPE_KEY} is {value.tolist()}, not one of "
                              f"{', '.join(f'{i} ({t})' for i, t in enumerate(CONTROL_TYPES))}")
    return CONTROL_TYPES[int(value.flatten()[0])]
