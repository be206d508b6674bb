"""Memory budget of Flash distillation of SD3-medium at 1024^2, batch 2 per GPU, bf16 weights shared by teacher and
student (the adapters in fp32), with and without activation checkpointing: `python bench/bench_flash_step.py
--budget`.

Analytic, from counts that are measured here on the CPU: parameters of the real modules (meta device), and
the bytes autograd saves for backward per token and per joint block, measured with saved_tensors_hooks on
SD3-width blocks (bf16, flash attention: O(tokens) memory) at a small token count and scaled linearly to the
4,250 tokens of a 1024^2 image (4,096 image + 154 text). What is not counted: the CUDA context and kernels
(~0.5-1 GiB), the caching allocator's fragmentation (typically 5-15%).
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashsd3.config import SD3_MEDIUM, MMDiTConfig
from flashsd3.lora import add_lora, lora_disabled
from flashsd3.lora.checkpointing import checkpoint_blocks
from flashsd3.mmdit import MMDiT

GIB = 2**30
TEXT_TOKENS = 154  # 77 CLIP + 77 zero T5 tokens (the recipe's context, training/cache.py)


def param_counts() -> tuple[int, int]:
    """(base MMDiT parameters, flash-sd3 LoRA parameters) of SD3-medium, counted on the meta device."""
    with torch.device("meta"):
        model = MMDiT(SD3_MEDIUM)
        base = sum(p.numel() for p in model.parameters())
        add_lora(model, rank=64, alpha=8)
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return base, lora


def saved_bytes(depth: int, side: int, batch: int, lora_on: bool, checkpointing: bool = False) -> int:
    """Bytes autograd keeps for backward in one forward of an SD3-width MMDiT of `depth` blocks (bf16, random
    weights), latents side x side; student (adapters on, grads to them) or teacher (off, grads to the input)."""
    cfg = MMDiTConfig(**{**SD3_MEDIUM.__dict__, "depth": depth})
    torch.manual_seed(0)
    model = MMDiT(cfg).to(torch.bfloat16).requires_grad_(False)
    add_lora(model, rank=64, alpha=8)
    checkpoint_blocks(model, checkpointing)
    x = torch.randn(batch, 16, side, side, dtype=torch.bfloat16, requires_grad=not lora_on)
    ctx = torch.randn(batch, TEXT_TOKENS, 4096, dtype=torch.bfloat16)
    pooled = torch.randn(batch, 2048, dtype=torch.bfloat16)
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):  # weights saved for the input gradient exist anyway: count activations only
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    adapters = lora_disabled(model) if not lora_on else torch.enable_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(SDPBackend.FLASH_ATTENTION), \
            adapters:
        model(x, torch.full((batch,), 500.0), ctx, pooled)
    return sum(seen.values())


def decoder_saved_bytes_per_pixel(side: int = 8) -> tuple[float, int]:
    """(bytes autograd saves per output pixel when the SD3 VAE decoder runs with grad to its input, bf16;
    decoder parameters). Measured at a side x side latent (8 x side pixels), scaled by pixels by the caller."""
    from flashsd3.config import SD3_VAE
    from flashsd3.vae import Decoder

    torch.manual_seed(0)
    dec = Decoder(SD3_VAE).to(torch.bfloat16).requires_grad_(False)
    weights = {t.untyped_storage().data_ptr() for t in dec.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    z = torch.randn(1, SD3_VAE.latent_channels, side, side, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        dec(z)
    return sum(seen.values()) / (8 * side) ** 2, sum(p.numel() for p in dec.parameters())


def per_token_block_bytes(lora_on: bool, side: int = 16) -> float:
    """Saved bytes per token per joint block: (depth 3 - depth 2) / tokens, so embeddings and the final layer
    cancel. side 16: 64 image tokens + 154 text tokens, batch 1."""
    tokens = (side // 2) ** 2 + TEXT_TOKENS
    return (saved_bytes(3, side, 1, lora_on) - saved_bytes(2, side, 1, lora_on)) / tokens


def budget(resolution: int = 1024, batch: int = 2) -> dict[str, dict[str, float]]:
    """GiB per item, for checkpointing off and on."""
    base, lora = param_counts()
    tokens = (resolution // 16) ** 2 + TEXT_TOKENS  # latent /8, patch 2
    D, depth = SD3_MEDIUM.hidden_size, SD3_MEDIUM.depth
    s_blk, t_blk = per_token_block_bytes(True), per_token_block_bytes(False)
    block_in = (2 * tokens * D + D) * 2  # (ctx, x, vec) in bf16: what checkpointing keeps per block
    one_block_s, one_block_t = s_blk * tokens * batch, t_blk * tokens * batch
    fixed = {
        "base weights, bf16, shared by teacher and student": base * 2,
        "LoRA fp32: params + grads + AdamW m, v": lora * 4 * 4,
        "discriminator head fp32 (params, grads, AdamW), < 12M values": 12e6 * 4,
        "no-grad teacher CFG call (batch 2B): one block's transient activations, upper bound": 2 * one_block_t,
    }
    per_px, dec_params = decoder_saved_bytes_per_pixel()
    crop_px = 512 * 512  # the recipe's central 64 x 64 latent crop, decoded ([M] L385-411)
    vgg_values = 2 * (2 * 64 * 512**2 + 2 * 128 * 256**2 + 3 * 256 * 128**2 + 3 * 512 * 64**2 + 3 * 512 * 32**2)
    lpips = {  # only with distill_loss="lpips" (the released recipe); the target side runs without grad
        "LPIPS option: VAE decoder weights bf16": dec_params * 2,
        "LPIPS option: decoder graph of the student's crop (measured per pixel)": per_px * crop_px * batch,
        "LPIPS option: VGG-16 graph, fp32 (conv inputs + ReLU outputs at 512^2), weights": vgg_values * 4 * batch
        + 14.7e6 * 4,
    }
    rows = {}
    for ckpt in (False, True):
        graphs = {
            "student forward graph (adapters on)": (block_in * batch * depth if ckpt else one_block_s * depth),
            "GAN generator graph: teacher on fake x0, grads to the input": (block_in * batch * depth if ckpt
                                                                             else one_block_t * depth),
            "backward: one block recomputed, with its activation gradients": 2 * one_block_s if ckpt else 0.0,
        }
        items = {**fixed, **graphs, **lpips}
        rows["checkpointing" if ckpt else "no checkpointing"] = {k: v / GIB for k, v in items.items()}
    rows["_counts"] = {"base params": base, "lora params": lora, "tokens": tokens,
                       "student bytes/token/block": s_blk, "teacher bytes/token/block": t_blk}
    return rows


def budget_table(resolution: int = 1024, batch: int = 2) -> str:
    rows = budget(resolution, batch)
    counts = rows.pop("_counts")
    title = (f"Flash distillation of SD3-medium, {resolution}^2, batch {batch}, bf16 weights, fp32 adapters (base "
             f"{counts['base params'] / 1e9:.3f}B params, LoRA {counts['lora params'] / 1e6:.1f}M, {counts['tokens']} "
             f"tokens; saved bytes per token per block: student {counts['student bytes/token/block']:.0f}, "
             f"teacher {counts['teacher bytes/token/block']:.0f})")
    lines = [title, "", "| item | no checkpointing | checkpointing |", "|---|---:|---:|"]
    off, on = rows["no checkpointing"], rows["checkpointing"]
    for k in off:
        lines.append(f"| {k} | {off[k]:.2f} GiB | {on[k]:.2f} GiB |")
    l2 = {k: v for k, v in off.items() if not k.startswith("LPIPS")}, {k: v for k, v in on.items()
                                                                        if not k.startswith("LPIPS")}
    lines.append(f"| **total, L2 distillation** (+ ~1 GiB CUDA context, + allocator slack) | "
                 f"**{sum(l2[0].values()):.1f} GiB** | **{sum(l2[1].values()):.1f} GiB** |")
    lines.append(f"| **total, LPIPS distillation (the recipe)** | **{sum(off.values()):.1f} GiB** | "
                 f"**{sum(on.values()):.1f} GiB** |")
    return "\n".join(lines)
