#!/usr/bin/env python
"""One Flash distillation iteration broken down by part, and the memory budget of the SD3 recipe.

    python bench/bench_flash_step.py --device cuda --model sd3-medium --resolution 1024 --batch 2 --dtype bf16 \\
        --checkpointing                                      # the recipe's iteration on one GPU (random weights)
    python bench/bench_flash_step.py --device cpu --model sd3-medium --resolution 256 --batch 1 --k 30 --checkpointing
    python bench/bench_flash_step.py --budget               # analytic budget, 1024^2, batch 2, bf16 (any machine)

Parts of one iteration (flashsd3/training/flash/step.py, the released recipe's order): `target` (the teacher's CFG
Euler solve, K - k calls on the batch [negative, prompt]), `student` (one conditional forward with grad), `dmd`
(teacher CFG + student at a re-noised x0_hat, no grad), `gan_g` (teacher on the noised x0_hat with gradients to
it, and the head), `backward_g`, `step_g` (AdamW on the adapters), `d_pass` (fresh student forward, teacher on
fake and real, head), `backward_d` + `step_d`. Random weights (timing does not depend on values); the start
index k is fixed by --k so the teacher part is reproducible (recipe: E[K - k] = 12.0 / 17.4 / 19.6 / 21.9 per
phase). Times: median of --iters after one warm-up, torch.cuda.synchronize() before each clock read; on CUDA the
peak memory allocated during each part. One JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from flashsd3.config import SD3_MEDIUM, TINY
from flashsd3.lora import add_lora, lora_parameters
from flashsd3.lora.checkpointing import checkpoint_blocks
from flashsd3.mmdit import MMDiT
from flashsd3.training.flash import (
    FlashBatch,
    FlashRecipe,
    make_head,
    mmdit_flash_models,
)
from flashsd3.training.flash import step as flash_step

MODELS = {"sd3-medium": SD3_MEDIUM, "tiny": TINY}
CLIP_TOKENS, T5_TOKENS = 77, 77  # the recipe's 154 context tokens: CLIP, then zero T5 tokens (training/cache.py)


class PartTimer:
    """Accumulates wall time (and CUDA peak memory) per named part of one iteration."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.peaks = device, {}, {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextmanager
    def part(self, name: str):
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        if self.device.type == "cuda":
            self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated())

    def wrap(self, fn, name: str):
        def timed(*a, **kw):
            with self.part(name):
                return fn(*a, **kw)
        return timed


def build(args, device: torch.device, dtype: torch.dtype):
    cfg = MODELS[args.model]
    torch.manual_seed(0)
    with torch.device(device):
        model = MMDiT(cfg).to(dtype).requires_grad_(False)
    add_lora(model, rank=args.rank, alpha=args.alpha, targets="flash-sd3")
    checkpoint_blocks(model, args.checkpointing)
    side = args.resolution // 8  # SD3's VAE downscale
    recipe = FlashRecipe(teacher_steps=args.K, d_pass=args.d_pass)
    head = make_head(recipe, model, side).to(device)
    B, L = args.batch, CLIP_TOKENS + T5_TOKENS
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(B, cfg.in_channels, side, side, generator=g).to(device, dtype)
    cond = (torch.randn(B, L, cfg.context_dim, generator=g).to(device, dtype),
            torch.randn(B, cfg.pooled_dim, generator=g).to(device, dtype))
    uncond = tuple(torch.randn_like(c) for c in cond)
    return model, head, recipe, FlashBatch(x0, cond, uncond, list(range(B)))


@contextmanager
def timed_parts(timer: PartTimer, k: int):
    """Time step.py's teacher_target / student_x0 / dmd_velocities as parts; fix the start index to k."""
    patches = {"teacher_target": "target", "student_x0": "student", "dmd_velocities": "dmd"}
    saved = {name: getattr(flash_step, name) for name in (*patches, "draw_start_index")}
    try:
        for name, part in patches.items():
            setattr(flash_step, name, timer.wrap(saved[name], part))
        flash_step.draw_start_index = lambda *a, **kw: k
        yield
    finally:
        for name, fn in saved.items():
            setattr(flash_step, name, fn)


def iteration(model, head, recipe, batch, args, timer: PartTimer) -> None:
    """One generator step and one discriminator step, each part timed (phase 3: every loss on)."""
    models = mmdit_flash_models(model, head, recipe)
    opt_g = torch.optim.AdamW(lora_parameters(model), lr=1e-5)
    opt_d = torch.optim.AdamW(head.parameters(), lr=1e-5)
    step = sum(recipe.phase_batches)  # phase 3
    features = models.features
    with timed_parts(timer, args.k):
        models.features = timer.wrap(features, "gan_g")
        loss, g = flash_step.generator_loss(models, recipe, batch, step, seed=0)
        models.features = features
    with timer.part("backward_g"):
        loss.backward()
    with timer.part("step_g"):
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    with timer.part("d_pass"), timed_parts(PartTimer(timer.device), args.k):
        loss_d, _ = flash_step.discriminator_loss(models, recipe, batch, step, seed=0,
                                                  reuse=g if recipe.d_pass == "reuse" else None)
    with timer.part("backward_d+step_d"):
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, head, recipe, batch = build(args, device, dtype)
    runs = []
    for i in range(args.iters + 1):  # the first is warm-up (kept when --iters 0)
        timer = PartTimer(device)
        t0 = time.perf_counter()
        iteration(model, head, recipe, batch, args, timer)
        timer._sync()
        if i > 0 or args.iters == 0:
            runs.append({**timer.times, "total": time.perf_counter() - t0})
    parts = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "model": args.model, "dtype": args.dtype, "resolution": args.resolution,
           "batch": args.batch, "K": args.K, "k": args.k, "teacher_cfg_calls": args.K - args.k,
           "checkpointing": args.checkpointing, "d_pass": args.d_pass, "threads": torch.get_num_threads(),
           "seconds": parts}
    if device.type == "cuda":
        out["peak_gib"] = {k: round(v / 2**30, 2) for k, v in timer.peaks.items()}
        out["peak_gib_total"] = round(max(timer.peaks.values()) / 2**30, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=tuple(MODELS), default="sd3-medium")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latent = side / 8)")
    p.add_argument("--batch", type=int, default=2, help="per-GPU batch (recipe: 2)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16", help="frozen base weights")
    p.add_argument("--K", type=int, default=32, help="teacher grid steps")
    p.add_argument("--k", type=int, default=16, help="start index: K - k teacher CFG calls")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per joint block")
    p.add_argument("--d-pass", choices=("fresh", "reuse"), default="fresh")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up (0: time the first)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--budget", action="store_true", help="print the analytic memory budget and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.budget:
        from flash_memory import budget_table  # bench/flash_memory.py, beside this file

        print(budget_table())
        return 0
    if not 0 <= args.k < args.K:
        p.error(f"--k must be in 0..{args.K - 1}")
    print(json.dumps(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
