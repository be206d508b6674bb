"""Key tables for the MMDiT (data only). Our names are the official Stability names.

Diffusers reference: `loaders/single_file_utils.py` convert_sd3_transformer_checkpoint_to_diffusers.
Stability single files: our keys under `model.diffusion_model.` (ORIGINAL_PREFIX), no renames.
"""
from __future__ import annotations

from ..weights import Rule

ORIGINAL_PREFIX = "model.diffusion_model."
# Other models stored beside the transformer in Stability's single files; not ours to check.
SINGLE_FILE_OTHER_PREFIXES = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")

_WB = ("weight", "bias")
_D = "transformer_blocks.{i}"

# ours <- diffusers. Rows are expanded for weight and bias below.
_DIFFUSERS_LINEAR = [
    ("x_embedder.proj", ("pos_embed.proj",), None),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), None),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), None),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), None),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), None),
    ("context_embedder", ("context_embedder",), None),
    # diffusers splits the fused projection into q, k, v (image) and add_q/k/v_proj (text)
    ("joint_blocks.{i}.x_block.attn.qkv", (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v"), "cat0"),
    ("joint_blocks.{i}.context_block.attn.qkv",
     (f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj"), "cat0"),
    ("joint_blocks.{i}.x_block.attn.proj", (f"{_D}.attn.to_out.0",), None),
    ("joint_blocks.{i}.context_block.attn.proj", (f"{_D}.attn.to_add_out",), None),
    ("joint_blocks.{i}.x_block.mlp.fc1", (f"{_D}.ff.net.0.proj",), None),
    ("joint_blocks.{i}.x_block.mlp.fc2", (f"{_D}.ff.net.2",), None),
    ("joint_blocks.{i}.context_block.mlp.fc1", (f"{_D}.ff_context.net.0.proj",), None),
    ("joint_blocks.{i}.context_block.mlp.fc2", (f"{_D}.ff_context.net.2",), None),
    # AdaLayerNormZero: (shift, scale, gate) x (attn, mlp[, attn2]) in both layouts
    ("joint_blocks.{i}.x_block.adaLN_modulation.1", (f"{_D}.norm1.linear",), None),
    ("joint_blocks.{i}.context_block.adaLN_modulation.1", (f"{_D}.norm1_context.linear",), None),
    # SD3.5 MMDiT-X second image attention
    ("joint_blocks.{i}.x_block.attn2.qkv", (f"{_D}.attn2.to_q", f"{_D}.attn2.to_k", f"{_D}.attn2.to_v"), "cat0"),
    ("joint_blocks.{i}.x_block.attn2.proj", (f"{_D}.attn2.to_out.0",), None),
    ("final_layer.linear", ("proj_out",), None),
    # Trap: diffusers' AdaLayerNormContinuous stores (scale, shift); the official layer (shift, scale)
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap_halves"),
]
# Weight-only rows: the position table and SD3.5's per-head RMSNorm scales.
_DIFFUSERS_WEIGHT_ONLY = [
    ("pos_embed", "pos_embed.pos_embed"),
    ("joint_blocks.{i}.x_block.attn.ln_q.weight", f"{_D}.attn.norm_q.weight"),
    ("joint_blocks.{i}.x_block.attn.ln_k.weight", f"{_D}.attn.norm_k.weight"),
    ("joint_blocks.{i}.context_block.attn.ln_q.weight", f"{_D}.attn.norm_added_q.weight"),
    ("joint_blocks.{i}.context_block.attn.ln_k.weight", f"{_D}.attn.norm_added_k.weight"),
    ("joint_blocks.{i}.x_block.attn2.ln_q.weight", f"{_D}.attn2.norm_q.weight"),
    ("joint_blocks.{i}.x_block.attn2.ln_k.weight", f"{_D}.attn2.norm_k.weight"),
]

DIFFUSERS: tuple[Rule, ...] = tuple(
    Rule(f"{ours}.{wb}", tuple(f"{s}.{wb}" for s in srcs), tf) for ours, srcs, tf in _DIFFUSERS_LINEAR for wb in _WB
) + tuple(Rule(ours, (src,)) for ours, src in _DIFFUSERS_WEIGHT_ONLY)


def diffusers_table(depth: int) -> tuple[Rule, ...]:
    """DIFFUSERS plus the last block's pre-only context modulation, which is (scale, shift) in
    diffusers (AdaLayerNormContinuous) and (shift, scale) officially. Literal rows override `{i}` rows."""
    last = depth - 1
    return DIFFUSERS + tuple(
        Rule(f"joint_blocks.{last}.context_block.adaLN_modulation.1.{wb}",
             (f"transformer_blocks.{last}.norm1_context.linear.{wb}",), "swap_halves")
        for wb in _WB
    )


def identity_table(keys) -> tuple[Rule, ...]:
    """The official layout: every key of ours is stored under its own name."""
    return tuple(Rule(k, (k,)) for k in keys)
