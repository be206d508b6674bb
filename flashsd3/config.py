"""Model configurations as frozen dataclasses, with presets.

Field names follow SD3 vocabulary; the diffusers config key is given where it differs, so a
`config.json` maps onto these with one small function (`MMDiTConfig.from_diffusers`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class MMDiTConfig:
    """The SD3 MMDiT transformer. Defaults are SD3-medium (transformer/config.json)."""

    depth: int = 24  # joint blocks (num_layers); SD3 uses hidden = 64 * depth, heads = depth
    num_heads: int = 24  # attention heads (num_attention_heads)
    head_dim: int = 64  # channels per head (attention_head_dim)
    patch_size: int = 2  # latent pixels per token side
    in_channels: int = 16  # latent channels (VAE latent_channels)
    out_channels: int = 16  # velocity channels
    context_dim: int = 4096  # text token features in (joint_attention_dim): CLIP-L+G padded, or T5
    pooled_dim: int = 2048  # pooled text features (pooled_projection_dim): CLIP-L 768 + CLIP-G 1280
    pos_embed_max_size: int = 192  # side of the stored sin-cos table, in tokens (192 -> 384x384 latents)
    sample_size: int = 128  # default latent side; sets the sin-cos table's base grid (diffusers sample_size)
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * hidden_size
    qk_norm: str | None = None  # None (SD3) or "rms_norm" (SD3.5), per-head norm of q and k
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 MMDiT-X blocks with a second image self-attention

    def __post_init__(self):
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth - 1]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside blocks 0..{self.depth - 2}")
        if self.depth < 1 or self.num_heads < 1 or self.head_dim < 1 or self.patch_size < 1:
            raise ValueError(f"depth/heads/head_dim/patch_size must be positive: {self}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:  # values one output token unpatchifies into
        return self.patch_size * self.patch_size * self.out_channels

    @classmethod
    def from_diffusers(cls, cfg: dict) -> MMDiTConfig:
        """Build from a diffusers `SD3Transformer2DModel` config.json dict."""
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        if cfg.get("caption_projection_dim", hidden) != hidden:
            raise ValueError(
                f"caption_projection_dim {cfg['caption_projection_dim']} != heads*head_dim {hidden}: "
                "SD3 requires text and image streams of equal width"
            )
        return cls(
            depth=cfg["num_layers"],
            num_heads=cfg["num_attention_heads"],
            head_dim=cfg["attention_head_dim"],
            patch_size=cfg["patch_size"],
            in_channels=cfg["in_channels"],
            out_channels=cfg.get("out_channels") or cfg["in_channels"],
            context_dim=cfg["joint_attention_dim"],
            pooled_dim=cfg["pooled_projection_dim"],
            pos_embed_max_size=cfg["pos_embed_max_size"],
            sample_size=cfg.get("sample_size", 128),
            qk_norm=cfg.get("qk_norm"),
            dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
        )

    def to_diffusers(self) -> dict:
        """The equivalent diffusers config dict (used by tests and by save helpers)."""
        return dict(
            sample_size=self.sample_size,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            num_layers=self.depth,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_dim,
            caption_projection_dim=self.hidden_size,
            pooled_projection_dim=self.pooled_dim,
            out_channels=self.out_channels,
            pos_embed_max_size=self.pos_embed_max_size,
            qk_norm=self.qk_norm,
            dual_attention_layers=self.dual_attention_layers,
        )


@dataclass(frozen=True)
class VAEConfig:
    """The SD3 AutoencoderKL. Defaults are SD3's vae/config.json."""

    in_channels: int = 3  # image channels
    out_channels: int = 3
    latent_channels: int = 16  # z channels
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder order; decoder reverses
    layers_per_block: int = 2  # resnets per encoder block; the decoder has one more
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305  # vae/config.json; latents = (z - shift) * scale
    shift_factor: float = 0.0609  # vae/config.json
    mid_block_add_attention: bool = True  # diffusers default; not in SD3's config

    @classmethod
    def from_diffusers(cls, cfg: dict) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        if cfg.get("use_quant_conv") or cfg.get("use_post_quant_conv"):
            raise ValueError("SD3 VAE has no quant_conv/post_quant_conv; this config asks for them")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in known}
        return cls(**kw)


@dataclass(frozen=True)
class AdapterConfig:
    """A LoRA adapter's shape in PEFT's terms (adapter_config.json): W += (alpha / rank) * B @ A."""

    rank: int  # r
    alpha: float  # lora_alpha
    target_modules: tuple[str, ...]  # PEFT suffix match on diffusers module names (lora/formats.py peft_selects)


# Presets -------------------------------------------------------------------------------------

SD3_MEDIUM = MMDiTConfig()
SD35_MEDIUM = MMDiTConfig(pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
SD35_LARGE = MMDiTConfig(depth=38, num_heads=38, pos_embed_max_size=192, qk_norm="rms_norm")
# Tests and the offline demo: same architecture, a few thousand parameters per block.
TINY = MMDiTConfig(
    depth=2, num_heads=2, head_dim=8, patch_size=2, in_channels=4, out_channels=4,
    context_dim=32, pooled_dim=24, pos_embed_max_size=16, sample_size=8,
)
MMDIT_PRESETS = {"sd3-medium": SD3_MEDIUM, "sd3.5-medium": SD35_MEDIUM, "sd3.5-large": SD35_LARGE}

SD3_VAE = VAEConfig()
TINY_VAE = VAEConfig(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)

# The offline demo (`sample.py --demo`): the real architecture at toy width, random weights. A VAE
# with 4 levels (8x downscale) and a 64-token table keep real image sizes valid up to 1024 px.
DEMO = MMDiTConfig(
    depth=2, num_heads=2, head_dim=8, patch_size=2, in_channels=4, out_channels=4,
    context_dim=32, pooled_dim=24, pos_embed_max_size=64, sample_size=32,
)
DEMO_VAE = VAEConfig(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)

# The published Flash SD3 adapter (hub.FLASH_SD3_LORA_REPO, its adapter_config.json): rank 64, alpha 8
# (scale 0.125); on SD3-medium the targets select 222 layers, 87,646,208 LoRA values.
FLASH_SD3_ADAPTER = AdapterConfig(
    rank=64, alpha=8,
    target_modules=("proj", "linear_1", "to_k", "proj_out", "linear_2", "to_out.0", "ff.net.2", "proj_in", "to_v",
                    "to_q", "linear", "ff.net.0.proj"),
)
