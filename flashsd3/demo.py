"""Random toy-width text encoders (real tokenizers, CLIP architecture) and ControlNet for the offline demo."""
from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from .config import MMDiTConfig
from .text_encoders import CONFIG_DIR, TextEncoders
from .tokenizers import sd3_clip_tokenizers


def tiny_clip(base: str, hidden: int, seed: int) -> CLIPTextModelWithProjection:
    """SD3's CLIP config (configs/<base>.json) shrunk to `hidden` channels, random weights."""
    cfg = CLIPTextConfig.from_json_file(str(CONFIG_DIR / f"{base}.json"))
    cfg.hidden_size = cfg.projection_dim = hidden
    cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads = 2 * hidden, 2, 2
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg).eval()


def demo_text_encoders(config: MMDiTConfig, seed: int = 0) -> TextEncoders:
    """CLIP-L / CLIP-G stand-ins whose widths add up to the model's pooled_dim (2/3 and 1/3, as 768/1280
    do not), padded to its context_dim, with SD3's real tokenizers."""
    g_width = config.pooled_dim // 3
    tok_l, tok_g = sd3_clip_tokenizers()
    return TextEncoders(tok_l, tiny_clip("clip_l", config.pooled_dim - g_width, seed),
                        tok_g, tiny_clip("clip_g", g_width, seed + 1), context_dim=config.context_dim)


def demo_controlnet(transformer, seed: int = 0):
    """A toy-width ControlNet (DEMO_CONTROLNET) for the demo transformer, random weights. Not zero-initialised, so
    the control image visibly changes the (noise-like) output; drawn without touching the global RNG."""
    from .controlnet import DEMO_CONTROLNET, ControlNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cn = ControlNet(DEMO_CONTROLNET, transformer)
    return cn.to(transformer.device, transformer.dtype).eval()
