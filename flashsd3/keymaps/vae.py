"""Key tables for the VAE (data only). Our names are the diffusers `AutoencoderKL` names.

Diffusers files load through `rules.identity_table`. Stability single files store the VAE under
`first_stage_model.` in the LDM layout (Stability-AI/sd3.5 `sd3_impls.py` SDVAE); `ldm_table` maps it.
Checked against diffusers' `loaders/single_file_utils.py` convert_ldm_vae_checkpoint (tests/test_vae.py).
"""
from __future__ import annotations

from .rules import Layout, Rule, Transform, as_is, conv1x1_to_linear

LDM_PREFIX = "first_stage_model."

_WB = ("weight", "bias")
# ResnetBlock: ours <- LDM (the 1x1 skip conv is `nin_shortcut` in LDM)
_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
           ("conv_shortcut", "nin_shortcut"))
# AttnBlock: LDM projects with 1x1 convs [C, C, 1, 1]; ours (and diffusers) with Linear [C, C]
_ATTN = (("group_norm", "norm", as_is), ("to_q", "q", conv1x1_to_linear), ("to_k", "k", conv1x1_to_linear),
         ("to_v", "v", conv1x1_to_linear), ("to_out.0", "proj_out", conv1x1_to_linear))


def _modules(levels: int) -> list[tuple[str, str, Transform]]:
    """(our module, LDM module, weight transform) for every module holding a weight and a bias."""
    rows = []
    for side in ("encoder", "decoder"):
        rows += [(f"{side}.conv_in", f"{side}.conv_in", as_is), (f"{side}.conv_out", f"{side}.conv_out", as_is),
                 (f"{side}.conv_norm_out", f"{side}.norm_out", as_is)]
        for n in (0, 1):  # LDM counts the two mid resnets from 1
            rows += [(f"{side}.mid_block.resnets.{n}.{o}", f"{side}.mid.block_{n + 1}.{s}", as_is) for o, s in _RESNET]
        rows += [(f"{side}.mid_block.attentions.0.{o}", f"{side}.mid.attn_1.{s}", tf) for o, s, tf in _ATTN]
    for lvl in range(levels):
        # encoder levels run in the same order in both layouts; `{i}` is the resnet index
        enc, ldm_enc = f"encoder.down_blocks.{lvl}", f"encoder.down.{lvl}"
        rows += [(f"{enc}.resnets.{{i}}.{o}", f"{ldm_enc}.block.{{i}}.{s}", as_is) for o, s in _RESNET]
        rows.append((f"{enc}.downsamplers.0.conv", f"{ldm_enc}.downsample.conv", as_is))
        # Trap: LDM numbers decoder levels by resolution (up.0 = full size, run last); diffusers by
        # execution order (up_blocks.0 runs first, at the latent size). So up_blocks.{l} <- up.{levels-1-l}.
        dec, ldm_dec = f"decoder.up_blocks.{lvl}", f"decoder.up.{levels - 1 - lvl}"
        rows += [(f"{dec}.resnets.{{i}}.{o}", f"{ldm_dec}.block.{{i}}.{s}", as_is) for o, s in _RESNET]
        rows.append((f"{dec}.upsamplers.0.conv", f"{ldm_dec}.upsample.conv", as_is))
    return rows


def ldm_table(levels: int = 4) -> tuple[Rule, ...]:
    """ours <- LDM keys (without `first_stage_model.`) for a VAE with `levels` resolution levels
    (= len(block_out_channels); SD3: 4). Rows for modules a model lacks (the last level's
    down/upsampler, a shortcut conv where channels agree) are simply unused."""
    return tuple(
        Rule(f"{ours}.{wb}", (f"{src}.{wb}",), tf if wb == "weight" else as_is)
        for ours, src, tf in _modules(levels) for wb in _WB
    )


# How a file stores the VAE, in detection order (see keymaps/mmdit.py LAYOUTS).
LAYOUTS = (
    Layout("ldm", LDM_PREFIX, ("encoder.", "decoder.")),
    Layout("diffusers", "", ("encoder.down_blocks.", "decoder.up_blocks.")),
    Layout("ldm", "", ("encoder.down.", "decoder.up.")),
)


# Keys read to infer a config from a file without config.json (`{i}` = level or resnet index).
PROBES = {
    "diffusers": dict(level="encoder.down_blocks.{i}.resnets.0.conv1.weight",
                      resnet="encoder.down_blocks.0.resnets.{i}.conv1.weight",
                      attn="encoder.mid_block.attentions.0.to_q.weight"),
    "ldm": dict(level="encoder.down.{i}.block.0.conv1.weight",
                resnet="encoder.down.0.block.{i}.conv1.weight",
                attn="encoder.mid.attn_1.q.weight"),
}
