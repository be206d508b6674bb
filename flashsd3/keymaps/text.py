"""Key tables for the text encoders (data only).

Our models ARE the transformers classes (`CLIPTextModelWithProjection`, `T5EncoderModel`), and both a
diffusers folder (`text_encoder*/model.safetensors`) and a Stability single file (under the prefixes
below, which diffusers' `loaders/single_file_utils.py` strips: `convert_ldm_clip_checkpoint`,
`convert_sd3_t5_checkpoint_to_diffusers`) use their key names unchanged, so every row is an identity. Listing the
rows anyway makes the loader strict: a key the model does not expect is an error, not silently dropped.
"""
from __future__ import annotations

from .rules import identity_table

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."


_CLIP_LAYER = "text_model.encoder.layers.{i}"
_CLIP_LAYER_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
)

CLIP_TABLE = identity_table((
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight",
    *(f"{_CLIP_LAYER}.{m}.{p}" for m in _CLIP_LAYER_MODULES for p in ("weight", "bias")),
    "text_model.final_layer_norm.weight",
    "text_model.final_layer_norm.bias",
    "text_projection.weight",  # no bias in CLIP
))

# Keys that may sit beside the weights and carry nothing a text encoder needs (regexes, relative to
# the prefix). position_ids: arange(77), saved by transformers < 4.31; logit_scale: CLIP's contrastive
# temperature, present when a whole CLIPModel was exported.
CLIP_IGNORE = (r"^text_model\.embeddings\.position_ids$", r"^logit_scale$")

# SD3 uses CLIP-L's pooled output *unprojected*: Stability's reference ClipL does not apply its
# projection, diffusers' single-file loader overwrites it with torch.eye (single_file_utils.py,
# create_diffusers_clip_model_from_ldm) and its docstring says text_encoder's projection is the
# identity. So from a single file a CLIP-L `text_projection.weight`, if present, is consumed unused.
CLIP_L_SINGLE_FILE_IGNORE = CLIP_IGNORE + (r"^text_projection\.weight$",)

_T5_BLOCK = "encoder.block.{i}.layer"
# Token embedding rows are chosen by the loader: T5EncoderModel ties `shared.weight` and
# `encoder.embed_tokens.weight`, and files carry either (diffusers detects T5 in a single file by
# `shared.weight`; Stability's reference T5 only has `encoder.embed_tokens.weight`).
T5_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
T5_TABLE = identity_table((
    *(f"{_T5_BLOCK}.0.SelfAttention.{m}.weight" for m in ("q", "k", "v", "o")),
    f"{_T5_BLOCK}.0.SelfAttention.relative_attention_bias.weight",  # only block 0 has (and shares) it
    f"{_T5_BLOCK}.0.layer_norm.weight",  # RMSNorm scale, no bias anywhere in T5
    *(f"{_T5_BLOCK}.1.DenseReluDense.{m}.weight" for m in ("wi_0", "wi_1", "wo")),  # gated-GELU FF
    f"{_T5_BLOCK}.1.layer_norm.weight",
    "encoder.final_layer_norm.weight",
))
