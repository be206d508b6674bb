"""The toy world on a CPU: train a tiny MMDiT teacher from scratch, score its samplers, distil a Flash student.

    python scripts/toy.py --seed 0 --out runs/toy0            # the reference run (~15-40 min on 2 cores)
    python scripts/toy.py --seed 1 --out runs/quick --quick   # quick teacher, both recipes, student 0 (~14 min)
    python scripts/toy.py --teacher runs/toy0/teacher.safetensors --out runs/eval   # re-score a trained teacher
    python scripts/toy.py --seed 0 --out runs/toy0 --no-distil                # teacher rows only

Flash distillation: today's faithful student and its ablations (rows student_*, --variants), and the named
recipes (training.flash.RECIPES) per student seed (rows <recipe>_seed<S>_<N>step, flashsd3/toy/recipes.py).

Writes OUT/results.json (one entry per row), OUT/RESULTS.md, OUT/loss.png, OUT/samples_<row>.png and the
checkpoints OUT/teacher.safetensors + OUT/classifier.safetensors (not meant for git).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# MKL's conditional numerical reproducibility, read once when torch loads MKL: without it a rerun of the same
# command can pick other kernels and differ in the last bit, which thousands of AdamW steps amplify (as
# flashsd3.cli.reproducible_mkl; a value the user set is kept).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch

from flashsd3.toy import distill, recipes
from flashsd3.toy.data import NUM_CAPTIONS, caption
from flashsd3.toy.evaluate import (
    ToyEvaluator,
    accuracies,
    classify,
    load_classifier,
    make_eval_set,
    mean_chroma,
    parse_row_key,
    save_classifier,
    train_classifier,
)
from flashsd3.toy.model import generate, load_teacher, save_teacher
from flashsd3.toy.plots import image_grid, line_plot
from flashsd3.toy.train import QUICK_RECIPE, TeacherRecipe, train_teacher


@dataclass(frozen=True)
class EvalPlan:
    num_samples: int = 2000  # fixed prompts (balanced over the 48 captions) and fixed noise
    ref_steps: int = 32  # the reference: many Euler steps with CFG
    few_steps: int = 4
    guidance: float = 3.0  # CFG scale of the reference and teacher_4_cfg rows
    shift: float = 3.0  # sampling grid shift (SD3's; 4 steps -> sigmas [1, .858, .602, .009, 0])
    sweep: tuple[float, ...] = (1.5, 2.0, 4.0, 5.0)  # guidance sweep (informative, 240 other seeds, 16 steps)
    sweep_steps: int = 16
    classifier_steps: int = 1000


QUICK_PLAN = EvalPlan(num_samples=1000, sweep=(), classifier_steps=500)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="training seed (teacher init and data, classifier)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="a quicker teacher (2000 steps), 1000 evaluation samples, no "
                                                        "guidance sweep, the recipes on student seed 0 only")
    p.add_argument("--teacher", type=Path, help="reuse a trained teacher file instead of training one")
    p.add_argument("--classifier", type=Path, help="reuse a trained classifier file")
    p.add_argument("--steps", type=int, help="override the teacher's training steps")
    p.add_argument("--guidance", type=float, help="override the CFG scale of the reference rows")
    p.add_argument("--num-samples", type=int, help="override the number of evaluation samples")
    p.add_argument("--classifier-steps", type=int, help="override the classifier's training steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-distil", action="store_true", help="skip Flash distillation (teacher rows only)")
    p.add_argument("--distil-steps", type=int, help="override the distillation batches (4 phases)")
    p.add_argument("--distil-batch", type=int, help="override the distillation batch size")
    p.add_argument("--lr-decay", action="store_true", help="every distillation run's learning rate decays linearly "
                                                           "to 0 over its last phase (the distill rows always do; "
                                                           "an option for the others)")
    p.add_argument("--bank", type=int, help="distil from a bank of N precomputed teacher trajectories (an option, "
                                            "not the recipe; 0 = the recipe: noised data and live teacher solves)")
    p.add_argument("--modes", choices=("recipe", "sampler"), help="start-index mixture modes: the recipe's, or at "
                                                                  "the 4-step sampler's sigmas (an option)")
    p.add_argument("--recipes", default="flash-sd3,distill", help="named Flash recipes to run per student seed "
                                                                   "(comma-separated; default flash-sd3,distill; "
                                                                   f"also the options {', '.join(recipes.OPTIONS)})")
    p.add_argument("--student-seeds", help="student seeds of the recipe rows (comma-separated; default 0,1, "
                                           "--quick 0)")
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                   help="today's student_* rows (the faithful student and its ablations; default on, --quick off)")
    args = p.parse_args(argv)
    try:
        args.recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
        bad = [r for r in args.recipes if r not in recipes.NAMES]
        seeds = args.student_seeds or ("0" if args.quick else "0,1")
        args.student_seeds = tuple(int(x) for x in seeds.split(","))
    except ValueError:
        p.error(f"--student-seeds needs comma-separated integers, got {args.student_seeds!r}")
    if bad or any(x < 0 for x in args.student_seeds):
        p.error(f"--recipes takes {', '.join(recipes.NAMES)} and --student-seeds integers >= 0, got "
                f"{','.join(args.recipes)} / {args.student_seeds}")
    args.variants = (not args.quick) if args.variants is None else args.variants
    return args


DISTIL = distill.with_steps(distill.ToyFlashRun(batch=32, bank=1024), 400)


class Log:
    def __init__(self, path: Path):
        self.file = path.open("a")

    def __call__(self, msg: str) -> None:
        line = f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def get_classifier(args, plan: EvalPlan, log: Log):
    if args.classifier is not None:
        return load_classifier(args.classifier), 0.0
    t0 = time.perf_counter()
    clf = train_classifier(args.seed, steps=plan.classifier_steps)
    save_classifier(clf, args.out / "classifier.safetensors")
    log(f"classifier trained in {time.perf_counter() - t0:.0f}s")
    return clf, time.perf_counter() - t0


def inherited_training(args) -> tuple[list, ...]:
    """A reused teacher's training record from the run that trained it (its folder's results.json and
    loss.png), so the new RESULTS.md still shows it: (checks, training seconds), ([], 0.0) when there is none."""
    import shutil

    done = args.teacher.parent / "results.json"
    if not done.is_file():
        return [], 0.0
    if (args.teacher.parent / "loss.png").is_file() and args.teacher.parent.resolve() != args.out.resolve():
        shutil.copyfile(args.teacher.parent / "loss.png", args.out / "loss.png")
    meta = json.loads(done.read_text())["_meta"]
    return meta.get("training_checks", []), meta.get("wall_s", {}).get("teacher", 0.0)


def get_teacher(args, recipe: TeacherRecipe, evaluator: ToyEvaluator, log: Log):
    """Train (with a quick adherence check every 500 steps) or load the teacher."""
    if args.teacher is not None:
        model, text = load_teacher(args.teacher)
        return model, text, [], [], 0.0  # its training record is read at the end (inherited_training)
    es, checks = evaluator.eval_set, []
    n = min(192, es.labels.shape[0])

    def monitor(step, model, text):
        imgs = generate(model, text, es.labels[:n], es.noise[:n], steps=16, guidance=3.0)
        acc = accuracies(classify(evaluator.classifier, imgs)[1], es.labels[:n])
        checks.append({"step": step, **acc})
        log(f"  check at step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))

    result = train_teacher(recipe, args.seed, monitor=monitor, log=log)
    save_teacher(result.model, result.text, args.out / "teacher.safetensors",
                 recipe=json.dumps(asdict(recipe)), seed=str(args.seed))
    return result.model, result.text, result.losses, checks, result.wall_s


def teacher_rows(model, text, evaluator: ToyEvaluator, plan: EvalPlan, log: Log) -> tuple[dict, dict]:
    """Score the teacher's samplers; returns ({row: metrics}, {row: images})."""
    es = evaluator.eval_set
    specs = {  # row -> (steps, guidance)
        "teacher_cfg_ref": (plan.ref_steps, plan.guidance),
        "teacher_nocfg": (plan.ref_steps, 1.0),
        "teacher_4_cfg": (plan.few_steps, plan.guidance),
        "teacher_4_nocfg": (plan.few_steps, 1.0),
    }
    rows, images = {}, {}
    for name, (steps, g) in specs.items():
        t0 = time.perf_counter()
        images[name] = generate(model, text, es.labels, es.noise, steps=steps, guidance=g, shift=plan.shift)
        if name == "teacher_cfg_ref":
            evaluator.set_reference(images[name])
        nfe = steps * (2 if g > 1 else 1)
        rows[name] = {**evaluator.score(images[name]), "steps": steps, "guidance": g, "nfe": nfe,
                      "sampler": "euler", "wall_s": round(time.perf_counter() - t0, 1)}
        log(f"{name}: " + fmt_row(rows[name]))
    rows["data_heldout"] = {**evaluator.score(es.floor, es.floor_labels), "steps": 0, "guidance": 0.0,
                            "nfe": 0, "sampler": "data", "wall_s": 0.0}
    images["data_heldout"] = es.floor
    return rows, images


