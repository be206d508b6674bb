"""Test helpers: random diffusers SD3ControlNetModels, and Stability's SD3.5 ControlNet written out in float64.

    ref = random_diffusers_controlnet(cfg, transformer=ref_transformer)  # diffusers' model, every weight random
    ours = controlnet_from_state_dict(ref.state_dict(), cfg, transformer=our_mmdit)
    run_diffusers(ref, ref_transformer, lat, t, ctx, pooled, control)   # as StableDiffusion3ControlNetPipeline calls

`stability_residuals` is an independent float64 reading of Stability-AI/sd3.5 (commit fbf8f48) `dit_embedder.py`
ControlNetEmbedder.forward (lines 70-106, the 8B path) with `mmditx.py` DismantledBlock.forward (lines 578-588,
pre_attention 485-507, post_attention 509-515) and other_impls.py `attention` (lines 17-25); `stability_mmdit`
runs diffusers' transformer blocks with the residual rule of mmditx.py MMDiTX.forward_core_with_concat
(lines 874-882). The sd3.5 repository is not a package, so it cannot be imported by the tests.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashsd3.controlnet import ControlNetConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run single-threaded (import this fixture into a test module): a second thread gains nothing at
    these sizes and, spinning on a busy machine, quadrupled the CPU time of tests/test_pipeline_controlnet.py."""
    torch.set_num_threads(1)


def randomize(module, seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def random_diffusers_controlnet(cfg: ControlNetConfig, transformer=None, dtype=torch.float64, seed: int = 10):
    """diffusers SD3ControlNetModel at `cfg`, every weight random (its zero-initialised projections would hide
    mistakes). Without its own patch embedding it gets the transformer's, as the diffusers pipeline does."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    ref = SD3ControlNetModel(**cfg.to_diffusers()).to(dtype).eval()
    randomize(ref, seed)
    if not cfg.own_embedding:  # StableDiffusion3ControlNetPipeline.__init__ gives it a copy of the transformer's;
        # shared here: diffusers' copy (_get_pos_embed_from_transformer) is built in float32, which would round a
        # float64 transformer's table and patch weights to float32 (2e-8 relative) in the reference
        ref.pos_embed = transformer.pos_embed
    return ref


def save_diffusers_folder(cn, folder) -> None:
    """`cn` (a flashsd3 ControlNet) as a diffusers folder: config.json + diffusion_pytorch_model.safetensors."""
    import json

    from safetensors.torch import save_file

    from flashsd3.controlnet import to_diffusers_state_dict

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cn.config.to_diffusers()))
    save_file({k: v.contiguous() for k, v in to_diffusers_state_dict(cn).items()},
              folder / "diffusion_pytorch_model.safetensors")


def run_diffusers(ref_cn, ref_tr, lat, t, ctx, pooled, control, scale=1.0):
    """(controlnet_block_samples, velocity) as the diffusers pipeline computes them (zero pooled text for
    force_zeros_for_pooled_projection, no text for an image-only ControlNet)."""
    c = ref_cn.config if not hasattr(ref_cn, "nets") else ref_cn.nets[0].config
    with torch.no_grad():
        samples = ref_cn(hidden_states=lat, controlnet_cond=control, conditioning_scale=scale,
                         encoder_hidden_states=ctx if c.joint_attention_dim is not None else None,
                         pooled_projections=torch.zeros_like(pooled) if c.force_zeros_for_pooled_projection else pooled,
                         timestep=t, return_dict=False)[0]
        out = ref_tr(hidden_states=lat, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                     block_controlnet_hidden_states=samples).sample
    return samples, out


def random_stability_state_dict(cfg: ControlNetConfig, seed: int = 20, control_type: int = 1) -> dict:
    """A Stability-layout ControlNet file's tensors (tests/fixtures/controlnet_sd35_large_stability_keys.tsv's
    names) at `cfg`'s size, random, with its ignored tensors (own x_embedder, position table, control_type)."""
    D, C, p = cfg.hidden_size, cfg.in_channels, cfg.patch_size
    shapes = {"pos_embed.proj.weight": (D, C, p, p), "pos_embed.proj.bias": (D,), "pos_embed.pos_embed": (1, 16, D),
              "pos_embed_input.proj.weight": (D, C, p, p), "pos_embed_input.proj.bias": (D,)}
    for name, fan_in in (("timestep_embedder", 256), ("text_embedder", cfg.pooled_dim)):
        e = f"time_text_embed.{name}"
        shapes |= {f"{e}.linear_1.weight": (D, fan_in), f"{e}.linear_1.bias": (D,),
                   f"{e}.linear_2.weight": (D, D), f"{e}.linear_2.bias": (D,)}
    for i in range(cfg.depth):
        b = f"transformer_blocks.{i}"
        for name, rows in (("adaLN_modulation.1", 6 * D), ("attn.qkv", 3 * D), ("attn.proj", D), ("mlp.fc1", 4 * D)):
            shapes |= {f"{b}.{name}.weight": (rows, D), f"{b}.{name}.bias": (rows,)}
        shapes |= {f"{b}.mlp.fc2.weight": (D, 4 * D), f"{b}.mlp.fc2.bias": (D,),
                   f"controlnet_blocks.{i}.weight": (D, D), f"controlnet_blocks.{i}.bias": (D,)}
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g, dtype=torch.float64) * 0.3 for k, s in shapes.items()}
    sd["control_type"] = torch.tensor([control_type], dtype=torch.int32)
    return sd


