"""ControlNet configuration (a frozen dataclass) and presets.

Field names follow the MMDiT's (`flashsd3.config.MMDiTConfig`); the diffusers `SD3ControlNetModel`
config key is given where it differs, so a `config.json` maps onto this with `from_diffusers`.
"""
from __future__ import annotations

from dataclasses import dataclass

# How residual k of n lands on the transformer's joint blocks (see `ControlNetResiduals`).
RESIDUAL_RULES = ("diffusers", "stability")
# Stability's ControlNet files store their kind as an int32 tensor `control_type`
# (Stability-AI/sd3.5 dit_embedder.py ControlNetEmbedder.__init__: "blur = 0, canny = 1, depth = 2").
CONTROL_TYPES = ("blur", "canny", "depth")


@dataclass(frozen=True)
class ControlNetConfig:
    """An SD3 / SD3.5 ControlNet. Defaults are InstantX's SD3-medium ControlNets (their config.json)."""

    depth: int = 6  # ControlNet blocks (num_layers), each with a zero-initialised output projection
    num_heads: int = 24  # num_attention_heads; the width must equal the transformer's
    head_dim: int = 64  # attention_head_dim
    patch_size: int = 2
    in_channels: int = 16  # latent channels of the control image
    extra_channels: int = 0  # extra_conditioning_channels: the inpainting ControlNet's mask channel
    context_dim: int | None = 4096  # joint_attention_dim; None: image-only blocks, no text stream (SD3.5 8B)
    pooled_dim: int = 2048  # pooled_projection_dim
    pos_embed_max_size: int | None = 192  # own patch embedding + sin-cos table; None: the transformer's
    sample_size: int = 128  # the sin-cos table's base grid, as the MMDiT's
    mlp_ratio: float = 4.0
    qk_norm: str | None = None  # joint blocks only, as the MMDiT's
    dual_attention_layers: tuple[int, ...] = ()  # joint blocks only
    zero_pooled: bool = True  # force_zeros_for_pooled_projection: InstantX's ControlNets see zero pooled text
    residual_rule: str = "diffusers"  # "stability" for Stability's single files (see ControlNetResiduals)
    control_type: str | None = None  # Stability files: blur / canny / depth; sets the control pixels' convention

    def __post_init__(self):
        if self.depth < 1 or self.num_heads < 1 or self.head_dim < 1 or self.patch_size < 1 or self.in_channels < 1:
            raise ValueError(f"depth/heads/head_dim/patch_size/in_channels must be positive: {self}")
        if self.extra_channels < 0:
            raise ValueError(f"extra_channels must be >= 0, got {self.extra_channels}")
        if self.residual_rule not in RESIDUAL_RULES:
            raise ValueError(f"residual_rule must be one of {RESIDUAL_RULES}, got {self.residual_rule!r}")
        if self.control_type not in (None, *CONTROL_TYPES):
            raise ValueError(f"control_type must be None or one of {CONTROL_TYPES}, got {self.control_type!r}")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
        if not self.joint and (self.qk_norm or self.dual_attention_layers):
            raise ValueError("qk_norm and dual_attention_layers apply to joint blocks only: this ControlNet has "
                             "image-only blocks (context_dim None)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside blocks 0..{self.depth - 1}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def joint(self) -> bool:
        """Joint blocks with a text stream (SD3 ControlNets) rather than image-only blocks."""
        return self.context_dim is not None

    @property
    def own_embedding(self) -> bool:
        """Its own patch embedding and position table; else it reuses the transformer's (use_pos_embed=False)."""
        return self.pos_embed_max_size is not None

    @property
    def control_channels(self) -> int:
        return self.in_channels + self.extra_channels

    @classmethod
    def from_diffusers(cls, cfg: dict) -> ControlNetConfig:
        """Build from a diffusers `SD3ControlNetModel` config.json dict."""
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        joint = cfg.get("joint_attention_dim", 4096)
        if joint is not None and cfg.get("caption_projection_dim", hidden) != hidden:
            raise ValueError(f"caption_projection_dim {cfg['caption_projection_dim']} != heads*head_dim {hidden}: "
                             "the joint blocks need text and image streams of equal width")
        own = cfg.get("use_pos_embed", True)
        if own and (cfg.get("pos_embed_type", "sincos") != "sincos" or cfg.get("pos_embed_max_size", 96) is None):
            raise ValueError("a patch embedding without a cropped sin-cos table (pos_embed_type "
                             f"{cfg.get('pos_embed_type')!r}, pos_embed_max_size {cfg.get('pos_embed_max_size')!r}) "
                             "is not an SD3 layout")
        return cls(
            depth=cfg["num_layers"], num_heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
            patch_size=cfg.get("patch_size", 2), in_channels=cfg.get("in_channels", 16),
            extra_channels=cfg.get("extra_conditioning_channels", 0), context_dim=joint,
            pooled_dim=cfg.get("pooled_projection_dim", 2048),
            pos_embed_max_size=cfg.get("pos_embed_max_size", 96) if own else None,
            sample_size=cfg.get("sample_size", 128), qk_norm=cfg.get("qk_norm"),
            dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
            zero_pooled=cfg.get("force_zeros_for_pooled_projection", True),
        )

    def to_diffusers(self) -> dict:
        """The equivalent diffusers config dict (tests build the reference model from it)."""
        if self.residual_rule != "diffusers":
            raise ValueError("diffusers' SD3ControlNetModel adds residuals by its own rule; this config uses "
                             f"{self.residual_rule!r}")
        return dict(
            sample_size=self.sample_size, patch_size=self.patch_size, in_channels=self.in_channels,
            num_layers=self.depth, attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_dim, caption_projection_dim=self.hidden_size,
            pooled_projection_dim=self.pooled_dim, out_channels=self.in_channels,
            pos_embed_max_size=self.pos_embed_max_size, extra_conditioning_channels=self.extra_channels,
            dual_attention_layers=self.dual_attention_layers, qk_norm=self.qk_norm,
            pos_embed_type="sincos" if self.own_embedding else None, use_pos_embed=self.own_embedding,
            force_zeros_for_pooled_projection=self.zero_pooled,
        )


# Presets: the published ControlNets (inferred configs are compared with these, without control_type).
# InstantX/SD3-Controlnet-{Canny,Pose,Tile}: config.json (6 layers; 1.19 GB fp16 files).
INSTANTX_SD3 = ControlNetConfig()
# alimama-creative/SD3-Controlnet-Inpainting: config.json (23 layers, 1 extra channel: the mask; 4.16 GB fp16).
ALIMAMA_SD3_INPAINT = ControlNetConfig(depth=23, extra_channels=1)
# stabilityai/stable-diffusion-3.5-controlnets (blur, canny, depth) for SD3.5-large: 19 image-only blocks at
# its width (Stability-AI/sd3.5 sd3_impls.py BaseModel: hidden 64 * 38), the transformer's patch embedding.
SD35_LARGE_STABILITY = ControlNetConfig(depth=19, num_heads=38, context_dim=None, pos_embed_max_size=None,
                                        zero_pooled=False, residual_rule="stability")
CONTROLNET_PRESETS = {"instantx-sd3": INSTANTX_SD3, "alimama-sd3-inpaint": ALIMAMA_SD3_INPAINT,
                      "sd3.5-large-stability": SD35_LARGE_STABILITY}

# The offline demo's ControlNet: one joint block at flashsd3.config.DEMO's width.
DEMO_CONTROLNET = ControlNetConfig(depth=1, num_heads=2, head_dim=8, in_channels=4, context_dim=32, pooled_dim=24,
                                   pos_embed_max_size=64, sample_size=32)
