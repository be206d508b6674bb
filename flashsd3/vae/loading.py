"""`load_vae`: the VAE from a diffusers folder/file or the `first_stage_model.*` part of a Stability single file.

Sources accepted (layout detected from the keys, never from the file name): a diffusers `vae/` folder
(config.json + diffusion_pytorch_model.safetensors) or a pipeline root holding one; a safetensors file with
diffusers keys; a Stability single file (LDM names under `first_stage_model.`, other models in it left
alone) or the same LDM keys without the prefix. Without a config.json, the architecture is read from
tensor shapes (`infer_architecture`; probes in keymaps/vae.py) on top of SD3's VAE config.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ..config import SD3_VAE, VAEConfig
from ..keymaps import vae as km
from ..keymaps.rules import identity_table
from ..precision import resolve_dtype
from ..weights import DIFFUSERS_WEIGHTS, CheckpointError, Reader, detect_layout, load_into, open_checkpoint, read_config
from .model import VAE


def load_vae(source: str | Path, *, config: VAEConfig | None = None, dtype: torch.dtype | str | None = None,
             device: torch.device | str | None = None) -> VAE:
    """Load the VAE strictly. Config: `config`, else the folder's config.json, else SD3_VAE with the
    architecture read from the tensors. dtype None keeps the file's dtype, "auto" picks the sampling dtype
    of `device` (`flashsd3.precision`); tensors are read and converted one by one."""
    dtype = resolve_dtype(dtype, device)
    reader, config_json = open_checkpoint(source, weights_name=DIFFUSERS_WEIGHTS, subfolder="vae", what="VAE")
    file_config = read_config(config_json, VAEConfig.from_diffusers, "AutoencoderKL")
    layout = detect_layout(reader, km.LAYOUTS, "VAE")
    found = infer_architecture(reader, layout.name, layout.prefix)
    config = config or file_config or _config_from_tensors(reader, found)
    misfit = [f"{k}: tensors say {v}, config says {getattr(config, k)}" for k, v in found.items()
              if getattr(config, k) != v]
    with torch.device("meta"):
        model = VAE(config)
    keys = model.state_dict().keys()
    table = identity_table(keys) if layout.name == "diffusers" else km.ldm_table(len(config.block_out_channels))
    try:
        load_into(model, reader, table, prefix=layout.prefix, dtype=dtype, device=device)
    except CheckpointError as e:
        if misfit:  # say why before the key-by-key report
            raise CheckpointError(f"VAE weights do not fit the config ({'; '.join(misfit)})\n{e}") from None
        raise
    return model.eval()


def infer_architecture(reader: Reader, layout: str, prefix: str = "") -> dict:
    """The VAEConfig fields that tensor shapes determine (not norm groups, not latent scale/shift).
    A field whose probe key is absent is left out."""
    probe, keys = km.PROBES[layout], set(reader.keys())

    def dim(key: str, d: int) -> int | None:
        return reader.shape(prefix + key)[d] if prefix + key in keys else None

    def count(template: str) -> int:
        n = 0
        while prefix + template.replace("{i}", str(n)) in keys:
            n += 1
        return n

    found = dict(
        in_channels=dim("encoder.conv_in.weight", 1),
        out_channels=dim("decoder.conv_out.weight", 0),
        latent_channels=dim("decoder.conv_in.weight", 1),
        block_out_channels=tuple(dim(probe["level"].replace("{i}", str(i)), 0)
                                 for i in range(count(probe["level"]))) or None,
        layers_per_block=count(probe["resnet"]) or None,
        mid_block_add_attention=prefix + probe["attn"] in keys,
    )
    return {k: v for k, v in found.items() if v is not None}


def _config_from_tensors(reader: Reader, found: dict) -> VAEConfig:
    config = replace(SD3_VAE, **found)
    if config != SD3_VAE:
        warnings.warn(f"{reader.name}: VAE is not SD3's ({', '.join(f'{k}={v}' for k, v in found.items())}); "
                      "using SD3's norm groups and latent scale/shift; pass config= otherwise", stacklevel=3)
    return config