def guidance_sweep(model, text, evaluator: ToyEvaluator, plan: EvalPlan, log: Log) -> list[dict]:
    """Adherence vs the CFG scale at plan.sweep_steps, on 240 prompts with other noise seeds."""
    if not plan.sweep:
        return []
    gen = torch.Generator().manual_seed(777)
    labels = evaluator.eval_set.labels[:240]
    noise = torch.randn((240, *evaluator.eval_set.noise.shape[1:]), generator=gen)
    out = []
    for g in plan.sweep:
        imgs = generate(model, text, labels, noise, steps=plan.sweep_steps, guidance=g, shift=plan.shift)
        _, pred = classify(evaluator.classifier, imgs)
        out.append({"guidance": g, **accuracies(pred, labels), "mean_chroma": mean_chroma(imgs)})
        log(f"sweep guidance {g}: adherence {out[-1]['adherence']:.3f}")
    return out


def fmt_row(r: dict) -> str:
    return (f"adherence {r['adherence']:.3f} (shape {r['shape_acc']:.3f} colour {r['colour_acc']:.3f} "
            f"position {r['position_acc']:.3f}) fd_data {r['fd_data']:.2f} fd_ref {r['fd_ref']:.2f}")


ROW_NOTES = {
    "teacher_cfg_ref": "the reference: many Euler steps, CFG",
    "teacher_nocfg": "many Euler steps, no CFG",
    "teacher_4_cfg": "4 Euler steps, CFG (8 model calls)",
    "teacher_4_nocfg": "4 Euler steps, no CFG",
    "data_heldout": "held-out real data (classifier accuracy; FD floor between two data draws)",
    **distill.ROW_NOTES,
}


