"""Key tables for ControlNets (data only). Our names: the MMDiT's for embeddings and joint blocks, Stability's
ControlNetEmbedder names for image-only blocks (Stability-AI/sd3.5 `dit_embedder.py`, DismantledBlock).

Layouts:
  diffusers   `SD3ControlNetModel` (models/controlnets/controlnet_sd3.py): InstantX's SD3 ControlNets, alimama's
              inpainting ControlNet, SD3.5 ControlNets converted by diffusers'
              scripts/convert_sd3_controlnet_to_diffusers.py
  stability   the single files of stabilityai/stable-diffusion-3.5-controlnets as `sd3_infer.py --controlnet_ckpt`
              loads them: ControlNetEmbedder's own names, except the embedders, which keep diffusers' names and
              are renamed by sd3_infer.py CONTROLNET_MAP.
"""
from __future__ import annotations

from . import mmdit as km
from .rules import Layout, Rule, fuse_qkv

_WB = ("weight", "bias")
_T = "transformer_blocks.{i}"

# Tensors both layouts store under our names.
_SHARED = ("controlnet_blocks.{i}", "pos_embed_input.proj")

# diffusers SD3SingleTransformerBlock -> our ImageBlock (the image stream of a joint block, alone)
_DIFFUSERS_IMAGE_BLOCK = [
    (f"{_T}.adaLN_modulation.1", (f"{_T}.norm1.linear",)),  # AdaLayerNormZero: (shift, scale, gate) x (attn, mlp)
    (f"{_T}.attn.qkv", (f"{_T}.attn.to_q", f"{_T}.attn.to_k", f"{_T}.attn.to_v"), fuse_qkv),
    (f"{_T}.attn.proj", (f"{_T}.attn.to_out.0",)),
    (f"{_T}.mlp.fc1", (f"{_T}.ff.net.0.proj",)),
    (f"{_T}.mlp.fc2", (f"{_T}.ff.net.2",)),
]

# Joint blocks and the embeddings (x_embedder, pos_embed, t/y_embedder, context_embedder) have the MMDiT's names,
# so the MMDiT's diffusers rows cover them; no ControlNet block is pre-only, so none needs its swapped row.
DIFFUSERS: tuple[Rule, ...] = km.DIFFUSERS + tuple(
    Rule(f"{ours}.{wb}", tuple(f"{s}.{wb}" for s in srcs), *tf) for ours, srcs, *tf in _DIFFUSERS_IMAGE_BLOCK
    for wb in _WB
) + tuple(Rule(f"{k}.{wb}", (f"{k}.{wb}",)) for k in _SHARED for wb in _WB)

# sd3_infer.py CONTROLNET_MAP: the file keeps diffusers' embedder names
_STABILITY_RENAMED = [
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
]
_STABILITY_AS_IS = _SHARED + tuple(f"{_T}.{m}" for m in ("adaLN_modulation.1", "attn.qkv", "attn.proj", "mlp.fc1",
                                                          "mlp.fc2"))
STABILITY: tuple[Rule, ...] = tuple(
    Rule(f"{ours}.{wb}", (f"{src}.{wb}",)) for ours, src in _STABILITY_RENAMED for wb in _WB
) + tuple(Rule(f"{k}.{wb}", (f"{k}.{wb}",)) for k in _STABILITY_AS_IS for wb in _WB)

# Keys of Stability's files that carry nothing to load, each with its reason (regexes):
STABILITY_IGNORE = (
    # ControlNetEmbedder's own x_embedder (CONTROLNET_MAP: pos_embed.proj -> x_embedder.proj): the 8B ControlNets
    # embed with the transformer's x_embedder instead (sd3_impls.py BaseModel.apply_model, dit_embedder.py forward)
    r"^pos_embed\.proj\.(weight|bias)$",
    # a 64 x 64 position table that ControlNetEmbedder has no module for (sd3_infer.py load_into skips such keys);
    # inferred, not seen: it makes the published 8.65 GB where the tensors used make 8.61 GB (tests/fixtures/README)
    r"^pos_embed\.pos_embed$",
    r"^control_type$",  # blur = 0, canny = 1, depth = 2: read into the config (control_type)
)
CONTROL_TYPE_KEY = "control_type"

LAYOUTS = (
    Layout("stability", "", ("transformer_blocks.0.attn.qkv.",)),
    Layout("diffusers", "", ("controlnet_blocks.",)),
)

# Where each config field is read from when there is no config.json (`loading.infer_config`), per layout.
PROBES = {
    "diffusers": dict(control="pos_embed_input.proj.weight", patch="pos_embed.proj.weight", pos="pos_embed.pos_embed",
                      context="context_embedder.weight", pooled="time_text_embed.text_embedder.linear_1.weight",
                      qk="transformer_blocks.0.attn.norm_q.weight", block=r"controlnet_blocks\.(\d+)\.weight$",
                      dual=r"transformer_blocks\.(\d+)\.attn2\.to_q\.weight$",
                      fc1="transformer_blocks.0.ff.net.0.proj.weight"),
    "stability": dict(control="pos_embed_input.proj.weight", pooled="time_text_embed.text_embedder.linear_1.weight",
                      block=r"controlnet_blocks\.(\d+)\.weight$", fc1="transformer_blocks.0.mlp.fc1.weight"),
}
