"""The named Flash recipes (training.flash.RECIPES) on the toy: one run per recipe and student seed against one
teacher, scored as rows `<recipe>_seed<S>_<N>step` (flashsd3.toy.evaluate.row_key) with adherence, fd_data,
fd_ref, paired_l2 and mean_chroma, and the issue's bounds for the distill rows against the teacher's 4-step CFG.

`flash-sd3` runs as the toy's faithful student (`distill.ToyFlashRun`, the bank option as configured); `distill`
is the preset's values (`training.flash.recipe.PRESETS`) over the toy's sizes, on the recipe's own start points
(its sampler chains, live teacher solves), never a bank, for `DISTILL.batches` times the toy's batches. The toy's named
options over a preset, `OPTIONS` (rows of their own, e.g. `distill-data_seed0_4step`), each at the toy's batches:
`distill-data` = the distill preset on noised-data starts (--chain-starts 0, the preset before chains),
`distill-chain` = chain starts re-noised with fresh noise (--renoise fresh), `distill-mix` = half of the batches
so (--chain-starts 0.5), `distill-mix25` a quarter, `distill-all` = every chain step against one teacher solve
(--chain-steps all) on 8-row batches, `distill-t8` = the distill row with the preset's earlier 8-step target
grid (the options keep that grid: their committed rows were measured on it), `distill-w245` / `distill-w240` = the
preset with w drawn around 2.45 / 2.40 instead of 3 at every step, `distill-all16` = `distill-all` on the
preset's 16-step grid, `distill-w1` = the distill row with one w for every step (the preset before
--late-guidance; every other option keeps one w too but `distill-l75`, the preset at --late-guidance 0.75).
Every row samples with its run's sampler (FlashRecipe.sampler).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from .. import rng
from ..training.config import flag
from ..training.flash.cost import CallCounter
from ..training.flash.recipe import PRESETS
from .distill import BANK_SEED, ToyFlashRun, distil, flash_samples, last_phase, make_bank, with_steps
from .evaluate import parse_row_key
from .model import load_teacher

# the distill rows' bounds (4 steps unless said): relative to the teacher's 4-step CFG row, or absolute
DISTILL_BOUNDS = {"adherence": ("min", 0.985, None), "fd_ref": ("max", 0.6, "teacher_4_cfg"),
                  "fd_data": ("max", 0.3, "teacher_4_cfg")}
ONE_STEP_FD_REF = 30.0


@dataclass(frozen=True)
class ToyRow:
    """How the toy runs a row other than flash-sd3: a preset, FlashRecipe fields over it, and the run's sizes."""

    preset: str
    fields: dict = field(default_factory=dict)  # FlashRecipe fields over the preset (flashsd3-train flags)
    # batches in units of the toy's (--distil-steps, default 400): twice, chosen when distill cost 0.45x the
    # released recipe per sample (8-step grid; the 16-step grid: 0.81x, bench/flash_cost.py)
    batches: int = 1
    # rows per batch where not the toy's: --chain-steps all trains up to 4 chain steps per row, so a quarter of
    # the rows give a batch as many trained (start point, target) pairs as distill's
    rows: int | None = None
    # the learning rate decays linearly to 0 over the run's last phase (--lr-decay-steps): the final iterate
    # settles instead of carrying a full-size step's noise (measured: RESULTS.md); else a constant rate
    decay: bool = False


DISTILL = ToyRow("distill", batches=2, decay=True)
# The toy's named options over a preset, rows of their own. Those measured when the preset solved its targets on
# an 8-step grid keep it, so their commands give back their committed rows (`distill-t8`: the distill row then).
# Those measured before the preset's --late-guidance keep one w for every step (ONE_W).
ONE_W = {"late_guidance": 1.0}
OPTIONS = {
    "distill-data": ToyRow("distill", {"chain_starts": 0.0, "renoise": "fresh", "target_steps": 8, **ONE_W}),
    "distill-chain": ToyRow("distill", {"chain_starts": 1.0, "renoise": "fresh", "target_steps": 8, **ONE_W}),
    "distill-mix": ToyRow("distill", {"chain_starts": 0.5, "renoise": "fresh", "target_steps": 8, **ONE_W}),
    "distill-mix25": ToyRow("distill", {"chain_starts": 0.25, "renoise": "fresh", "target_steps": 8, **ONE_W}),
    "distill-half": ToyRow("distill", {"chain_starts": 0.5, "target_steps": 8, **ONE_W}, batches=2),
    "distill-all": ToyRow("distill", {"chain_steps": "all", "target_steps": 8, **ONE_W}, batches=2, rows=8,
                          decay=True),
    "distill-t8": replace(DISTILL, fields={"target_steps": 8, **ONE_W}),
    "distill-all16": ToyRow("distill", {"chain_steps": "all", **ONE_W}, batches=2, rows=8, decay=True),
    # w ~ U[1.95, 2.95] / U[1.9, 2.9] at every step, means 2.45 / 2.40 below the reference's 3: the student lands
    # nearer the data (the fd_data bound) and further from the reference, at 1 step too (RESULTS.md)
    "distill-w245": replace(DISTILL, fields={"guidance_min": 1.95, "guidance_max": 2.95, **ONE_W}),
    "distill-w240": replace(DISTILL, fields={"guidance_min": 1.9, "guidance_max": 2.9, **ONE_W}),
    # the preset before --late-guidance: one w ~ U[2, 4] for every step's target
    "distill-w1": replace(DISTILL, fields=ONE_W),
    # the later steps at 0.75 w instead of the preset's 0.8 w: further from the reference, nearer the data
    # (the preset's value first measured, RESULTS.md)
    "distill-l75": replace(DISTILL, fields={"late_guidance": 0.75}),
}
ROWS = {"distill": DISTILL, **OPTIONS}
NAMES = (*PRESETS, *OPTIONS)


