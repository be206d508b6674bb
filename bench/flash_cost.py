#!/usr/bin/env python
"""Compute per training sample of the named Flash recipes (training.flash.RECIPES), from the code's own calls.

    python bench/flash_cost.py            # flash-sd3 vs distill: per phase and the mean over the 4 phases,
                                          # per row and per trained (start point, target) pair
    python bench/flash_cost.py --json     # also one JSON line with every number

Runs the real iteration (`flash_step`, its generator and discriminator updates) on the tiny MMDiT with LoRA
adapters, every model callable wrapped by `training.flash.cost.CallCounter`, and counts per training sample
the rows through each callable (a CFG call on B rows is 2B) and the backward passes through them. The start
index k is the only random draw that changes the counts, so each phase's expectation is exact: the counts of
one batch at every k = 0..K-1 (the recipe's own start, k fixed), weighted by the phase's mixture pi_p(k).

FLOPs at the SD3-medium 1024^2 shape (128^2 latents, 154 text tokens, bench/flops.py): a teacher forward F;
a student forward F + the unmerged rank-64 adapter; a backward with the base weights frozen costs the input
gradients only (1x the linears, 2x attention's two matmuls), plus 2x the adapter in the student. Not counted:
the discriminator head (~1 GFLOP per call, < 0.01% of F) and the released recipe's LPIPS loss (a VAE decode and
VGG of 64^2 latent crops, the same in both recipes' distillation term).
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
    RECIPES,
    FlashBatch,
    FlashRecipe,
    chain_start_at,
    draw_guidance,
    flash_step,
    make_head,
    mixture_probs,
    mmdit_flash_models,
    named_recipe,
    noised_data_start_at,
)
from flashsd3.training.flash.cost import CallCounter  # noqa: E402
from flashsd3.training.loop import OptimizerStep  # noqa: E402

CTX_TOKENS = 154  # 77 CLIP + 77 T5 tokens (the Flash recipe's max_sequence_length 77), as bench/benchmark.py
NAMES = ("teacher", "student", "features")


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


# the recipes counted: the named ones (distill: every start on the student's chain, 16-step targets), and at the
# 8-step target grid the toy's options were measured on (the preset's before it moved to 16): distill, distill on
# the noised-data starts (--chain-starts 0, the preset before chains; --chain-starts p costs (1 - p) x that + p x
# the chains, per phase) and --chain-steps all
# With --late-guidance != 1 a drawn step still costs one solve, but --chain-steps all needs one per guidance
# (step 0's w and the later steps' own); the toy's chain-all options keep one w (--late-guidance 1).
COUNTED = {**RECIPES, "distill --chain-steps all": named_recipe("distill", chain_steps="all"),
           "distill --chain-steps all --late-guidance 1": named_recipe("distill", chain_steps="all", late_guidance=1.0),
           "distill --target-steps 8": named_recipe("distill", target_steps=8),
           "distill --chain-starts 0 --target-steps 8": named_recipe("distill", chain_starts=0.0, target_steps=8),
           "distill --chain-steps all --target-steps 8 --late-guidance 1": named_recipe(
               "distill", chain_steps="all", target_steps=8, late_guidance=1.0)}


def fixed_start(k: int):
    """The recipe's start at grid index k (noised data, or the student's chain where the recipe's chain_starts
    is 1); w drawn as the recipe does (times --late-guidance after the first sampler step)."""
    def start(models, recipe, batch, phase, rnd):
        at = chain_start_at if recipe.chain_starts == 1 else noised_data_start_at
        w = recipe.step_guidance(draw_guidance(recipe, rnd.batch), recipe.chain_step(k))
        return at(models, recipe, batch, k, w, rnd)
    return start


def one_batch(recipe: FlashRecipe, step: int, k: int, batch: int = 2) -> dict[str, tuple[float, float]]:
    """{callable: (forwards, backwards) per sample} of batch `step` started at index k, on the tiny model."""
    torch.manual_seed(0)
    model = MMDiT(TINY).eval().requires_grad_(False)
    add_lora(model, rank=4, alpha=4.0, targets="all-linear")
    head = make_head(recipe, model, 8)
    counter = CallCounter()
    models = mmdit_flash_models(model, head, recipe, start=fixed_start(k))
    models = replace(models, **{n: counter.wrap(getattr(models, n), n) for n in NAMES})
    g = torch.Generator().manual_seed(k)
    cond = (torch.randn(batch, 5, TINY.context_dim, generator=g), torch.randn(batch, TINY.pooled_dim, generator=g))
    fb = FlashBatch(torch.randn(batch, TINY.in_channels, 8, 8, generator=g), cond,
                    tuple(torch.zeros_like(x) for x in cond), list(range(batch)))
    update = OptimizerStep(torch.optim.AdamW([*lora_parameters(model), *head.parameters()]), clip=0.0)
    flash_step(models, recipe, fb, step, 0, update)
    per = counter.per_sample(batch)
    return {n: per.get(n, (0.0, 0.0)) for n in NAMES}


def phase_counts(recipe: FlashRecipe, phase: int, cache: dict) -> dict[str, tuple[float, float]]:
    """E over k ~ pi_phase of the per-sample counts (exact: every k of the grid, weighted by its probability).
    `cache` keeps the counts per (terms switched on, k): phases weighing the same terms share them. (--chain-steps
    all draws no k: its counts are the same at every k and the sum weighs them by 1.)"""
    step = sum(recipe.phase_batches[:phase])
    on = (recipe.lambda_dmd[phase] > 0, recipe.lambda_adv[phase] > 0)
    probs = mixture_probs(recipe, phase)
    out = {n: [0.0, 0.0] for n in NAMES}
    for k in range(recipe.teacher_steps):
        # --chain-steps all: the steps it trains (a backward each) are those the phase's modes weigh
        trained = tuple(w > 0 for w in recipe.mode_weights[phase]) if recipe.chain_steps == "all" else ()
        key = (recipe.recipe, recipe.chain_starts, recipe.chain_steps, trained, on, k)
        if key not in cache:
            cache[key] = one_batch(recipe, step, k)
        for n in NAMES:
            for j in range(2):
                out[n][j] += float(probs[k]) * cache[key][n][j]
    return {n: (f, b) for n, (f, b) in out.items()}


def recipe_table(fl: dict[str, float]) -> dict[str, list[dict]]:
    table = {}
    for name, recipe in COUNTED.items():
        cache, rows = {}, []
        for phase in range(recipe.num_phases):
            per = phase_counts(recipe, phase, cache)
            tf = sample_flops(per, fl)
            rows.append({"phase": phase, "counts": per, "flops": tf, "fwd_equiv": tf / fl["forward"]})
        table[name] = rows
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="also print one JSON line with every number")
    args = p.parse_args()
    torch.set_num_threads(1)
    fl = sd3_flops()
    print(f"SD3-medium 1024^2 ({CTX_TOKENS} text tokens), TFLOPs per row: forward {fl['forward'] / 1e12:.2f}, "
          f"frozen-base backward {fl['backward'] / 1e12:.2f}, adapter forward {fl['lora_forward'] / 1e12:.3f}")
    print("\n| recipe | phase | teacher fwd | student fwd / bwd | features fwd / bwd | fwd-equiv | TFLOPs |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    table = recipe_table(fl)
    for name, rows in table.items():
        for r in rows:
            c = r["counts"]
            print(f"| {name} | {r['phase']} | {c['teacher'][0]:.2f} | {c['student'][0]:.2f} / {c['student'][1]:.2f} | "
                  f"{c['features'][0]:.2f} / {c['features'][1]:.2f} | {r['fwd_equiv']:.2f} | {r['flops'] / 1e12:.1f} |")
    base = table["flash-sd3"]
    print("\nPer training sample, the mean over the 4 phases (equal phase lengths, as the toy; the released "
          "schedule's last phase runs on, see the phase-3 column):")
    for name, rows in table.items():
        mean = sum(r["flops"] for r in rows) / len(rows)
        ratio = mean / (sum(r["flops"] for r in base) / len(base))
        last = rows[-1]["flops"] / base[-1]["flops"]
        print(f"  {name}: {mean / fl['forward']:.2f} forward-equivalents, {mean / 1e12:.1f} TFLOPs; "
              f"ratio to flash-sd3 {ratio:.3f} (phase 3: {last:.3f})")
    # --chain-steps all trains several (start point, target) pairs per row: one per student backward
    print("\nPer trained (start point, target) pair = per student backward (1 per row for the drawn starts):")
    base_pair = sum(r["flops"] / r["counts"]["student"][1] for r in base) / len(base)
    for name, rows in table.items():
        pairs = [r["counts"]["student"][1] for r in rows]
        mean = sum(r["flops"] / n for r, n in zip(rows, pairs, strict=True)) / len(rows)
        print(f"  {name}: {', '.join(f'{n:.2f}' for n in pairs)} pairs per row by phase; "
              f"{mean / fl['forward']:.2f} forward-equivalents per pair, ratio to flash-sd3 {mean / base_pair:.3f}")
    if args.json:
        print(json.dumps({"flops_per_row": fl, "recipes": table}))


if __name__ == "__main__":
    main()
