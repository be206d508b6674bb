"""`load_transformer`: the MMDiT from a diffusers folder/file or a Stability single-file checkpoint.

Sources accepted (layout detected from the keys, never from the file name):
  * diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` (or sharded with its
    `.index.json`); a pipeline root folder with `transformer/` inside also works;
  * one safetensors file with diffusers keys (`transformer_blocks.0...`);
  * a Stability single file (`model.diffusion_model.*`, other models beside it are left alone),
    or the same keys without the prefix.
Without a config.json the config is read from a few tensors (`infer_config`). In memory, a diffusers
state dict converts both ways: `from_diffusers_state_dict` / `to_diffusers_state_dict`.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import MMDIT_PRESETS, MMDiTConfig
from ..keymaps import mmdit as km
from ..keymaps.rules import export_state_dict, identity_table
from ..precision import resolve_dtype
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
from .model import MMDiT

# Single files store no head count; SD3 uses 64-channel heads (Stability-AI/sd3.5 `mmditx.py`
# MMDiTX.__init__: hidden_size = 64 * depth, num_heads = depth; diffusers configs: attention_head_dim 64).
HEAD_DIM = 64


def load_transformer(source: str | Path, *, dtype: torch.dtype | str | None = None,
                     device: torch.device | str | None = None, config: MMDiTConfig | None = None) -> MMDiT:
    """Load the MMDiT strictly. dtype None keeps the checkpoint's dtype, "auto" picks the sampling dtype
    of `device` (`flashsd3.precision`); tensors are converted one by one as they are read (no float32
    detour). `config` overrides config.json/inference."""
    reader, config_json = _open(source)
    config = config or read_config(config_json, MMDiTConfig.from_diffusers, "SD3Transformer2DModel")
    return transformer_from_reader(reader, config, dtype=resolve_dtype(dtype, device), device=device)


def transformer_config(source: str | Path) -> MMDiTConfig:
    """The config `load_transformer(source)` would use, read without loading any tensor: config.json,
    else inferred from the safetensors headers (for checks before a model is loaded)."""
    reader, config_json = _open(source)
    config = read_config(config_json, MMDiTConfig.from_diffusers, "SD3Transformer2DModel")
    if config is not None:  # config.json decides; the keys are checked when the weights load
        return config
    layout = detect_layout(reader, km.LAYOUTS, "SD3 transformer")
    return infer_config(reader, layout.name, layout.prefix)


def _open(source: str | Path):
    return open_checkpoint(source, weights_name=DIFFUSERS_WEIGHTS, subfolder="transformer", what="transformer")


def from_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], config: MMDiTConfig | None = None, *,
                              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> MMDiT:
    """Our MMDiT from a diffusers `SD3Transformer2DModel.state_dict()` in memory, through the same
    strict loader as a file (copies: the model shares no memory with the dict). Inverse of
    `to_diffusers_state_dict`. config None: read from the shapes, as for a single file."""
    reader = StateDictReader(state_dict, "diffusers state dict")
    if detect_layout(reader, km.LAYOUTS, "SD3 transformer").name != "diffusers":
        raise CheckpointError(f"{reader.name}: keys are in the official layout (joint_blocks.*), not diffusers'; "
                              "load it with MMDiT.load_state_dict")
    return transformer_from_reader(reader, config, dtype=dtype, device=device)


def to_diffusers_state_dict(model: MMDiT) -> dict[str, torch.Tensor]:
    """Our state dict in diffusers names (the key table inverted), as copies: for export and round trips."""
    return export_state_dict(model.state_dict(), km.diffusers_table(model.config.depth))


def transformer_from_reader(reader: Reader, config: MMDiTConfig | None = None, *, dtype: torch.dtype | None = None,
                            device: torch.device | str | None = None) -> MMDiT:
    """Build on the meta device and fill from any Reader, in whichever layout its keys are."""
    layout = detect_layout(reader, km.LAYOUTS, "SD3 transformer")
    config = config or infer_config(reader, layout.name, layout.prefix)
    with torch.device("meta"):
        model = MMDiT(config)
    keys = model.state_dict().keys()
    table = km.diffusers_table(config.depth) if layout.name == "diffusers" else identity_table(keys)
    load_into(model, reader, table, prefix=layout.prefix, dtype=dtype, device=device)
    return model.eval()


def infer_config(reader: Reader, layout: str, prefix: str = "") -> MMDiTConfig:
    """Read the architecture from tensor shapes (probes in keymaps/mmdit.py); warn if it matches no preset."""
    probe = km.PROBES[layout]
    keys = [k[len(prefix):] for k in reader.keys() if k.startswith(prefix)]

    def shape(name: str) -> tuple[int, ...]:
        if prefix + probe[name] not in reader.keys():
            raise CheckpointError(f"{reader.name}: cannot infer the config, key {prefix + probe[name]!r} is missing")
        return reader.shape(prefix + probe[name])

    hidden, in_ch, patch, _ = shape("patch")
    if hidden % HEAD_DIM:
        raise CheckpointError(f"{reader.name}: width {hidden} is not a multiple of {HEAD_DIM}, so the head count "
                              "cannot be inferred; pass config= (or use a folder with config.json)")
    blocks = {int(m.group(1)) for k in keys if (m := re.match(probe["block"], k))}
    grid = math.isqrt(shape("pos")[1])
    config = MMDiTConfig(
        depth=max(blocks) + 1 if blocks else 0, num_heads=hidden // HEAD_DIM, head_dim=HEAD_DIM,
        patch_size=patch, in_channels=in_ch, out_channels=shape("final")[0] // (patch * patch),
        context_dim=shape("context")[1], pooled_dim=shape("pooled")[1], pos_embed_max_size=grid,
        mlp_ratio=shape("fc1")[0] / hidden,
        qk_norm="rms_norm" if prefix + probe["qk"] in reader.keys() else None,
        dual_attention_layers=tuple(sorted(int(m.group(1)) for k in keys if (m := re.match(probe["dual"], k)))),
    )
    if config not in MMDIT_PRESETS.values():
        warnings.warn(f"{reader.name}: inferred transformer config matches no preset "
                      f"({', '.join(MMDIT_PRESETS)}): {config}", stacklevel=4)
    return config
