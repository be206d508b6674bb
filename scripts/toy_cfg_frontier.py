"""Where fd_data and fd_ref pull apart on a toy teacher: the teacher's many-step CFG samples at several guidance
scales, each scored against the data (fd_data) and against the reference (32 Euler steps at the reference's
scale, fd_ref 0). A student that reproduced the teacher at scale w exactly would score that row, so the rows
say which (fd_ref, fd_data) pairs a faithful student can reach at all. With --steps below the reference's, the
rows are a few-step solve's own distance from the reference (a distill target grid's error).

    python scripts/toy_cfg_frontier.py --run results/toy/quick_seed2 --num-samples 1000 --guidance 1.5,2,2.5,3,4
    python scripts/toy_cfg_frontier.py --run T0 --steps 8 --guidance 3   # a distill target grid's own error
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # before torch loads: the committed numbers reproduce

import torch  # noqa: E402

from flashsd3.toy.evaluate import ToyEvaluator, load_classifier, make_eval_set  # noqa: E402
from flashsd3.toy.model import generate, load_teacher  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="folder holding teacher.safetensors and "
                                                            "classifier.safetensors (scripts/toy.py --out)")
    p.add_argument("--num-samples", type=int, default=2000, help="evaluation samples (scripts/toy.py: 2000, "
                                                                 "--quick 1000)")
    p.add_argument("--guidance", default="1.5,2,2.5,3,4", help="comma-separated CFG scales to score")
    p.add_argument("--reference", type=float, default=3.0, help="CFG scale of the reference (scripts/toy.py: 3)")
    p.add_argument("--steps", type=int, default=32, help="Euler steps of every row (the reference's: 32; fewer: "
                                                         "how far a distill target grid's CFG solve itself is)")
    p.add_argument("--reference-steps", type=int, default=32, help="Euler steps of the reference (scripts/toy.py: 32)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for name in ("teacher.safetensors", "classifier.safetensors"):
        if not (args.run / name).is_file():
            p.error(f"{args.run / name} does not exist (--run: a scripts/toy.py output folder)")
    try:
        scales = [float(g) for g in args.guidance.split(",")]
    except ValueError:
        p.error(f"--guidance needs comma-separated numbers, got {args.guidance!r}")
    model, text = load_teacher(args.run / "teacher.safetensors")
    evaluator = ToyEvaluator(load_classifier(args.run / "classifier.safetensors"), make_eval_set(args.num_samples))
    es = evaluator.eval_set
    evaluator.set_reference(generate(model, text, es.labels, es.noise, steps=args.reference_steps,
                                     guidance=args.reference))
    print(f"| CFG scale ({args.steps} steps) | adherence | fd_data | fd_ref | mean_chroma |")
    print("|---:|---:|---:|---:|---:|")
    t0 = time.perf_counter()
    for g in scales:
        imgs = generate(model, text, es.labels, es.noise, steps=args.steps, guidance=g)
        row = evaluator.score(imgs)
        print(f"| {g:g} | {100 * row['adherence']:.2f}% | {row['fd_data']:.1f} | {row['fd_ref']:.1f} | "
              f"{row['mean_chroma']:.4f} |", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s, {args.num_samples} samples, reference CFG {args.reference:g}, "
          f"{args.reference_steps} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
