#!/usr/bin/env python
"""flashsd3 vs diffusers (+ peft), side by side in one process, on identical random weights.

    python bench/benchmark.py                                   # GPU: fp16, depth 24, 1024 px, batch 1
    python bench/benchmark.py --dtype bf16 --batch 1 4 8 --compile --out bench/gpu_bf16.md
    python bench/benchmark.py --device cpu                      # fp32, 2 threads, depth 2, 512 px

Both implementations get the same random SD3-medium-width weights (depth selectable) and the same
Flash-shaped LoRA (published rank, alpha and targets; random values), saved by peft and loaded by ours.
Variants: diffusers + peft unmerged (the model card's recipe; peft keeps the adapters in fp32),
diffusers with the adapter merged (peft merge_and_unload), ours merged; `--compile` adds
torch.compile'd merged variants. Phases: one transformer forward, VAE decode, CLIP text encoding,
and the whole pipeline (text -> `--steps` Flash steps -> decode). Agreement is printed before
timing; timing interleaves the variants run by run (so a noisy machine slows them alike), uses CUDA
events on GPU, excludes warm-up, and reports median / min / max. See bench/README.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
import flops as F  # noqa: E402  (bench/flops.py, beside this file)

from flashsd3 import VAE, FlashSD3Pipeline, MMDiT, TextEncoders, load_lora, merge_lora  # noqa: E402
from flashsd3.config import FLASH_SD3_ADAPTER, SD3_MEDIUM, SD3_VAE  # noqa: E402
from flashsd3.mmdit import from_diffusers_state_dict  # noqa: E402
from flashsd3.text_encoders import CONFIG_DIR  # noqa: E402
from flashsd3.tokenizers import sd3_clip_tokenizers  # noqa: E402

# stabilityai/stable-diffusion-3-medium-diffusers vae/config.json (architecture fields)
SD3_VAE_DIFFUSERS = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
)
CTX_TOKENS = 154  # 77 CLIP tokens + 77 zero "T5" tokens: text_encoder_3=None, max_sequence_length=77 (Flash recipe)
TIMESTEP = 857.6923  # 1000 * sigma of the 2nd of 4 Flash steps (shift 3)
PROMPT = "a raccoon reading a book in a lush forest, golden hour"
GAIN, BIAS_STD = 1.0, 0.02  # random weights: std GAIN / sqrt(fan_in) (see materialize)
LORA_B_STD = 0.05  # A: std 1 / sqrt(fan_in); then 0.125 * B @ A is ~10% of W, elementwise
CLIP_CONFIGS = [CLIPTextConfig.from_json_file(str(CONFIG_DIR / f"{n}.json")) for n in ("clip_l", "clip_g")]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# Random weights ------------------------------------------------------------------------------------

def materialize(model: torch.nn.Module, device, seed: int, buffers: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A meta-built model -> real memory on `device` with random parameters; buffers set from `buffers`,
    which must name every buffer (so a new one cannot slip by uninitialised).

    Weights: std GAIN / sqrt(fan_in) (LeCun), so the random network is well conditioned: every block
    changes the residual stream (adaLN gates ~0.4) and at depth 24 activations stay below ~10, safe in
    fp16; a flat std 0.02 amplified fp32 rounding differences ~1000x over two blocks. Biases std 0.02,
    norm scales 1 +- 0.02. Uniform, not normal: twice as fast on a CPU (CLIP-G has 0.7 G values)."""
    names = {n for n, _ in model.named_buffers()}
    if names != set(buffers):
        raise RuntimeError(f"{type(model).__name__}: buffers {sorted(names)} but values given for {sorted(buffers)}")
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = GAIN / p[0].numel() ** 0.5 if p.dim() > 1 else BIAS_STD  # p[0]: one output's inputs
            p.uniform_(-std * 3**0.5, std * 3**0.5, generator=gen)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):  # not diffusers' norm1.linear
                p.add_(1.0)
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    return model.eval().requires_grad_(False)


