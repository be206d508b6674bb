"""One toy Flash distillation run with any ToyFlashRun (or its FlashRecipe's) fields, scored on the 2000-sample
eval set: the diagnostics behind results/toy/FLASH_DIAGNOSIS.md (which loss term moves the Frechet distance,
bank vs recipe).

    python scripts/toy_flash_exp.py --run DIR '{"bank": 1024}'                          # the toy.py default
    python scripts/toy_flash_exp.py --run DIR '{"bank": 1024, "lambda_dmd": [0, 0, 0, 0]}'   # GAN only
    python scripts/toy_flash_exp.py --run DIR '{"bank": 0}'                             # the recipe's start points

DIR holds teacher.safetensors and classifier.safetensors (a scripts/toy.py output folder). Reference and
teacher-4-step samples are cached in DIR/cache/.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path

# MKL's conditional numerical reproducibility, read once when torch loads MKL: without it a rerun of the same
# command can pick other kernels and differ in the last bit, which thousands of AdamW steps amplify (as
# flashsd3.cli.reproducible_mkl; a value the user set is kept).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch

from flashsd3.toy.distill import Bank, ToyFlashRun, distil, flash_samples, make_bank, with_steps
from flashsd3.toy.evaluate import ToyEvaluator, load_classifier, make_eval_set
from flashsd3.toy.model import generate, load_teacher

# names the fields had before FlashRecipe took the flags' names (results/toy/FLASH_DIAGNOSIS.md quotes them)
RENAMED = {"K": "teacher_steps", "modes": "mixture_modes", "head_width": "disc_width"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("fields", nargs="?", default="{}", help="ToyFlashRun and FlashRecipe fields as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.run / "cache"
    cache.mkdir(exist_ok=True)
    ev = ToyEvaluator(load_classifier(args.run / "classifier.safetensors"), make_eval_set(2000))
    es, (model, text) = ev.eval_set, load_teacher(args.run / "teacher.safetensors")

    def cached(name, fn):
        f = cache / f"{name}.pt"
        if not f.exists():
            torch.save(fn(), f)
        return torch.load(f, weights_only=True)

    ref = cached("ref", lambda: generate(model, text, es.labels, es.noise, steps=32, guidance=3.0))
    ev.set_reference(ref)
    fields = json.loads(args.fields)
    values = {RENAMED.get(k, k): tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if "guidance" in values:  # the older (w_min, w_max) pair
        values["guidance_min"], values["guidance_max"] = values.pop("guidance")
    run_keys = {f.name for f in dataclass_fields(ToyFlashRun)}
    recipe = ToyFlashRun(**{k: v for k, v in values.items() if k in run_keys})
    recipe = replace(recipe, flash=replace(recipe.flash, **{k: v for k, v in values.items() if k not in run_keys}))
    if "steps" in values and "phase_batches" not in values:  # phases: the 4 quarters of the run, as by default
        recipe = with_steps(recipe, recipe.steps)
    bank = None
    if recipe.bank:
        K, guidance = recipe.flash.teacher_steps, recipe.flash.guidance
        bank = Bank(**cached(f"bank{recipe.bank}_K{K}_{guidance}",
                             lambda: make_bank(model, text, recipe.flash, recipe.bank,
                                               torch.Generator().manual_seed(77)).__dict__))
    t0 = time.perf_counter()
    student, stext, _ = distil(args.run / "teacher.safetensors", recipe, probe_labels=es.labels[:64],
                               probe_noise=es.noise[:64], probe_ref=ref[:64], bank=bank)
    out = {"fields": fields, "distil_s": round(time.perf_counter() - t0, 1)}
    for steps in (1, 4):
        images = flash_samples(student, stext, es.labels, es.noise, steps, recipe.flash.shift)
        out[f"student_{steps}"] = {k: round(v, 4) for k, v in ev.score(images, paired=True).items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