def preset_flags(name: str) -> str:
    """A preset's values as the flashsd3-train flags that set them, e.g. `--mixture-modes sampler --target-steps 8`."""
    def shown(v):
        return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else str(v)
    return " ".join(f"{flag(k)} {shown(v)}" for k, v in PRESETS[name].items())


def recipe_run(base: ToyFlashRun, name: str, seed: int) -> ToyFlashRun:
    """The toy run of recipe `name` for student seed `seed`: flash-sd3 = `base`; another recipe = its preset's
    values over base's sizes, on the recipe's own starts (bank 0); an OPTIONS name = its preset with its fields."""
    if name not in NAMES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(NAMES)}")
    if name == "flash-sd3":
        return replace(base, seed=seed)
    row = ROWS[name]
    flash = replace(base.flash, recipe=row.preset, **{**PRESETS[row.preset], **row.fields})
    run = replace(base, seed=seed, bank=0, flash=flash, batch=row.rows or base.batch,
                  lr_decay=row.decay or base.lr_decay)
    return with_steps(run, base.steps * row.batches) if row.batches != 1 else run


def train_recipe(teacher_path, run: ToyFlashRun, probe: tuple, *, log=print):
    """Distil one run (its bank first if it uses one); returns (model, text, history, walls, calls per sample)."""
    walls, bank = {}, None
    if run.bank:
        t0 = time.perf_counter()
        model, text = load_teacher(teacher_path)
        bank = make_bank(model, text, run.flash, run.bank, rng.offset_generator(run.seed, BANK_SEED))
        walls["bank_s"] = time.perf_counter() - t0
    counter, t0 = CallCounter(), time.perf_counter()
    model, text, history = distil(teacher_path, run, probe_labels=probe[0], probe_noise=probe[1],
                                  probe_ref=probe[2], bank=bank, log=log, counter=counter)
    walls["distil_s"] = time.perf_counter() - t0
    calls = {n: {"forward": f, "backward": b} for n, (f, b) in counter.per_sample(run.steps * run.batch).items()}
    return model, text, history, walls, calls


def recipe_rows(teacher_path, evaluator, base: ToyFlashRun, *, recipes, seeds, steps=(1, 4), trained=None,
                log=print) -> tuple[dict, dict, dict]:
    """Train every (recipe, student seed) and score its rows at each Flash step count. `trained` may hold
    {(recipe, seed): (model, text)} already distilled with recipe_run's settings (reused, not retrained).
    Returns (rows, 4-step images per row, {"<recipe>_seed<S>": walls and model calls per training sample})."""
    es, rows, images, runs = evaluator.eval_set, {}, {}, {}
    probe = (es.labels[:base.probe], es.noise[:base.probe], evaluator.reference[:base.probe])
    for name in recipes:
        for seed in seeds:
            run, tag = recipe_run(base, name, seed), f"{name}_seed{seed}"
            if trained and (name, seed) in trained:
                model, text = trained[(name, seed)]
                runs[tag] = {"reused": True}
            else:
                log(f"distilling {tag}: {run}")
                model, text, _, walls, calls = train_recipe(teacher_path, run, probe, log=log)
                runs[tag] = {**walls, "calls_per_sample": calls, "batches": run.steps, "batch": run.batch}
            for n in steps:
                imgs = flash_samples(model, text, es.labels, es.noise, n, run.flash.shift,
                                     sampler=run.flash.sampler)
                key, rows[key] = evaluator.recipe_row(imgs, recipe=name, seed=seed, steps=n, sampler=run.flash.sampler)
                if n == max(steps):
                    images[key] = imgs
                log(f"{key}: " + " ".join(f"{m} {rows[key][m]:.4f}" for m in ("adherence", "fd_data", "fd_ref",
                                                                               "paired_l2", "mean_chroma")))
    return rows, images, runs


def distill_checks(rows: dict, recipe: str = "distill") -> list[dict]:
    """The bounds on every `<recipe>_seed<S>_4step` / `_1step` row present, and on the rows of `recipe`'s
    OPTIONS: one entry per (row, bound)."""
    names = {recipe, *(n for n, row in OPTIONS.items() if row.preset == recipe)}
    out = []
    for key, row in rows.items():
        parsed = parse_row_key(key)
        if parsed is None or parsed[0] not in names:
            continue
        if parsed[2] == 4:
            for metric, (kind, value, rel) in DISTILL_BOUNDS.items():
                bound = value * rows[rel][metric] if rel else value
                ok = row[metric] <= bound if kind == "max" else row[metric] >= bound
                what = f"<= {value}x {rel}" if rel else f">= {value}"
                out.append({"row": key, "metric": metric, "value": row[metric], "bound": bound, "rule": what, "ok": ok})
        elif parsed[2] == 1:
            out.append({"row": key, "metric": "fd_ref", "value": row["fd_ref"], "bound": ONE_STEP_FD_REF,
                        "rule": f"<= {ONE_STEP_FD_REF}", "ok": row["fd_ref"] <= ONE_STEP_FD_REF})
    return out


