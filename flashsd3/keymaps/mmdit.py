"""Key tables for the MMDiT (data only). Our names are the official Stability names.

Diffusers reference: `loaders/single_file_utils.py` convert_sd3_transformer_checkpoint_to_diffusers.
Stability single files: our keys under `model.diffusion_model.` (ORIGINAL_PREFIX), no renames.
"""
from __future__ import annotations

from .rules import Layout, Rule, fuse_qkv, swap_halves

ORIGINAL_PREFIX = "model.diffusion_model."

_WB = ("weight", "bias")
_D = "transformer_blocks.{i}"

# ours <- diffusers[, transform]. Rows are expanded for weight and bias below.
_DIFFUSERS_LINEAR = [
    ("x_embedder.proj", ("pos_embed.proj",)),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    ("context_embedder", ("context_embedder",)),
    # diffusers splits the fused projection into q, k, v (image) and add_q/k/v_proj (text)
    ("joint_blocks.{i}.x_block.attn.qkv", (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v"), fuse_qkv),
    ("joint_blocks.{i}.context_block.attn.qkv",
     (f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj"), fuse_qkv),
    ("joint_blocks.{i}.x_block.attn.proj", (f"{_D}.attn.to_out.0",)),
    ("joint_blocks.{i}.context_block.attn.proj", (f"{_D}.attn.to_add_out",)),
    ("joint_blocks.{i}.x_block.mlp.fc1", (f"{_D}.ff.net.0.proj",)),
    ("joint_blocks.{i}.x_block.mlp.fc2", (f"{_D}.ff.net.2",)),
    ("joint_blocks.{i}.context_block.mlp.fc1", (f"{_D}.ff_context.net.0.proj",)),
    ("joint_blocks.{i}.context_block.mlp.fc2", (f"{_D}.ff_context.net.2",)),
    # AdaLayerNormZero: (shift, scale, gate) x (attn, mlp[, attn2]) in both layouts
    ("joint_blocks.{i}.x_block.adaLN_modulation.1", (f"{_D}.norm1.linear",)),
    ("joint_blocks.{i}.context_block.adaLN_modulation.1", (f"{_D}.norm1_context.linear",)),
    # SD3.5 MMDiT-X second image attention
    ("joint_blocks.{i}.x_block.attn2.qkv", (f"{_D}.attn2.to_q", f"{_D}.attn2.to_k", f"{_D}.attn2.to_v"), fuse_qkv),
    ("joint_blocks.{i}.x_block.attn2.proj", (f"{_D}.attn2.to_out.0",)),
    ("final_layer.linear", ("proj_out",)),
    # Trap: diffusers' AdaLayerNormContinuous stores (scale, shift); the official layer (shift, scale)
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves),
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
    Rule(f"{ours}.{wb}", tuple(f"{s}.{wb}" for s in srcs), *tf) for ours, srcs, *tf in _DIFFUSERS_LINEAR for wb in _WB
) + tuple(Rule(ours, (src,)) for ours, src in _DIFFUSERS_WEIGHT_ONLY)


def diffusers_table(depth: int) -> tuple[Rule, ...]:
    """DIFFUSERS plus the last block's pre-only context modulation, which is (scale, shift) in
    diffusers (AdaLayerNormContinuous) and (shift, scale) officially. Literal rows override `{i}` rows."""
    last = depth - 1
    return DIFFUSERS + tuple(
        Rule(f"joint_blocks.{last}.context_block.adaLN_modulation.1.{wb}",
             (f"transformer_blocks.{last}.norm1_context.linear.{wb}",), swap_halves)
        for wb in _WB
    )


# How a file stores the transformer: checked in this order, the first whose markers (key starts, after
# the prefix) occur wins. Stability single files hold other models beside it (VAE, text encoders).
LAYOUTS = (
    Layout("original", ORIGINAL_PREFIX, ("joint_blocks.",)),
    Layout("original", "", ("joint_blocks.",)),
    Layout("diffusers", "", ("transformer_blocks.",)),
)

# Where each config field is read from when a file has no config.json (`infer_config`), per layout.
PROBES = {
    "original": dict(patch="x_embedder.proj.weight", pos="pos_embed", context="context_embedder.weight",
                     pooled="y_embedder.mlp.0.weight", final="final_layer.linear.weight",
                     fc1="joint_blocks.0.x_block.mlp.fc1.weight", qk="joint_blocks.0.x_block.attn.ln_q.weight",
                     block=r"joint_blocks\.(\d+)\.", dual=r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight"),
    "diffusers": dict(patch="pos_embed.proj.weight", pos="pos_embed.pos_embed", context="context_embedder.weight",
                      pooled="time_text_embed.text_embedder.linear_1.weight", final="proj_out.weight",
                      fc1="transformer_blocks.0.ff.net.0.proj.weight", qk="transformer_blocks.0.attn.norm_q.weight",
                      block=r"transformer_blocks\.(\d+)\.", dual=r"transformer_blocks\.(\d+)\.attn2\.to_q\.weight"),
}
