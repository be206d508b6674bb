"""CPU timing of one MMDiT forward with the Flash SD3 LoRA: no LoRA vs unmerged vs merged, and
diffusers + peft (unmerged) on identical weights in the same process.

SD3-medium width (1536, 24 heads) at reduced depth, 64x64 latents (1024 image tokens), 154 text
tokens (CLIP 77 + zero T5 77, reference README F5), float32, random weights. The adapter has the
published adapter_config.json (r 64, alpha 8, its target_modules) with random non-zero A and B,
saved by peft and loaded by flashsd3 from that folder.

    python scripts/bench_lora_cpu.py --depth 2 --runs 5 --threads 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flashsd3 import SD3_MEDIUM, MMDiT
from flashsd3.keymaps.mmdit import diffusers_table
from flashsd3.lora import load_lora, merge_lora
from flashsd3.weights import TRANSFORMS, resolve

# The published jasperai/flash-sd3 adapter_config.json fields that matter (reference README F2).
FLASH_LORA = dict(r=64, lora_alpha=8, target_modules=["proj", "linear_1", "to_k", "proj_out", "linear_2", "to_out.0",
                                                      "ff.net.2", "proj_in", "to_v", "to_q", "linear", "ff.net.0.proj"])


def median_seconds(variants: dict, runs: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per variant. Runs are interleaved round-robin so drifting
    machine load hits every variant alike; CPU time (all threads) is the steadier number on a
    shared machine, wall time the one a user waits for."""
    times = {label: [] for label in variants}
    with torch.no_grad():
        for fn in variants.values():
            for _ in range(warmup):
                fn()
        for _ in range(runs):
            for label, fn in variants.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                times[label].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {label: tuple(statistics.median(x) for x in zip(*ts)) for label, ts in times.items()}


def peft_off(model, call):
    def run():
        with model.disable_adapter():
            return call()
    return run


def ours_from(ref, cfg) -> MMDiT:
    """Our model holding the diffusers model's weights (converted through the key table)."""
    sd = ref.state_dict()
    with torch.device("meta"):
        model = MMDiT(cfg)
    plan = resolve(model.state_dict().keys(), diffusers_table(cfg.depth))
    model.load_state_dict({k: TRANSFORMS[t].apply(*(sd[s] for s in srcs)).clone() for k, (srcs, t) in plan.items()},
                          strict=True, assign=True)
    return model.eval()


def peft_adapter(ref, folder: Path):
    """peft-wrapped `ref` with the published config and random A, B; saved to `folder`."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(ref, LoraConfig(**FLASH_LORA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(folder)
    return model.eval()


def build(depth: int):
    """Three copies of our model (plain, LoRA unmerged, LoRA merged) and the peft-wrapped diffusers
    model, all with the same random weights and the same adapter."""
    from diffusers import SD3Transformer2DModel

    cfg = dataclasses.replace(SD3_MEDIUM, depth=depth)
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg.to_diffusers()).eval()
    plain, unmerged, merged = ours_from(ref, cfg), ours_from(ref, cfg), ours_from(ref, cfg)
    with tempfile.TemporaryDirectory() as folder:
        peft_model = peft_adapter(ref, Path(folder))
        load_lora(unmerged, folder, name="flash")
        load_lora(merged, folder, name="flash")
    merge_lora(merged)
    return cfg, plain, unmerged, merged, peft_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=2, help="joint blocks (SD3-medium has 24)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 -> 512x512 pixels)")
    ap.add_argument("--tokens", type=int, default=154, help="text tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, plain, unmerged, merged, peft_model = build(args.depth)
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(1, cfg.in_channels, args.latent, args.latent, generator=g)
    ctx = torch.randn(1, args.tokens, cfg.context_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_dim, generator=g)
    t = torch.tensor([857.69])
    inner = peft_model.base_model.model
    run_ref = lambda: inner(hidden_states=lat, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample  # noqa: E731
    with torch.no_grad():
        expected = run_ref()
        err = {name: ((m(lat, t, ctx, pooled) - expected).norm() / expected.norm()).item()
               for name, m in (("unmerged", unmerged), ("merged", merged))}
    variants = {
        "flashsd3, no LoRA": lambda: plain(lat, t, ctx, pooled),
        "flashsd3, LoRA unmerged": lambda: unmerged(lat, t, ctx, pooled),
        "flashsd3, LoRA merged": lambda: merged(lat, t, ctx, pooled),
        "diffusers, no LoRA": peft_off(peft_model, run_ref),
        "diffusers+peft, LoRA unmerged": run_ref,
    }
    times = median_seconds(variants, args.runs, args.warmup)
    print(f"depth {args.depth}, width {cfg.hidden_size}, latents {args.latent}x{args.latent}, {args.tokens} text tokens, "
          f"float32, {args.threads} threads, median of {args.runs} interleaved runs, torch {torch.__version__}")
    print(f"output vs diffusers+peft, relative error: unmerged {err['unmerged']:.1e}, merged {err['merged']:.1e}")
    report(times)
    print(json.dumps(dict(depth=args.depth, threads=args.threads, torch=torch.__version__, rel_err=err,
                          wall_ms={k: round(v[0] * 1e3, 1) for k, v in times.items()},
                          cpu_ms={k: round(v[1] * 1e3, 1) for k, v in times.items()})))


def report(times: dict[str, tuple[float, float]]) -> None:
    base = times["flashsd3, no LoRA"]
    print(f"  {'':32s} {'wall ms':>9s} {'cpu ms':>9s}   vs flashsd3 no LoRA (wall, cpu)")
    for label, (wall, cpu) in times.items():
        print(f"  {label:32s} {wall * 1e3:9.1f} {cpu * 1e3:9.1f}   x{wall / base[0]:.3f}  x{cpu / base[1]:.3f}")
    for a, b in (("flashsd3, LoRA unmerged", "flashsd3, LoRA merged"), ("flashsd3, LoRA merged", "flashsd3, no LoRA"),
                 ("diffusers+peft, LoRA unmerged", "flashsd3, LoRA unmerged"), ("diffusers, no LoRA", "flashsd3, no LoRA")):
        print(f"  {a} / {b}: wall {times[a][0] / times[b][0]:.3f}, cpu {times[a][1] / times[b][1]:.3f}")


if __name__ == "__main__":
    main()
