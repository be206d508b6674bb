"""The Flash sampler's ceiling on the toy: fd_ref of a perfect student, one whose x0 at every step is the teacher's
exact CFG target (its Euler solve from the current point to 0 over the K = 32 grid points below it, guidance 3 as
the reference), with the same re-noise draws as the student rows: where a student that meets that target exactly
lands (a student aiming at another target, e.g. --chain-starts, can land below it).

    python scripts/toy_sampler_ceiling.py --run DIR [--steps 1,4] [--num-samples 2000]

DIR holds teacher.safetensors and classifier.safetensors (a scripts/toy.py output folder). Prints one JSON line.
"""
from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # before torch loads (as scripts/toy.py)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from flashsd3.sampling import cfg_denoiser, flow_match_sigmas, sample_euler  # noqa: E402
from flashsd3.toy.distill import flash_samples  # noqa: E402
from flashsd3.toy.evaluate import ToyEvaluator, load_classifier, make_eval_set  # noqa: E402
from flashsd3.toy.model import generate, load_teacher  # noqa: E402

REF_STEPS, GUIDANCE, SHIFT = 32, 3.0, 3.0  # the reference's steps and CFG, the grid shift (scripts/toy.py EvalPlan)


def perfect_velocity(model, text):
    """A student velocity whose x0 at sigma s is the teacher's CFG solve from s to 0 over the 32-grid below s:
    v = (x - x0) / s, as the Flash sampler reads a velocity."""
    grid = flow_match_sigmas(REF_STEPS, SHIFT)

    def velocity(x, t, *cond):
        sigma = float(t.flatten()[0]) / 1000
        solve = cfg_denoiser(model, cond, text.empty(len(x)), GUIDANCE)
        x0 = sample_euler(solve, x, torch.cat([torch.tensor([sigma]), grid[grid < sigma - 1e-6]]))
        return (x - x0) / sigma

    return velocity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--steps", default="1,4")
    p.add_argument("--num-samples", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(1)
    ev = ToyEvaluator(load_classifier(args.run / "classifier.safetensors"), make_eval_set(args.num_samples))
    model, text = load_teacher(args.run / "teacher.safetensors")
    es, t0 = ev.eval_set, time.perf_counter()
    with torch.no_grad():
        ev.set_reference(generate(model, text, es.labels, es.noise, steps=REF_STEPS, guidance=GUIDANCE, shift=SHIFT))
        out = {"run": str(args.run), "num_samples": args.num_samples}
        for n in (int(s) for s in args.steps.split(",")):
            # the student rows' sampler and re-noise draws (flash_samples), the perfect velocity as the model
            row = ev.score(flash_samples(perfect_velocity(model, text), text, es.labels, es.noise, n, SHIFT),
                           paired=True)
            out[f"perfect_{n}step"] = {k: round(row[k], 4) for k in ("adherence", "fd_data", "fd_ref", "paired_l2",
                                                                      "mean_chroma")}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