def options_text() -> str:
    """The OPTIONS as `name` = their flags over their preset (and their batches where not the toy's)."""
    def shown(name, row):
        batches = f", {row.batches}x batches" if row.batches != 1 else ""
        batches += f" of {row.rows} rows" if row.rows else ""
        batches += ", the rate decaying over the last phase" if row.decay else ""
        return f"`{name}` = {' '.join(f'{flag(k)} {v}' for k, v in row.fields.items())}{batches}"
    return "; ".join(shown(n, row) for n, row in OPTIONS.items())


def recipes_markdown(rows: dict, runs: dict, base: ToyFlashRun) -> str:
    """The recipe rows, the distill bounds and each run's wall time and model calls, as a RESULTS.md section."""
    keys = ["teacher_cfg_ref", "teacher_4_cfg", *(k for k in rows if parse_row_key(k))]
    table = ["| row | NFE | adherence | fd_data | fd_ref | paired_l2 | mean_chroma |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| `{k}` | {rows[k]['nfe']} | {100 * rows[k]['adherence']:.2f}% | {rows[k]['fd_data']:.1f} | "
              f"{rows[k]['fd_ref']:.1f} | {rows[k].get('paired_l2', float('nan')):.4f} | "
              f"{rows[k]['mean_chroma']:.4f} |" for k in keys if k in rows]
    checks = ["| row | metric | value | bound | rule | met |", "|---|---|---:|---:|---|---|"]
    checks += [f"| `{c['row']}` | {c['metric']} | {c['value']:.4g} | {c['bound']:.4g} | {c['rule']} | "
               f"{'yes' if c['ok'] else '**no**'} |" for c in distill_checks(rows)]
    cost = ["| run | bank s | distil s | teacher fwd / sample | student fwd / bwd | features fwd / bwd |",
            "|---|---:|---:|---:|---:|---:|"]
    for tag, r in runs.items():
        if r.get("reused"):
            cost.append(f"| {tag} | (the `student` run above) | | | | |")
            continue
        c = {n: r["calls_per_sample"].get(n, {"forward": 0.0, "backward": 0.0}) for n in ("teacher", "student",
                                                                                         "features")}
        cost.append(f"| {tag} | {r.get('bank_s', 0):.0f} | {r['distil_s']:.0f} | {c['teacher']['forward']:.2f} | "
                    f"{c['student']['forward']:.2f} / {c['student']['backward']:.2f} | "
                    f"{c['features']['forward']:.2f} / {c['features']['backward']:.2f} |")
    whole = recipe_run(base, "distill", 0)
    distill_run_steps, distill_run = whole.steps, whole.flash
    return f"""## Named recipes (`--recipe`): rows `<recipe>_seed<S>_<N>step`
- `flash-sd3`: the faithful student of the section above (its settings), per student seed (the seed of the
  adapters' init, the head, the batches and the bank). `distill`: `{preset_flags('distill')}` over the same sizes:
  the distillation term only, no discriminator pass; every start on the student's own {distill_run.sampler_steps}-step
  sampler chain from z, re-noised with z itself (`--renoise {distill_run.renoise}`), pulled towards the teacher's
  live CFG solve from z (w per batch, U{list(distill_run.guidance)}, times {distill_run.late_guidance:g} for the
  sampler steps after the first: `--late-guidance`) on the {distill_run.target_steps}-step grid;
  chain steps at grid indices {distill_run.mode_indices()}; {distill_run_steps} batches ({DISTILL.batches}x the
  toy's; compute per sample: `bench/flash_cost.py`), the learning rate decaying linearly to 0 over
  the last phase ({last_phase(whole)} batches; the other rows: as the section above says); sampled with
  `{distill_run.sampler}`. Options (rows
  of their own, the toy's batches unless said): {options_text()}.
- Student seeds: {sorted({int(t.rsplit('seed', 1)[1]) for t in runs})}, one teacher; the same 2000-sample
  evaluation set (and, for the `flash` sampler, re-noise draws) as every row above. `mean_chroma`: mean over pixels of
  max(R,G,B) - min(R,G,B) in [-1, 1] units (saturation; see flashsd3/toy/evaluate.py).

{chr(10).join(table)}

Bounds on the distill rows (teacher 4-step CFG: 8 model calls):

{chr(10).join(checks)}

Wall time (one thread) and model calls per training sample counted by `training.flash.cost.CallCounter` during
the run (rows through the model: a CFG call on B rows counts 2B; the bank's precomputed solves are not in the
counts, its wall time is):

{chr(10).join(cost)}
"""

