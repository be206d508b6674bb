#!/usr/bin/env python
"""Compute per training sample of Flash distillation recipes, from the code's own model calls.

    python bench/flash_cost.py                  # the released recipe vs the distillation-only variants
    python bench/flash_cost.py --trials 24 --json

Runs the real iteration (`flashsd3.training.flash`) on the tiny MMDiT with LoRA adapters, with every model
callable wrapped by `flashsd3.training.flash.cost.CallCounter`, and counts per training sample the forwards
(rows through the model: a CFG call on a batch of B is 2B) and the backward passes through each callable. The
start index k is drawn as the recipe draws it, so each phase runs `--trials` batches on other seeds; the
counts of every batch must fit count = a + b (K - k) exactly (the teacher solve is the only part that depends
on k; checked), and the phase's expectation is a + b E[K - k] with E[K - k] from the exact mixture.

FLOPs at the SD3-medium 1024^2 shape (128^2 latents, 154 text tokens, bench/flops.py): a teacher forward F;
a student forward F + the unmerged rank-64 adapter's FLOPs; a backward with the base weights frozen costs its
input gradients only (1x the linears, 2x attention's two matmuls), plus 2x the adapter in the student (input
and weight gradients). Not counted: the discriminator head (~1 GFLOP per call, < 0.01% of F), and the
released recipe's LPIPS distillation loss (VAE decode + VGG of 64^2 latent crops; the toy uses L2).

Recipes: `flash-sd3` = the released recipe (FlashRecipe() defaults: modes at 0, K/4, K/2, 3K/4; DMD and GAN
from phase 1; the discriminator step on a fresh forward). `distill` = the distillation term only, modes at
the 4-step Flash sampler's sigmas, the recipe's phase weights, no discriminator step (generator_loss and its
backward only); `distill-K<n>` the same with an n-step teacher grid.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
import flops as F  # noqa: E402  (bench/flops.py, beside this file)

from flashsd3.config import FLASH_SD3_ADAPTER, SD3_MEDIUM, TINY  # noqa: E402
from flashsd3.lora import add_lora, lora_parameters  # noqa: E402
from flashsd3.mmdit import MMDiT  # noqa: E402
from flashsd3.training.flash import (  # noqa: E402
    FlashBatch,
    FlashRecipe,
    expected_teacher_steps,
    flash_update,
    generator_loss,
    make_head,
    mmdit_flash_models,
)
from flashsd3.training.flash.cost import CallCounter  # noqa: E402

CTX_TOKENS = 154  # 77 CLIP + 77 T5 tokens (the Flash recipe's max_sequence_length 77), as bench/benchmark.py
NAMES = ("teacher", "student", "features")
ZERO = (0.0, 0.0, 0.0, 0.0)


def recipes() -> dict[str, tuple[FlashRecipe, bool]]:
    """name -> (recipe, runs the discriminator step)."""
    distill = replace(FlashRecipe(), modes="sampler", lambda_adv=ZERO, lambda_dmd=ZERO)
    return {"flash-sd3": (FlashRecipe(), True), "distill": (distill, False),
            "distill-K16": (replace(distill, K=16), False), "distill-K8": (replace(distill, K=8), False)}


def sd3_flops() -> dict[str, float]:
    """FLOPs per row at SD3-medium 1024^2: forward and frozen-base backward, base and adapter parts."""
    c = SD3_MEDIUM
    shape = F.MMDiTShape(c.depth, c.hidden_size, c.mlp_hidden, c.patch_size, c.in_channels, c.context_dim,
                         c.pooled_dim)
    fwd = F.mmdit_flops(shape, 1, 128, 128, CTX_TOKENS)
    attn = c.depth * F.attention(1, (128 // c.patch_size) ** 2 + CTX_TOKENS, c.hidden_size)
    lora = F.flash_lora_flops(shape, 1, 128, 128, CTX_TOKENS, rank=FLASH_SD3_ADAPTER.rank)
    return {"forward": fwd, "backward": fwd + attn, "lora_forward": lora, "lora_backward": 2 * lora}


def sample_flops(per: dict[str, tuple[float, float]], fl: dict[str, float]) -> float:
    """FLOPs per training sample from per-sample (forwards, backwards) of each callable."""
    total = 0.0
    for name, (fwd, bwd) in per.items():
        total += fwd * fl["forward"] + bwd * fl["backward"]
        if name == "student":
            total += fwd * fl["lora_forward"] + bwd * fl["lora_backward"]
    return total


def one_batch(recipe: FlashRecipe, d_step: bool, step: int, seed: int, batch: int = 2) -> tuple[int, dict]:
    """Counted calls of batch `step` (seed `seed`) on the tiny model: (k, {name: (fwd, bwd) per sample})."""
    torch.manual_seed(0)
    model = MMDiT(TINY).eval().requires_grad_(False)
    add_lora(model, rank=4, alpha=4.0, targets="all-linear")
    head = make_head(recipe, model, 8)
    models, c = mmdit_flash_models(model, head, recipe), CallCounter()
    models = replace(models, **{n: c.wrap(getattr(models, n), n) for n in NAMES})
    g = torch.Generator().manual_seed(seed)
    cond = (torch.randn(batch, 5, TINY.context_dim, generator=g), torch.randn(batch, TINY.pooled_dim, generator=g))
    fb = FlashBatch(torch.randn(batch, TINY.in_channels, 8, 8, generator=g), cond,
                    tuple(torch.zeros_like(x) for x in cond), list(range(batch)))
    opt_g, opt_d = torch.optim.AdamW(lora_parameters(model)), torch.optim.AdamW(head.parameters())
    if d_step:
        k = flash_update(models, recipe, fb, step, seed, opt_g, opt_d)["k"]
    else:
        loss, out = generator_loss(models, recipe, fb, step, seed)
        loss.backward()
        k = out.k
    per = c.per_sample(batch)
    return k, {n: per.get(n, (0.0, 0.0)) for n in NAMES}


def phase_counts(recipe: FlashRecipe, d_step: bool, phase: int, trials: int) -> dict[str, tuple[float, float]]:
    """Expected (fwd, bwd) per sample of each callable in `phase`: count = a + b (K - k), checked on every
    trial, at E[K - k] of the phase's exact mixture."""
    step = sum(recipe.phase_batches[:phase])
    runs = [one_batch(recipe, d_step, step, seed) for seed in range(trials)]
    ks = sorted({k for k, _ in runs})
    if len(ks) < 2:
        raise SystemExit(f"phase {phase}: every trial drew k = {ks[0]}; run more --trials to fit the k-dependence")
    (k0, c0), (k1, c1) = next(r for r in runs if r[0] == ks[0]), next(r for r in runs if r[0] == ks[-1])
    steps = expected_teacher_steps(recipe, phase)
    out = {}
    for n in NAMES:
        fit = []
        for j in range(2):  # forwards, backwards
            b = (c1[n][j] - c0[n][j]) / ((recipe.K - k1) - (recipe.K - k0))
            a = c0[n][j] - b * (recipe.K - k0)
            for k, c in runs:
                if abs(c[n][j] - (a + b * (recipe.K - k))) > 1e-9:
                    raise SystemExit(f"{n} counts are not affine in K - k: {runs}")
            fit.append(a + b * steps)
        out[n] = (fit[0], fit[1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=12, help="batches per phase (other seeds: other k draws)")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every number")
    args = p.parse_args()
    torch.set_num_threads(1)
    fl = sd3_flops()
    print(f"SD3-medium 1024^2 ({CTX_TOKENS} text tokens), TFLOPs per row: forward {fl['forward'] / 1e12:.2f}, "
          f"frozen-base backward {fl['backward'] / 1e12:.2f}, adapter forward {fl['lora_forward'] / 1e12:.3f}")
    print("\n| recipe | phase | E[K-k] | teacher fwd | student fwd / bwd | features fwd / bwd | fwd-equiv | "
          "TFLOPs |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    table = {}
    for name, (recipe, d_step) in recipes().items():
        rows = []
        for phase in range(recipe.num_phases):
            per = phase_counts(recipe, d_step, phase, args.trials)
            tf = sample_flops(per, fl)
            rows.append({"phase": phase, "teacher_steps": expected_teacher_steps(recipe, phase), "counts": per,
                         "flops": tf, "fwd_equiv": tf / fl["forward"]})
            r = rows[-1]
            print(f"| {name} | {phase} | {r['teacher_steps']:.1f} | {per['teacher'][0]:.1f} | "
                  f"{per['student'][0]:.0f} / {per['student'][1]:.0f} | {per['features'][0]:.0f} / "
                  f"{per['features'][1]:.0f} | {r['fwd_equiv']:.1f} | {tf / 1e12:.0f} |")
        table[name] = rows
    base = [r["flops"] for r in table["flash-sd3"]]
    print("\nRatio of FLOPs per sample to flash-sd3 (phases 0-3; mean = 4 equal phases, as the toy's schedule):")
    for name, rows in table.items():
        ratios = [r["flops"] / b for r, b in zip(rows, base, strict=True)]
        mean = sum(r["flops"] for r in rows) / sum(base)
        print(f"  {name}: " + " ".join(f"{x:.3f}" for x in ratios) + f"  mean {mean:.3f}")
    if args.json:
        print(json.dumps({"flops_per_row": fl, "recipes": table}))


if __name__ == "__main__":
    main()
