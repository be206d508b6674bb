"""`load_transformer`: the MMDiT from a diffusers folder/file or a Stability single-file checkpoint.

Sources accepted (layout detected from the keys, never from the file name):
  * diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` (or sharded with its
    `.index.json`); a pipeline root folder with `transformer/` inside also works;
  * one safetensors file with diffusers keys (`transformer_blocks.0...`);
  * a Stability single file (`model.diffusion_model.*`, other models beside it are left alone),
    or the same keys without the prefix.
Without a config.json the config is read from a few tensors (`infer_config`).
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch

from ..config import MMDIT_PRESETS, MMDiTConfig
from ..keymaps import mmdit as km
from ..weights import CheckpointError, SafetensorsReader, load_into, open_checkpoint, read_config, resolve
from .model import MMDiT

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Where each config field is read from, per layout (our names / diffusers names).
_PROBES = {
    "original": dict(patch="x_embedder.proj.weight", pos="pos_embed", context="context_embedder.weight",
                     pooled="y_embedder.mlp.0.weight", final="final_layer.linear.weight",
                     fc1="joint_blocks.0.x_block.mlp.fc1.weight", qk="joint_blocks.0.x_block.attn.ln_q.weight",
                     block=r"joint_blocks\.(\d+)\.", dual=r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight"),
    "diffusers": dict(patch="pos_embed.proj.weight", pos="pos_embed.pos_embed", context="context_embedder.weight",
                      pooled="time_text_embed.text_embedder.linear_1.weight", final="proj_out.weight",
                      fc1="transformer_blocks.0.ff.net.0.proj.weight", qk="transformer_blocks.0.attn.norm_q.weight",
                      block=r"transformer_blocks\.(\d+)\.", dual=r"transformer_blocks\.(\d+)\.attn2\.to_q\.weight"),
}
HEAD_DIM = 64  # single files store no head count; SD3 uses 64-channel heads (reference README F3)


def load_transformer(source: str | Path, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None, config: MMDiTConfig | None = None) -> MMDiT:
    """Load the MMDiT strictly. dtype None keeps the checkpoint's dtype; tensors are converted
    one by one as they are read (no float32 detour). `config` overrides config.json/inference."""
    reader, config_json = open_checkpoint(source, weights_name=WEIGHTS_NAME, subfolder="transformer", what="transformer")
    layout, prefix = detect_layout(reader)
    config = (config or read_config(config_json, MMDiTConfig.from_diffusers, "SD3Transformer2DModel")
              or infer_config(reader, layout, prefix))
    with torch.device("meta"):
        model = MMDiT(config)
    keys = model.state_dict().keys()
    table = km.diffusers_table(config.depth) if layout == "diffusers" else km.identity_table(keys)
    load_into(model, reader, table, prefix=prefix, dtype=dtype, device=device)
    return model.eval()


def detect_layout(reader: SafetensorsReader) -> tuple[str, str]:
    """('original' | 'diffusers', key prefix) from the keys present."""
    keys = reader.keys()
    if any(k.startswith(km.ORIGINAL_PREFIX) for k in keys):
        return "original", km.ORIGINAL_PREFIX
    if any(k.startswith("joint_blocks.") for k in keys):
        return "original", ""
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers", ""
    raise CheckpointError(
        f"{reader.name}: no SD3 transformer keys found (looked for '{km.ORIGINAL_PREFIX}joint_blocks.*', "
        f"'joint_blocks.*' and 'transformer_blocks.*'); first keys: {sorted(keys)[:5]}"
    )


def infer_config(reader: SafetensorsReader, layout: str, prefix: str = "") -> MMDiTConfig:
    """Read the architecture from tensor shapes; warn if it matches no known preset."""
    probe = _PROBES[layout]
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
                      f"({', '.join(MMDIT_PRESETS)}): {config}", stacklevel=3)
    return config


def to_diffusers_state_dict(model: MMDiT) -> dict[str, torch.Tensor]:
    """Our state dict in diffusers names (inverse of the table): for export and round-trip tests."""
    state, out = model.state_dict(), {}
    for key, (sources, tname) in resolve(state.keys(), km.diffusers_table(model.config.depth)).items():
        t = state[key]
        parts = t.chunk(len(sources), dim=0) if tname == "cat0" else [t]
        if tname == "swap_halves":
            a, b = t.chunk(2, dim=0)
            parts = [torch.cat([b, a], dim=0)]
        out.update({s: p.clone() for s, p in zip(sources, parts)})
    return out