def diffusers_transformer(cfg, device, seed: int):
    from diffusers import SD3Transformer2DModel
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg.to_diffusers())
    pe = model.pos_embed  # the position table diffusers builds in __init__ (meta here): rebuild it
    table = get_2d_sincos_pos_embed(cfg.hidden_size, cfg.pos_embed_max_size, base_size=pe.base_size,
                                    interpolation_scale=pe.interpolation_scale, output_type="pt")
    return materialize(model, device, seed, {"pos_embed.pos_embed": table.float().unsqueeze(0)})


def ours_from_diffusers(ref, cfg) -> MMDiT:
    """Our MMDiT with the reference's weights, converted through our key table (copies, no sharing)."""
    return from_diffusers_state_dict(ref.state_dict(), cfg).requires_grad_(False)


def flash_adapter(peft_model, seed: int, folder: str) -> None:
    """Give the freshly injected adapter (B = 0) random A and B, and save it in PEFT format."""
    gen = torch.Generator(peft_model.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                std = 1 / p[0].numel() ** 0.5 if "lora_A" in name else LORA_B_STD
                p.normal_(0.0, std, generator=gen)
    peft_model.save_pretrained(folder)


def vae_pair(device, dtype, seed: int):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ref = AutoencoderKL(**SD3_VAE_DIFFUSERS)
        ours = VAE(SD3_VAE)
    materialize(ref, device, seed, {})
    ours.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
    return ref, ours.eval().requires_grad_(False)  # both still float32


def clip(name: str, device, dtype, seed: int):
    cfg = CLIP_CONFIGS[("clip_l", "clip_g").index(name)]  # SD3-medium text_encoder{,_2}/config.json
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(cfg)
    positions = torch.arange(cfg.max_position_embeddings)[None]
    return materialize(model, device, seed, {"text_model.embeddings.position_ids": positions}).to(dtype)


# Timing ------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    fn: Callable[[], object]
    weights: int  # bytes of the weights this variant keeps resident
    roles: tuple[str, ...] = ()  # "card" / "merged": the baselines ratios are taken against
    compiled: bool = False
    ours: bool = False


@dataclass
class Row:
    phase: str
    batch: int
    variant: Variant
    ms: list[float]
    peak: int | None  # bytes: weights + the call's allocation peak (CUDA only)
    flops: int
    median: float = field(init=False)

    def __post_init__(self):
        self.median = statistics.median(self.ms)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(fn, device) -> tuple[float, int | None]:
    """(milliseconds, peak bytes allocated above what was allocated before the call)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), torch.cuda.max_memory_allocated() - before


def measure(phase, batch, variants, flop_count, args) -> list[Row]:
    """Warm each variant, then `runs` rounds; each round runs every variant once, starting one later."""
    for v in variants:
        for _ in range(args.warmup):
            v.fn()
    sync(args.device)
    ms = {v.name: [] for v in variants}
    peak = {v.name: None for v in variants}
    for r in range(args.runs):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            t, p = run_once(v.fn, args.device)
            ms[v.name].append(t)
            if p is not None:
                peak[v.name] = max(peak[v.name] or 0, p + v.weights)
    rows = [Row(phase, batch, v, ms[v.name], peak[v.name], flop_count) for v in variants]
    for row in rows:
        print(f"  {phase:11s} b{batch} {row.variant.name:34s} median {row.median:9.2f} ms "
              f"(min {min(row.ms):.2f}, max {max(row.ms):.2f})", flush=True)
    return rows


def matmul_rate(args) -> tuple[float, float]:
    """(best, median) FLOP/s of a large square matmul in the benchmark dtype over max(runs, 5) runs.
    The floor uses the best: a floor must not exceed what the hardware has shown it can do."""
    n = 8192 if args.device.type == "cuda" else 2048
    gen = torch.Generator(args.device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, device=args.device).to(args.dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = [run_once(lambda: a @ b, args.device)[0] / 1e3 for _ in range(max(args.runs, 5))]
    return 2 * n**3 / min(times), 2 * n**3 / statistics.median(times)


def nbytes(*modules) -> int:
    seen = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# Building both sides -------------------------------------------------------------------------------

@dataclass
class Bench:
    """Everything the phases run. `*_c` are torch.compile'd (None without --compile)."""

    cfg: object
    card: object  # diffusers + peft, adapters unmerged in fp32 (PeftModel.from_pretrained, as the card)
    merged: object  # diffusers, adapter merged (peft merge_and_unload)
    ours: MMDiT  # adapter loaded by flashsd3.lora.load_lora and merged
    ours_unmerged: MMDiT
    ref_vae: object
    our_vae: VAE
    clips: tuple = ()  # transformers CLIP-L, CLIP-G (built for the text / e2e phases only)
    tokenizers: tuple = ()
    text: TextEncoders | None = None
    merged_c: object = None
    ours_c: object = None
    ref_vae_c: object = None
    our_vae_c: object = None
    checks: dict = field(default_factory=dict)  # float32 reference outputs for the agreement section


def transformer_inputs(cfg, batch: int, args, dtype):
    """latents, timestep, context (154 tokens), pooled; drawn on the CPU so every device sees the same."""
    g = torch.Generator().manual_seed(batch)
    lat = torch.randn(batch, cfg.in_channels, args.height // 8, args.width // 8, generator=g)
    ctx = torch.randn(batch, CTX_TOKENS, cfg.context_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    lat, ctx, pooled = (x.to(args.device, dtype) for x in (lat, ctx, pooled))
    t = torch.full((batch,), TIMESTEP, device=args.device)  # float32 as the pipelines pass it (fp16: 857.5)
    return lat, t, ctx, pooled


def call_diffusers(model, inp):
    lat, t, ctx, pooled = inp
    return model(hidden_states=lat, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                 return_dict=False)[0]


def build_transformers(args, cfg, folder: str, checks: dict) -> dict:
    """The four transformer variants. The float32 card output (and the output with the adapter off)
    on batch-1 inputs is kept in `checks` before the weights are cast to the benchmark dtype."""
    from peft import LoraConfig, PeftModel, get_peft_model

    flash = FLASH_SD3_ADAPTER  # the published adapter's rank, alpha and targets; random values
    lora_cfg = LoraConfig(r=flash.rank, lora_alpha=flash.alpha, target_modules=list(flash.target_modules),
                          lora_dropout=0.0)
    trained = get_peft_model(diffusers_transformer(cfg, args.device, seed=0), lora_cfg)
    flash_adapter(trained, seed=1, folder=folder)
    inp = transformer_inputs(cfg, 1, args, torch.float32)
    checks["transformer"] = call_diffusers(trained, inp)
    with trained.disable_adapter():
        checks["transformer_no_lora"] = call_diffusers(trained, inp)
    base = trained.unload().to(args.dtype)
    ours, ours_unmerged = ours_from_diffusers(base, cfg), ours_from_diffusers(base, cfg)
    load_lora(ours, folder, name="flash")
    merge_lora(ours)
    load_lora(ours_unmerged, folder, name="flash")
    merged = PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload().eval()
    card = PeftModel.from_pretrained(base, folder).eval()  # autocast_adapter_dtype=True (default)
    checks["card_adapter_dtype"] = next(p.dtype for n, p in card.named_parameters() if "lora_A" in n)
    return dict(card=card, merged=merged, ours=ours, ours_unmerged=ours_unmerged)


def build(args, folder: str) -> Bench:
    cfg = replace(SD3_MEDIUM, depth=args.depth)
    checks = {}
    with torch.no_grad():
        models = build_transformers(args, cfg, folder, checks)
        ref_vae, our_vae = vae_pair(args.device, args.dtype, seed=2)
        if args.dtype != torch.float32:  # else the timed diffusers decode is the float32 reference
            checks["vae"] = ref_vae.decode(vae_latents(1, args, torch.float32)).sample
        ref_vae, our_vae = ref_vae.to(args.dtype), our_vae.to(args.dtype)
    b = Bench(cfg, **models, ref_vae=ref_vae, our_vae=our_vae, checks=checks)
    if {"text", "e2e"} & set(args.phases):  # CLIP-G alone is 0.7 G parameters: only when needed
        b.clips = (clip("clip_l", args.device, args.dtype, seed=3), clip("clip_g", args.device, args.dtype, seed=4))
        b.tokenizers = sd3_clip_tokenizers()
        b.text = TextEncoders(b.tokenizers[0], b.clips[0], b.tokenizers[1], b.clips[1])
    if args.compile:
        b.merged_c, b.ours_c = (torch.compile(m, mode=args.compile_mode, dynamic=False) for m in (b.merged, b.ours))
        b.ref_vae_c, b.our_vae_c = copy.deepcopy(ref_vae), copy.deepcopy(our_vae)
        for vae in (b.ref_vae_c, b.our_vae_c):  # the decode path of both: the decoder module
            vae.decoder = torch.compile(vae.decoder, mode=args.compile_mode, dynamic=False)
    return b


def vae_latents(batch: int, args, dtype):
    g = torch.Generator().manual_seed(100 + batch)
    z = torch.randn(batch, 16, args.vae_height // 8, args.vae_width // 8, generator=g)
    return z.to(args.device, dtype)


def diffusers_pipeline(transformer, vae, b: Bench):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)  # the Flash step
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=b.clips[0], tokenizer=b.tokenizers[0],
        text_encoder_2=b.clips[1], tokenizer_2=b.tokenizers[1], text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Phases ------------------------------------------------------------------------------------------

def mmdit_shape(cfg) -> F.MMDiTShape:
    return F.MMDiTShape(cfg.depth, cfg.hidden_size, cfg.mlp_hidden, cfg.patch_size, cfg.in_channels,
                        cfg.context_dim, cfg.pooled_dim)


def phase_flops(b: Bench, args, batch: int) -> dict[str, int]:
    v = SD3_VAE
    t = F.mmdit_flops(mmdit_shape(b.cfg), batch, args.height // 8, args.width // 8, CTX_TOKENS)
    vae_at = lambda h, w: F.vae_decode_flops(v.block_out_channels, v.layers_per_block, v.latent_channels,  # noqa: E731
                                              v.out_channels, batch, h // 8, w // 8)
    text = sum(F.clip_flops(k.num_hidden_layers, k.hidden_size, k.intermediate_size, k.projection_dim, batch)
               for k in CLIP_CONFIGS)
    return dict(transformer=t, vae=vae_at(args.vae_height, args.vae_width), text=text,
                e2e=text + args.steps * t + vae_at(args.height, args.width))


def transformer_variants(b: Bench, batch: int, args) -> list[Variant]:
    inp = transformer_inputs(b.cfg, batch, args, args.dtype)
    d = lambda m: (lambda: call_diffusers(m, inp))  # noqa: E731
    o = lambda m: (lambda: m(*inp))  # noqa: E731
    out = [Variant("diffusers+peft unmerged (card)", d(b.card), nbytes(b.card), ("card",)),
           Variant("diffusers merged", d(b.merged), nbytes(b.merged), ("merged",)),
           Variant("ours unmerged", o(b.ours_unmerged), nbytes(b.ours_unmerged), ours=True),
           Variant("ours merged", o(b.ours), nbytes(b.ours), ours=True)]
    if args.compile:
        out += [Variant("diffusers merged+compiled", d(b.merged_c), nbytes(b.merged), ("merged",), compiled=True),
                Variant("ours merged+compiled", o(b.ours_c), nbytes(b.ours), compiled=True, ours=True)]
    return out


def vae_variants(b: Bench, batch: int, args) -> list[Variant]:
    z = vae_latents(batch, args, args.dtype)
    d = lambda vae: (lambda: vae.decode(z).sample)  # noqa: E731
    o = lambda vae: (lambda: vae.decode(z))  # noqa: E731
    out = [Variant("diffusers", d(b.ref_vae), nbytes(b.ref_vae), ("card", "merged")),
           Variant("ours", o(b.our_vae), nbytes(b.our_vae), ours=True)]
    if args.compile:
        out += [Variant("diffusers compiled", d(b.ref_vae_c), nbytes(b.ref_vae), ("merged",), compiled=True),
                Variant("ours compiled", o(b.our_vae_c), nbytes(b.our_vae), compiled=True, ours=True)]
    return out


def text_variants(b: Bench, batch: int, args) -> list[Variant]:
    """Both sides call the same transformers CLIP modules; only the glue around them differs."""
    prompts = [PROMPT] * batch
    pipe = diffusers_pipeline(b.card, b.ref_vae, b)
    diff = lambda: pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=args.device,  # noqa: E731
                                      do_classifier_free_guidance=False, max_sequence_length=77)
    weights = nbytes(*b.clips)
    return [Variant("diffusers encode_prompt", diff, weights, ("card", "merged")),
            Variant("ours TextEncoders.encode", lambda: b.text.encode(prompts), weights, ours=True)]


def e2e_variants(b: Bench, batch: int, args) -> list[Variant]:
    prompts = [PROMPT] * batch
    size = dict(height=args.height, width=args.width)

    def diff(transformer, vae):
        pipe = diffusers_pipeline(transformer, vae, b)
        return lambda: pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=0.0, max_sequence_length=77,
                            generator=torch.Generator().manual_seed(0), output_type="pt", **size).images

    def ours(transformer, vae):
        pipe = FlashSD3Pipeline(transformer, vae, b.text)  # seed=: per-image CPU generators, as the CLI
        return lambda: pipe(prompts, num_steps=args.steps, seed=0, output_type="pt", **size).images

    w = lambda t, v: nbytes(t, v, *b.clips)  # noqa: E731
    out = [Variant("diffusers+peft unmerged (card)", diff(b.card, b.ref_vae), w(b.card, b.ref_vae), ("card",)),
           Variant("diffusers merged", diff(b.merged, b.ref_vae), w(b.merged, b.ref_vae), ("merged",)),
           Variant("ours merged", ours(b.ours, b.our_vae), w(b.ours, b.our_vae), ours=True)]
    if args.compile:
        out += [Variant("diffusers merged+compiled", diff(b.merged_c, b.ref_vae_c), w(b.merged, b.ref_vae),
                        ("merged",), compiled=True),
                Variant("ours merged+compiled", ours(b.ours_c, b.our_vae_c), w(b.ours, b.our_vae),
                        compiled=True, ours=True)]
    return out


PHASES = dict(transformer=transformer_variants, vae=vae_variants, text=text_variants, e2e=e2e_variants)


# Agreement -----------------------------------------------------------------------------------------

def agreement(b: Bench, args) -> list[str]:
    """Relative L2 errors at batch 1, before any timing. Transformer / VAE: against diffusers in
    float32 (computed before the cast), so low-precision runs show each side's own rounding."""
    ref, lines = b.checks["transformer"], []
    lines.append(f"card recipe: peft adapter weights are {b.checks['card_adapter_dtype']} on a {args.dtype} base "
                 "(PeftModel.from_pretrained, autocast_adapter_dtype=True by default)")
    lines.append(f"transformer: Flash adapter effect |out(no LoRA) - out| / |out| = "
                 f"{rel_err(b.checks['transformer_no_lora'], ref):.2e} (float32)")
    outs = {v.name: v.fn() for v in transformer_variants(b, 1, args)}
    for name, out in outs.items():
        lines.append(f"transformer: {name:30s} vs float32 diffusers+peft: {rel_err(out, ref):.2e}")
    merged = rel_err(outs["ours merged"], outs["diffusers merged"])
    lines.append(f"transformer: ours merged vs diffusers merged: {merged:.2e}")
    if args.dtype == torch.float32:  # how far float32 itself is from exact on this random network
        inp = transformer_inputs(b.cfg, 1, args, torch.float64)
        exact = copy.deepcopy(b.ours_unmerged).double()(*inp)
        lines.append(f"transformer: float32 rounding level: diffusers+peft float32 vs ours unmerged float64 "
                     f"{rel_err(ref, exact):.2e}; ours merged float32 vs float64 "
                     f"{rel_err(outs['ours merged'], exact):.2e}")
    outs = {v.name: v.fn() for v in vae_variants(b, 1, args)}
    ref = b.checks.get("vae", outs["diffusers"])
    for name, out in outs.items():
        lines.append(f"vae decode:  {name:30s} vs float32 diffusers: {rel_err(out, ref):.2e}")
    if b.text is not None:
        (d_ctx, _, d_pool, _), (o_ctx, o_pool) = (v.fn() for v in text_variants(b, 1, args))
        lines.append(f"text:        context rel err {rel_err(o_ctx, d_ctx):.2e}, pooled {rel_err(o_pool, d_pool):.2e} "
                     f"(ours vs diffusers encode_prompt, {tuple(o_ctx.shape)})")
    if "e2e" in args.phases:
        lines.append(e2e_agreement(b, args))
    return lines


def e2e_agreement(b: Bench, args) -> str:
    """Whole pipelines, 1 step from the same initial latents (no re-noise draw, whose source differs by
    design: ours a CPU generator, diffusers the device's global RNG), images in [0, 1]."""
    g = torch.Generator().manual_seed(7)
    lat = torch.randn(1, 16, args.height // 8, args.width // 8, generator=g).to(args.device, args.dtype)
    kw = dict(height=args.height, width=args.width, latents=lat, output_type="pt")
    ref = diffusers_pipeline(b.card, b.ref_vae, b)(prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0,
                                                   max_sequence_length=77, **kw).images
    ours = FlashSD3Pipeline(b.ours, b.our_vae, b.text)(PROMPT, num_steps=1, **kw).images
    return f"e2e (1 step, same latents): image rel err ours vs diffusers+peft = {rel_err(ours, ref):.2e}"


# Report ------------------------------------------------------------------------------------------

def baseline(rows: list[Row], row: Row, role: str) -> Row | None:
    """The diffusers row of the same phase and batch with `role`, compiled like `row` if there is one."""
    same = [r for r in rows if r.phase == row.phase and r.batch == row.batch and role in r.variant.roles]
    match = [r for r in same if r.variant.compiled == row.variant.compiled]
    return (match or [r for r in same if not r.variant.compiled] or [None])[0]


def table(rows: list[Row], rate: float) -> list[str]:
    head = ("| phase | batch | variant | median ms | min | max | peak MiB | vs card | vs merged | "
            "floor ms | /floor | items/s |")
    out = [head, "|" + "---|" * 12]
    for r in rows:
        card, merged = baseline(rows, r, "card"), baseline(rows, r, "merged")
        floor = r.flops / rate * 1e3
        ratio = lambda b, r=r: f"{r.median / b.median:.3f}" if b else "-"  # noqa: E731
        peak = f"{r.peak / 2**20:.0f}" if r.peak is not None else "-"
        out.append(f"| {r.phase} | {r.batch} | {r.variant.name} | {r.median:.2f} | {min(r.ms):.2f} | {max(r.ms):.2f} "
                   f"| {peak} | {ratio(card)} | {ratio(merged)} | {floor:.2f} | {r.median / floor:.2f} "
                   f"| {r.batch / r.median * 1e3:.2f} |")
    return out


def targets(rows: list[Row], args) -> list[str]:
    """Issue 6's targets that this run can check (a line each, PASS/FAIL with the numbers)."""
    def check(label, value, limit):
        return f"- {'PASS' if value <= limit else 'FAIL'} {label}: {value:.3f} (target <= {limit})"

    out = []
    for r in rows:
        if not r.variant.ours or r.variant.name == "ours unmerged" and args.device.type == "cuda":
            continue
        card, merged = baseline(rows, r, "card"), baseline(rows, r, "merged")
        tag = f"{r.phase} b{r.batch} {r.variant.name}"
        if args.device.type == "cpu" and r.phase == "transformer":
            out.append(check(f"{tag} / diffusers+peft unmerged (CPU)", r.median / card.median, 0.9))
        if args.device.type != "cuda":
            continue
        if r.phase == "e2e" and r.batch == 1:
            out.append(check(f"{tag} ms", r.median, 100.0))
            out.append(check(f"{tag} / card recipe", r.median / card.median, 0.25))
            if r.variant.compiled:
                out.append(check(f"{tag} / diffusers merged+compiled", r.median / merged.median, 0.5))
            out.append(check(f"{tag} peak memory / card recipe's", r.peak / card.peak, 0.7))
        limit = dict(transformer=1.3, vae=2.0).get(r.phase)
        if limit and r.batch == 1:
            out.append(check(f"{tag} / FLOP floor", r.median / (r.flops / args.rate * 1e3), limit))
    return out


def meta(args) -> dict:
    import diffusers
    import peft
    import transformers

    if args.device.type == "cuda":
        name = torch.cuda.get_device_name(args.device)
    else:
        cpu = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
               if ln.startswith("model name")] if Path("/proc/cpuinfo").exists() else [platform.processor()]
        name = f"{cpu[0] if cpu else platform.machine()} ({args.threads} threads of {os.cpu_count()} cores)"
    return dict(device=name, torch=torch.__version__, diffusers=diffusers.__version__, peft=peft.__version__,
                transformers=transformers.__version__, dtype=args.dtype_name, depth=args.depth,
                height=args.height, width=args.width, vae_size=[args.vae_height, args.vae_width],
                batch=args.batch, steps=args.steps, runs=args.runs, warmup=args.warmup,
                compile=args.compile and args.compile_mode,
                date=datetime.datetime.now().isoformat(timespec="seconds"), loadavg=[args.load_start, load_average()])


def load_average():  # 1-minute load: how busy the machine was (CPU timings need an idle one)
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def report(args, info, checks, flop_lines, rows) -> str:
    lines = [f"# flashsd3 vs diffusers: {info['device']}", "",
             f"torch {info['torch']}, diffusers {info['diffusers']}, peft {info['peft']}, transformers "
             f"{info['transformers']}; {info['dtype']}, depth {info['depth']} (SD3-medium width), "
             f"{args.height}x{args.width} px (VAE phase {args.vae_height}x{args.vae_width}), {args.steps} steps, "
             f"{args.runs} runs after {args.warmup} warm-up, compile: {info['compile']}; {info['date']}; "
             f"1-min load average at start / end: {info['loadavg'][0]} / {info['loadavg'][1]}", "",
             "## Agreement (batch 1)", "", *[f"- {ln}" for ln in checks], "",
             "## FLOPs", "", *[f"- {ln}" for ln in flop_lines], "",
             "## Timings", "", *table(rows, args.rate), "",
             "ratios use medians; `vs merged` compares with the diffusers merged variant compiled alike; "
             "`peak MiB` = the variant's resident weights + the call's allocation peak (CUDA only); "
             "`items/s` = batch / median.", "", "## Targets", "", *targets(rows, args)]
    return "\n".join(lines) + "\n"


def flop_lines(b: Bench, args) -> list[str]:
    """Analytic counts at batch 1, checked against torch's FlopCounterMode on meta-device copies of ours."""
    from torch.utils.flop_counter import FlopCounterMode

    f, counted = phase_flops(b, args, 1), {}
    with torch.device("meta"):
        model, vae = MMDiT(b.cfg), VAE(SD3_VAE)
        inp = (torch.empty(1, 16, args.height // 8, args.width // 8), torch.empty(1),
               torch.empty(1, CTX_TOKENS, b.cfg.context_dim), torch.empty(1, b.cfg.pooled_dim))
        for phase, call in (("transformer", lambda: model(*inp)),
                            ("vae", lambda: vae.decode(torch.empty(1, 16, args.vae_height // 8, args.vae_width // 8)))):
            with FlopCounterMode(display=False) as fc:
                call()
            counted[phase] = fc.get_total_flops()
    lora = F.flash_lora_flops(mmdit_shape(b.cfg), 1, args.height // 8, args.width // 8, CTX_TOKENS)
    n = 8192 if args.device.type == "cuda" else 2048
    lines = [f"matmul rate ({args.dtype_name}, {n}x{n} @ {n}x{n}): best {args.rate / 1e12:.3f} TFLOP/s, median "
             f"{args.rate_median / 1e12:.3f}; floor = FLOPs / best rate"]
    for phase in PHASES:
        check = f" (torch FlopCounterMode: {counted[phase] / 1e9:.2f})" if phase in counted else ""
        lines.append(f"{phase}: {f[phase] / 1e9:.2f} GFLOP per batch-1 call{check}")
    lines.append(f"the Flash adapter run unmerged adds {lora / 1e9:.2f} GFLOP per transformer forward "
                 f"(+{100 * lora / f['transformer']:.1f}%); floors use the merged count")
    return lines


# Command line ------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="flashsd3 vs diffusers (+peft) benchmark; see bench/README.md")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--depth", type=int, help="joint blocks at SD3-medium width; default 24 on cuda, 2 on cpu")
    p.add_argument("--height", type=int, help="image pixels; default 1024 on cuda, 512 on cpu")
    p.add_argument("--width", type=int)
    p.add_argument("--vae-size", type=int, nargs=2, metavar=("H", "W"),
                   help="image size of the VAE phase; default the image size on cuda, at most 256x256 on cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads on cpu")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd merged variants")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--phases", help=f"comma list of {','.join(PHASES)}; default all on cuda, "
                                    "transformer,vae on cpu")
    p.add_argument("--out", help="write the markdown report here")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.device = torch.device(args.device)
    args.dtype_name = args.dtype or ("fp16" if gpu else "fp32")
    args.dtype = DTYPES[args.dtype_name]
    args.depth = args.depth or (24 if gpu else 2)
    args.height = args.height or (1024 if gpu else 512)
    args.width = args.width or (1024 if gpu else 512)
    cap = 10**6 if gpu else 256
    args.vae_height, args.vae_width = args.vae_size or (min(args.height, cap), min(args.width, cap))
    args.phases = (args.phases or ",".join(PHASES if gpu else ["transformer", "vae"])).split(",")
    problems = [f"unknown phase {x!r}" for x in args.phases if x not in PHASES]
    problems += [f"{k} {v} is not a multiple of {m}" for k, v, m in
                 (("height", args.height, 16), ("width", args.width, 16), ("VAE height", args.vae_height, 8),
                  ("VAE width", args.vae_width, 8)) if v <= 0 or v % m]
    problems += [f"--{k} must be >= {m}" for k, m in (("runs", 1), ("warmup", 0), ("depth", 1), ("steps", 1))
                 if getattr(args, k) < m]
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # "modules to keep in float32: []" on every .to(dtype)
    args.load_start = load_average()
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        b = build(args, folder)
    print(f"built both implementations in {time.perf_counter() - start:.1f} s", flush=True)
    args.rate, args.rate_median = matmul_rate(args)
    with torch.no_grad():
        checks = agreement(b, args)
        print("\n".join(checks), flush=True)
        flop_info = flop_lines(b, args)
        rows = []
        for batch in args.batch:
            flop_count = phase_flops(b, args, batch)
            for phase in args.phases:
                rows += measure(phase, batch, PHASES[phase](b, batch, args), flop_count[phase], args)
    info = meta(args)
    text = report(args, info, checks, flop_info, rows)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    info["matmul_flops_per_s"] = dict(best=args.rate, median=args.rate_median)
    info["rows"] = [dict(phase=r.phase, batch=r.batch, variant=r.variant.name, median_ms=r.median, min_ms=min(r.ms),
                         max_ms=max(r.ms), peak_bytes=r.peak, flops=r.flops) for r in rows]
    print(json.dumps(info))


if __name__ == "__main__":
    main()