def results_table(rows: dict) -> str:
    lines = ["| row | NFE | adherence | shape | colour | position | fd_data | fd_ref | paired_l2 | mean_chroma "
             "| what |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if parse_row_key(name):
            continue  # the recipe rows have their own section
        l2 = f"{r['paired_l2']:.4f}" if "paired_l2" in r else ""
        lines.append(f"| `{name}` | {r['nfe']} | {100 * r['adherence']:.1f}% | {100 * r['shape_acc']:.1f}% | "
                     f"{100 * r['colour_acc']:.1f}% | {100 * r['position_acc']:.1f}% | {r['fd_data']:.2f} | "
                     f"{r['fd_ref']:.2f} | {l2} | {r.get('mean_chroma', float('nan')):.4f} | "
                     f"{ROW_NOTES.get(name, '')} |")
    return "\n".join(lines)


REPO = Path(__file__).resolve().parents[1]


def shown(arg) -> str:
    """A path inside this repository relative to its root, so a committed command or file name reproduces
    from any clone; anything else as given."""
    path = Path(str(arg))
    if path.is_absolute() and path.resolve().is_relative_to(REPO):
        return str(path.resolve().relative_to(REPO))
    return str(arg)


def write_results_md(path: Path, *, args, recipe, plan, rows, sweep, checks, walls: dict, flash_md: str = "") -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    cmd = "python scripts/toy.py " + " ".join(shlex.quote(shown(a)) for a in sys.argv[1:])
    sweep_md = "\n".join(f"| {s['guidance']} | {100 * s['adherence']:.1f}% | {100 * s['shape_acc']:.1f}% | "
                         f"{s.get('mean_chroma', float('nan')):.4f} |" for s in sweep)
    checks_md = "\n".join(f"| {c['step']} | {100 * c['adherence']:.1f}% | {100 * c['shape_acc']:.1f}% | "
                          f"{100 * c['colour_acc']:.1f}% | {100 * c['position_acc']:.1f}% |" for c in checks)
    text = f"""# Toy world: teacher results

Command: `{cmd}`
Date: {now:%Y-%m-%d %H:%M} UTC. Machine: {platform.machine()}, {platform.processor() or 'CPU'}, \
torch {torch.__version__}, {torch.get_num_threads()} threads (CPU shared with other jobs: times are wall-clock).
Wall time: total {walls['total']:.0f} s (classifier {walls['classifier']:.0f} s, teacher training \
{walls['teacher']:.0f} s, evaluation {walls['eval']:.0f} s).

## Recipe
- Data: procedural 16x16 RGB in pixel space (no VAE), one shape per image: {NUM_CAPTIONS} captions = 3 shapes x
  4 colours x 4 positions (quadrants), e.g. "{caption((0, 0, 0))}"; colour, size, position jitter, textured
  background (`flashsd3/toy/data.py`). Training draws fresh batches from the seed's generator.
- Teacher: `flashsd3.mmdit.MMDiT` (depth 4, 4 heads x 32 = width 128, patch 4, 3 channels), DiT init; text as
  learnt attribute tokens (3 context tokens of 64 + pooled 192, a learnt empty row for CFG).
- Training: {json.dumps(asdict(recipe))}; flow-matching loss (`flashsd3.training.objectives`),
  caption dropout to the empty prompt, EMA weights sampled.
- Sampling: flow-matching Euler on SD3's shifted grid (shift {plan.shift}); CFG scale {plan.guidance} against the
  learnt empty prompt.
- Evaluation: {plan.num_samples} samples, prompts cycling through all captions, noise from a fixed seed
  (independent of --seed); a CNN classifier trained on procedural data ({plan.classifier_steps} steps) reads
  shape / colour / position; adherence = all three right. FD = Frechet distance of its 128-d features
  (float64) to {plan.num_samples} held-out data images (`fd_data`) and to the reference row's samples (`fd_ref`).

## Results
{results_table(rows)}

## Guidance sweep ({plan.sweep_steps} steps, 240 prompts, other noise seeds)
| guidance | adherence | shape | mean_chroma |
|---:|---:|---:|---:|
{sweep_md}

## Training checks (EMA weights, 16 Euler steps, CFG 3, first 192 eval prompts)
| step | adherence | shape | colour | position |
|---:|---:|---:|---:|---:|
{checks_md}

Plots: `loss.png` (training loss), `samples_<row>.png` (first 96 samples of each row; prompts in order
shape, colour, position cycling, as `flashsd3.toy.data.balanced_labels`).

{flash_md}"""
    path.write_text(text)


def smooth(values: list[float], window: int = 50) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def distil_recipe(args) -> distill.ToyFlashRun:
    run = DISTIL
    if args.distil_steps is not None:
        run = distill.with_steps(run, args.distil_steps)
    if args.modes is not None:
        run = replace(run, flash=replace(run.flash, mixture_modes=args.modes))
    if args.lr_decay:
        run = replace(run, lr_decay=True)
    overrides = {"batch": args.distil_batch, "bank": args.bank, "seed": args.seed}
    return replace(run, **{k: v for k, v in overrides.items() if v is not None})


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = QUICK_RECIPE if args.quick else TeacherRecipe()
    plan = QUICK_PLAN if args.quick else EvalPlan()
    if args.steps is not None:
        recipe = TeacherRecipe(**{**asdict(recipe), "steps": args.steps})
    overrides = {"guidance": args.guidance, "num_samples": args.num_samples,
                 "classifier_steps": args.classifier_steps}
    plan = EvalPlan(**{**asdict(plan), **{k: v for k, v in overrides.items() if v is not None}})
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "log.txt")
    t_start = time.perf_counter()

    classifier, t_clf = get_classifier(args, plan, log)
    evaluator = ToyEvaluator(classifier, make_eval_set(plan.num_samples))
    model, text, losses, checks, t_teacher = get_teacher(args, recipe, evaluator, log)
    t0 = time.perf_counter()
    rows, images = teacher_rows(model, text, evaluator, plan, log)
    sweep = guidance_sweep(model, text, evaluator, plan, log)
    t_eval = time.perf_counter() - t0
    flash_md, flash_walls, flash_recipe, recipe_runs = "", {}, None, {}
    if not args.no_distil:
        flash_recipe = distil_recipe(args)
        teacher_file = args.teacher or args.out / "teacher.safetensors"
        for name in rows:  # the teacher rows' paired L2 to the reference, from the same noise
            if name != "data_heldout":
                rows[name]["paired_l2"] = distill.paired_l2(images[name], images["teacher_cfg_ref"])
        trained = {}
        if args.variants:
            s_rows, s_images, histories, flash_walls = distill.student_rows(
                teacher_file, evaluator, images["teacher_cfg_ref"], flash_recipe, log=log, keep=trained)
            rows.update(s_rows)
            images.update(s_images)
            plots = distill.plot_histories(histories, flash_recipe, args.out, smooth)
            flash_md = distill.flash_markdown(rows, flash_recipe, flash_walls, plots)
            (args.out / "flash_history.json").write_text(json.dumps(histories) + "\n")
        t0 = time.perf_counter()
        reuse = {("flash-sd3", flash_recipe.seed): trained["student"]} if "student" in trained else {}
        r_rows, r_images, recipe_runs = recipes.recipe_rows(teacher_file, evaluator, flash_recipe,
                                                            recipes=args.recipes, seeds=args.student_seeds,
                                                            trained=reuse, log=log)
        flash_walls["recipes"] = time.perf_counter() - t0
        rows.update(r_rows)
        images.update(r_images)
        flash_md += "\n" + recipes.recipes_markdown(rows, recipe_runs, flash_recipe)

    for name, imgs in images.items():
        image_grid(imgs[:96], args.out / f"samples_{name}.png", columns=12)
    if losses:
        line_plot({"loss": losses, "loss (50-step mean)": smooth(losses)}, args.out / "loss.png",
                  title="teacher flow-matching loss")
    if args.teacher is not None:  # read last: the run that trained the teacher may still be scoring it
        checks, t_teacher = inherited_training(args)
    walls = {"total": time.perf_counter() - t_start, "classifier": t_clf, "teacher": t_teacher, "eval": t_eval,
             **flash_walls}
    meta = {"seed": args.seed, "quick": args.quick, "recipe": asdict(recipe), "plan": asdict(plan),
            "flash_recipe": asdict(flash_recipe) if flash_recipe else None,
            "flash_targets": distill.target_checks(rows) if args.variants and flash_recipe else None,
            "recipe_runs": recipe_runs, "distill_checks": recipes.distill_checks(rows),
            "teacher_file": shown(args.teacher or args.out / "teacher.safetensors"), "wall_s": walls,
            "guidance_sweep": sweep, "training_checks": checks}
    (args.out / "results.json").write_text(json.dumps({**rows, "_meta": meta}, indent=2) + "\n")
    write_results_md(args.out / "RESULTS.md", args=args, recipe=recipe, plan=plan, rows=rows, sweep=sweep,
                     checks=checks, walls=walls, flash_md=flash_md)
    log(f"done in {walls['total']:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