def _mlp_embed(sd, prefix, x):  # mmditx.py TimestepEmbedder / VectorEmbedder: Linear, SiLU, Linear
    h = F.silu(F.linear(x, sd[f"{prefix}.linear_1.weight"], sd[f"{prefix}.linear_1.bias"]))
    return F.linear(h, sd[f"{prefix}.linear_2.weight"], sd[f"{prefix}.linear_2.bias"])


def _timestep_embedding(t, dim=256):  # mmditx.py TimestepEmbedder.timestep_embedding: float32 [cos | sin]
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _dismantled_block(sd, prefix, x, c, heads):
    """mmditx.py DismantledBlock.forward without attn2: adaLN (shift, scale, gate) x (msa, mlp), explicit softmax."""
    B, N, D = x.shape
    mods = F.linear(F.silu(c), sd[f"{prefix}.adaLN_modulation.1.weight"], sd[f"{prefix}.adaLN_modulation.1.bias"])
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)
    h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    qkv = F.linear(h, sd[f"{prefix}.attn.qkv.weight"], sd[f"{prefix}.attn.qkv.bias"])
    q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # split_qkv: (3, heads, head_dim)
    probs = (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).softmax(-1)
    attn = (probs @ v).transpose(1, 2).reshape(B, N, D)
    x = x + gate_msa[:, None] * F.linear(attn, sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"])
    h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    h = F.gelu(F.linear(h, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"]), approximate="tanh")
    return x + gate_mlp[:, None] * F.linear(h, sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])


def stability_residuals(sd, depth, heads, x_tokens, t, y, control, scale=1.0):
    """ControlNetEmbedder.forward, 8B path: x_tokens = the transformer's x_embedder + cropped_pos_embed of the
    latents (sd3_impls.py BaseModel.apply_model, line 168), t = 1000 sigma, y the pooled text (no zeros)."""
    x = x_tokens
    c = _mlp_embed(sd, "time_text_embed.timestep_embedder", _timestep_embedding(t).to(x.dtype))
    c = c + _mlp_embed(sd, "time_text_embed.text_embedder", y)
    p = sd["pos_embed_input.proj.weight"].shape[-1]
    cond = F.conv2d(control, sd["pos_embed_input.proj.weight"], sd["pos_embed_input.proj.bias"], stride=p)
    x = x + cond.flatten(2).transpose(1, 2)
    out = []
    for i in range(depth):
        x = _dismantled_block(sd, f"transformer_blocks.{i}", x, c, heads)  # using_8b_controlnet: x = out
        out.append(F.linear(x, sd[f"controlnet_blocks.{i}.weight"], sd[f"controlnet_blocks.{i}.bias"]) * scale)
    return out


def stability_mmdit(ref_tr, lat, t, ctx, pooled, residuals):
    """diffusers' SD3Transformer2DModel blocks with MMDiTX.forward_core_with_concat's residual rule: after every
    block i (the last included), residuals[i // (depth // n)]."""
    blocks = ref_tr.transformer_blocks
    interval = len(blocks) // len(residuals)
    with torch.no_grad():
        x = ref_tr.pos_embed(lat)
        temb = ref_tr.time_text_embed(t, pooled)
        enc = ref_tr.context_embedder(ctx)
        for i, block in enumerate(blocks):
            enc, x = block(hidden_states=x, encoder_hidden_states=enc, temb=temb)
            x = x + residuals[i // interval]
        x = ref_tr.proj_out(ref_tr.norm_out(x, temb))
    p, (H, W) = ref_tr.config.patch_size, lat.shape[-2:]
    x = x.reshape(x.shape[0], H // p, W // p, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], -1, H, W)
