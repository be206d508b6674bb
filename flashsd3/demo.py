"""The offline demo's random models: the MMDiT and VAE at toy width (configs DEMO, DEMO_VAE), toy-width
CLIP text encoders (real tokenizers, CLIP architecture) and a toy-width ControlNet. The same seed gives the same
weights everywhere: `flashsd3-sample --demo`, `FlashSD3Pipeline.demo` and `flashsd3-train --demo` share them."""
from __future__ import annotations

from .config import DEMO, DEMO_VAE, MMDiTConfig
from .rng import seeded


def demo_transformer_and_vae(seed: int = 0):
    """(MMDiT(DEMO), VAE(DEMO_VAE)) in eval mode, float32 on the CPU, initialised in that order from `seed`."""
    from .mmdit import MMDiT
    from .vae import VAE

    with seeded(seed):
        return MMDiT(DEMO).eval(), VAE(DEMO_VAE).eval()


def tiny_clip(base: str, hidden: int, seed: int):
    """SD3's CLIP config (configs/<base>.json) shrunk to `hidden` channels, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .text_encoders import CONFIG_DIR

    cfg = CLIPTextConfig.from_json_file(str(CONFIG_DIR / f"{base}.json"))
    cfg.hidden_size = cfg.projection_dim = hidden
    cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads = 2 * hidden, 2, 2
    with seeded(seed):
        return CLIPTextModelWithProjection(cfg).eval()


def demo_text_encoders(config: MMDiTConfig, seed: int = 0):
    """CLIP-L / CLIP-G stand-ins whose widths add up to the model's pooled_dim (2/3 and 1/3, as 768/1280
    do not), padded to its context_dim, with SD3's real tokenizers."""
    from .text_encoders import TextEncoders
    from .tokenizers import sd3_clip_tokenizers

    g_width = config.pooled_dim // 3
    tok_l, tok_g = sd3_clip_tokenizers()
    return TextEncoders(tok_l, tiny_clip("clip_l", config.pooled_dim - g_width, seed),
                        tok_g, tiny_clip("clip_g", g_width, seed + 1), context_dim=config.context_dim)


def demo_controlnet(transformer, seed: int = 0):
    """A toy-width ControlNet (DEMO_CONTROLNET) for the demo transformer, random weights. Not zero-initialised, so
    the control image visibly changes the (noise-like) output; drawn without touching the global RNG."""
    from .controlnet import DEMO_CONTROLNET, ControlNet

    with seeded(seed):
        cn = ControlNet(DEMO_CONTROLNET, transformer)
    return cn.to(transformer.device, transformer.dtype).eval()
