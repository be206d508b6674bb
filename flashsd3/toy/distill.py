"""Flash Diffusion distillation of the toy teacher into a 1-4 step LoRA student, and the student rows of the table.

The method is flashsd3.training.flash unchanged (recipe, losses, one iteration, the training loop's optimizer
step); only sizes change for a CPU: pixel space (L2 distillation, no VAE/LPIPS), learnt attribute tokens with the
learnt empty prompt as the CFG negative, a guidance range around the toy's own CFG scale, shorter phases, a bigger
learning rate, and a discriminator head sized for 16x16 inputs: `TOY_FLASH = replace(FlashRecipe(), ...)`.
Options, each named: `bank` (precomputed teacher trajectories instead of noised data + live solves: not the
recipe; a start-point function, `bank_start`), `mixture_modes="sampler"` (mixture modes at the 4-step sampler's
sigmas), `disc_blocks` (intended-features discriminator).

The named recipes (training.flash.RECIPES) at the toy's sizes, `recipe_run`: `flash-sd3` is the toy's run as
above (the bank option included), `distill` the preset's values over the toy's sizes on the recipe's own start
points (noised data, live teacher solves). `recipe_rows` trains them per student seed against one teacher and
scores rows `<recipe>_seed<S>_<N>step`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from .. import rng
from ..lora import add_lora, lora_disabled, lora_parameters
from ..sampling import flash_sigmas, flow_match_sigmas, get_sampler
from ..sampling.flow_match import euler_step, loop_timesteps
from ..training.flash import (
    FlashBatch,
    FlashRecipe,
    Start,
    draw_guidance,
    draw_start_index,
    flash_step,
    make_head,
    mmdit_flash_models,
)
from ..training.flash.cost import CallCounter
from ..training.loop import OptimizerStep, lr_schedule
from .data import make_batch, random_labels, render
from .evaluate import paired_l2
from .model import load_teacher

# The toy's Flash settings: the recipe with a guidance range around the toy reference's CFG 3 (SD3: 7-13 around
# 7), a narrower head for 16x16 inputs, 4 equal phases of the default 600 batches, and one forward for G and D
# (d_pass reuse: half the teacher calls of a step, what a CPU run needs).
TOY_FLASH = replace(FlashRecipe(), guidance_min=2.0, guidance_max=4.0, phase_batches=(150, 150, 150), disc_width=32,
                    d_pass="reuse")
# Offsets from the run's seed of its generators: the adapters' A, the head's init, the batches, the bank.
LORA_SEED, HEAD_SEED, BATCH_SEED, BANK_SEED = 0, 1, 31, 77


@dataclass(frozen=True)
class ToyFlashRun:
    """A toy distillation run: the loop's sizes and the method's settings (`flash`)."""

    steps: int = 600  # batches (TOY_FLASH's phases: 4 quarters of 600; `with_steps` keeps them quarters)
    batch: int = 32
    lr: float = 1e-3  # AdamW, adapters and head (SD3 recipe: 1e-5; a 600-step toy run needs larger steps)
    lr_decay: bool = False  # the rate decays linearly to 0 over the last phase (training.loop.lr_schedule)
    weight_decay: float = 0.01  # torch's AdamW default, as the recipe
    rank: int = 32  # LoRA on every linear of the toy MMDiT (width 128); scale alpha / rank = 1
    alpha: float = 32.0
    bank: int = 0  # 0 = the recipe's start points; N = a bank of N teacher CFG trajectories (option)
    probe: int = 64  # fixed prompts/noises whose 1-step paired L2 to the reference is logged
    probe_every: int = 25
    seed: int = 0
    flash: FlashRecipe = TOY_FLASH


def with_steps(run: ToyFlashRun, steps: int) -> ToyFlashRun:
    """`run` for `steps` batches, its phases the 4 equal quarters of them."""
    q = steps // 4
    return replace(run, steps=steps, flash=replace(run.flash, phase_batches=(q, q, q)))


def last_phase(run: ToyFlashRun) -> int:
    """Batches of the run's last phase (it runs on after the others)."""
    return run.steps - sum(run.flash.phase_batches)


def variants(base: ToyFlashRun, mid_blocks: tuple[int, ...] = (1, 2)) -> dict[str, ToyFlashRun]:
    """The runs of the table: the recipe, the ablation without DMD and GAN, the intended-features discriminator."""
    return {"student": base,
            "no_adv_dmd": replace(base, flash=replace(base.flash, lambda_adv=(0.0,) * 4, lambda_dmd=(0.0,) * 4)),
            "mid_features": replace(base, flash=replace(base.flash, disc_input="blocks", disc_blocks=mid_blocks))}


@dataclass
class Bank:
    """N teacher CFG Euler trajectories on the K-grid: states (N, K, C, H, W) at sigma_0..sigma_{K-1}, ends."""

    labels: torch.Tensor
    guidance: torch.Tensor  # (N,) w of each trajectory
    states: torch.Tensor
    final: torch.Tensor


@torch.no_grad()
def make_bank(model, text, recipe: FlashRecipe, n: int, generator: torch.Generator, chunk: int = 256) -> Bank:
    K = recipe.teacher_steps
    grid = flow_match_sigmas(K, recipe.shift)
    labels = random_labels(n, generator)
    lo, hi = recipe.guidance
    w = lo + (hi - lo) * torch.rand(n, generator=generator)
    x = torch.randn(n, model.config.in_channels, 16, 16, generator=generator)
    states = torch.empty(n, K, *x.shape[1:])
    for s in range(0, n, chunk):
        lab, xs, ws = labels[s:s + chunk], x[s:s + chunk], w[s:s + chunk].view(-1, 1, 1, 1)
        both = tuple(torch.cat([u, c]) for u, c in zip(text.empty(len(lab)), text(lab), strict=True))
        t = loop_timesteps(grid, xs)
        for i in range(K):
            states[s:s + chunk, i] = xs
            v_u, v_c = model(torch.cat([xs, xs]), torch.cat([t[i], t[i]]), *both).chunk(2)
            xs = euler_step(xs, v_u + ws * (v_c - v_u), grid[i], grid[i + 1])
        x[s:s + chunk] = xs
    return Bank(labels, w, states, x)


def bank_start(bank: Bank, generator: torch.Generator):
    """The bank option as a start-point function (training.flash.step.StartFn): the batch's examples are bank
    rows; k ~ pi_phase from the toy's batch generator; x_k = their stored states at k (points on teacher
    trajectories, not noised data), target = their stored ends. The recipe's own draws of k, w and the noise are
    still made (and unused), so every later draw of the pass is the recipe's."""

    def start(models, recipe: FlashRecipe, batch: FlashBatch, phase: int, rnd) -> Start:
        draw_start_index(recipe, phase, rnd.batch), draw_guidance(recipe, rnd.batch), rnd.randn(batch.x0)
        rows, k = torch.as_tensor(batch.examples), draw_start_index(recipe, phase, generator)
        final = bank.final[rows]
        return Start(k, float(bank.guidance[rows].mean()), bank.states[rows, k], lambda: final)

    return start


def _batch(run: ToyFlashRun, text, bank: Bank | None, gen: torch.Generator) -> FlashBatch:
    B, examples = run.batch, ()
    if bank is not None:
        idx = torch.randint(len(bank.labels), (B,), generator=gen)
        labels, examples = bank.labels[idx], idx.tolist()
        images = render(labels, gen)  # real data of the same prompts, for the discriminator
    else:
        images, labels = make_batch(B, gen)
    with torch.no_grad():
        cond, uncond = text(labels), text.empty(B)
    return FlashBatch(images, cond, uncond, list(range(B)), examples)


@torch.no_grad()
def flash_samples(model, text, labels: torch.Tensor, noise: torch.Tensor, steps: int, shift: float = 3.0,
                  renoise_seed: int = 4242, batch: int = 250, sampler: str = "flash") -> torch.Tensor:
    """A Flash sampler of the table (no guidance) for (N, 3) labels from (N, C, H, W) noise. `flash`: the
    re-noise of step i is drawn for all N at once from renoise_seed + i, so every row sees the same draws for
    the same sample; `flash_initial` re-noises with each sample's own starting noise."""
    run = get_sampler(sampler)
    renoise = [torch.randn(noise.shape, generator=rng.offset_generator(renoise_seed, i))
               for i in range(steps - 1)] if run.stochastic else None
    out = []
    for s in range(0, len(labels), batch):
        cond, x = text(labels[s:s + batch]), noise[s:s + batch]
        rn = x if run.same_noise else [r[s:s + batch] for r in renoise]
        out.append(run.run(lambda x, t, c=cond: model(x, t, *c), x, flash_sigmas(steps, shift), rn, None))
    return torch.cat(out)


def distil(teacher_path, run: ToyFlashRun, *, probe_labels: torch.Tensor, probe_noise: torch.Tensor,
           probe_ref: torch.Tensor, bank: Bank | None = None, log=print, counter: CallCounter | None = None):
    """Distil a LoRA student from the teacher file; returns (model with adapters, text, history of scalars).
    probe_*: fixed prompts, noises and the reference's samples for the logged 1-step paired L2; `counter`
    records the model calls of the iterations."""
    if bank is not None and run.flash.chain_starts > 0:
        raise ValueError("the bank option replaces the recipe's start points: it does not take --chain-starts")
    model, text = load_teacher(teacher_path)
    model.requires_grad_(False)
    text.requires_grad_(False)
    add_lora(model, rank=run.rank, alpha=run.alpha, targets="all-linear",
             generator=rng.offset_generator(run.seed, LORA_SEED))
    with rng.seeded(run.seed + HEAD_SEED):
        head = make_head(run.flash, model, probe_noise.shape[-1])
    gen = rng.offset_generator(run.seed, BATCH_SEED)
    start = {"start": bank_start(bank, gen)} if bank is not None else {}
    models = mmdit_flash_models(model, head, run.flash, **start)
    if counter is not None:  # count the iteration's model calls (training.flash.cost)
        models = replace(models, **{n: counter.wrap(getattr(models, n), n) for n in ("student", "teacher", "features")})
    optimizer = torch.optim.AdamW([*lora_parameters(model), *head.parameters()], lr=run.lr,
                                  weight_decay=run.weight_decay)
    update, history, t0 = OptimizerStep(optimizer, clip=0.0), [], time.perf_counter()
    for step in range(run.steps):
        for group in optimizer.param_groups:
            group["lr"] = run.lr * lr_schedule(step, run.steps, decay=last_phase(run) if run.lr_decay else 0)
        batch = _batch(run, text, bank, gen)
        logs = flash_step(models, run.flash, batch, step, run.seed, update)
        logs = {"step": step, "g_total": logs.pop("loss"), **logs}
        if step % run.probe_every == 0 or step == run.steps - 1:
            one = flash_samples(model, text, probe_labels, probe_noise, 1, run.flash.shift)
            logs["probe_paired_l2"] = paired_l2(one, probe_ref)
            log(f"  step {step} phase {logs['phase']} k {logs['k']:2d} distill {logs['distill']:.4f} "
                f"dmd {logs.get('dmd', 0):.4f} adv {logs.get('adv', 0):.3f} d {logs.get('d', 0):.3f} "
                f"probe 1-step paired L2 {logs['probe_paired_l2']:.4f} ({time.perf_counter() - t0:.0f}s)")
        history.append(logs)
    return model, text, history


def teacher_no_adapter_samples(model, text, labels, noise, steps: int, shift: float) -> torch.Tensor:
    """student_init: the Flash sampler on the model with its adapters off (B = 0 at init: the same model)."""
    with lora_disabled(model):
        return flash_samples(model, text, labels, noise, steps, shift)


STUDENT_ROWS = {  # row -> (run, Flash steps); student_init is the model with its adapters off
    "student_init": ("student", 4),
    "student_1": ("student", 1),
    "student_2": ("student", 2),
    "student_4": ("student", 4),
    "student_4_no_adv_dmd": ("no_adv_dmd", 4),
    "student_4_mid_features": ("mid_features", 4),
}
ROW_NOTES = {
    "student_init": "student at init = teacher, Flash sampler 4 steps, no CFG",
    "student_1": "student, Flash sampler 1 step",
    "student_2": "student, Flash sampler 2 steps",
    "student_4": "student, Flash sampler 4 steps",
    "student_4_no_adv_dmd": "ablation: distillation loss only (no DMD, no GAN), 4 steps",
    "student_4_mid_features": "discriminator on teacher blocks' image tokens (intended), 4 steps",
}


def student_rows(teacher_path, evaluator, ref_images: torch.Tensor, base: ToyFlashRun, *,
                 log=print, keep: dict | None = None) -> tuple[dict, dict, dict, dict]:
    """Distil the three variants and score the student rows on the evaluator's set (its prompts and noise).
    Returns (rows, images, histories per run, wall seconds per part); `keep` receives {variant: (model, text)}."""
    es, walls = evaluator.eval_set, {}
    n_probe = base.probe
    probe_labels, probe_noise = es.labels[:n_probe], es.noise[:n_probe]
    probe_ref = ref_images[:n_probe]
    bank = None
    if base.bank:
        t0 = time.perf_counter()
        model, text = load_teacher(teacher_path)
        bank = make_bank(model, text, base.flash, base.bank, rng.offset_generator(base.seed, BANK_SEED))
        walls["bank"] = time.perf_counter() - t0
        log(f"bank of {base.bank} teacher trajectories (K={base.flash.teacher_steps}) in {walls['bank']:.0f}s")
    models, histories = {}, {}
    for name, run in variants(base).items():
        t0 = time.perf_counter()
        log(f"distilling {name}: {run}")
        model, text, histories[name] = distil(teacher_path, run, probe_labels=probe_labels,
                                              probe_noise=probe_noise, probe_ref=probe_ref, bank=bank, log=log)
        models[name] = (model, text)
        if keep is not None:
            keep[name] = (model, text)
        walls[f"distil_{name}"] = time.perf_counter() - t0
    rows, images = {}, {}
    t0 = time.perf_counter()
    for row, (run, steps) in STUDENT_ROWS.items():
        model, text = models[run]
        if row == "student_init":
            images[row] = teacher_no_adapter_samples(model, text, es.labels, es.noise, steps, base.flash.shift)
        else:
            images[row] = flash_samples(model, text, es.labels, es.noise, steps, base.flash.shift)
        rows[row] = {**evaluator.score(images[row]), "steps": steps, "guidance": 0.0, "nfe": steps,
                     "sampler": "flash", "paired_l2": paired_l2(images[row], ref_images)}
        log(f"{row}: adherence {rows[row]['adherence']:.3f} fd_data {rows[row]['fd_data']:.2f} "
            f"fd_ref {rows[row]['fd_ref']:.2f} paired_l2 {rows[row]['paired_l2']:.4f}")
    walls["student_eval"] = time.perf_counter() - t0
    return rows, images, histories, walls


def plot_histories(histories: dict, recipe: ToyFlashRun, out, smooth) -> list[str]:
    """Loss curves per run (distillation, DMD, adversarial, discriminator with its 0.25 LSGAN equilibrium, the
    probe's 1-step paired L2); phases are the 4 equal quarters of the x axis. Returns the file names."""
    from .plots import line_plot

    names = []
    for run, hist in histories.items():
        series = {key: [h.get(key, 0.0) for h in hist] for key in ("distill", "dmd", "adv")}
        series = {f"{k} (25-step mean)": smooth(v, 25) for k, v in series.items() if any(v)}
        line_plot(series, out / f"flash_{run}_losses.png", log_y=True,
                  title=f"{run}: generator losses, phases = x quarters ({recipe.steps // 4} steps each)")
        d = [h["d"] for h in hist if "d" in h]  # none when no phase weighs the adversarial term
        if d:
            line_plot({"L_D (25-step mean)": smooth(d, 25), "0.25 (LSGAN equilibrium)": [0.25] * len(d)},
                      out / f"flash_{run}_discriminator.png", log_y=False, title=f"{run}: discriminator loss")
        probe = [h["probe_paired_l2"] for h in hist if "probe_paired_l2" in h]
        line_plot({"1-step paired L2 to the reference": probe}, out / f"flash_{run}_paired_l2.png", log_y=True,
                  xlabel=f"probe (every {recipe.probe_every} steps)", title=f"{run}: student 1-step paired L2")
        names += [f"flash_{run}_{p}.png" for p in ("losses", "discriminator", "paired_l2") if d or p != "discriminator"]
    return names


def target_checks(rows: dict) -> dict[str, dict]:
    """The targets set for student_4 against the reference (teacher_cfg_ref) and teacher 4-step CFG."""
    ref, s4, t4 = rows["teacher_cfg_ref"], rows["student_4"], rows["teacher_4_cfg"]
    return {
        "fd_data within 1.5x the reference's": {"value": s4["fd_data"], "bound": 1.5 * ref["fd_data"],
                                                "ok": s4["fd_data"] <= 1.5 * ref["fd_data"]},
        "adherence within 5 points of the reference's": {
            "value": 100 * s4["adherence"], "bound": 100 * ref["adherence"] - 5,
            "ok": abs(s4["adherence"] - ref["adherence"]) <= 0.05},
        "fd_data below teacher 4-step CFG's (8 calls)": {"value": s4["fd_data"], "bound": t4["fd_data"],
                                                         "ok": s4["fd_data"] < t4["fd_data"]},
    }


def flash_markdown(rows: dict, recipe: ToyFlashRun, walls: dict, plots: list[str]) -> str:
    checks = target_checks(rows)
    check_md = "\n".join(f"| {name} | {c['value']:.2f} | {c['bound']:.2f} | {'yes' if c['ok'] else '**no**'} |"
                         for name, c in checks.items())
    start = (f"a bank of {recipe.bank} precomputed teacher CFG trajectories (option, not the recipe: start points "
             "lie on teacher trajectories, targets are their ends)" if recipe.bank else
             "data noised at sigma_k, target solved live by the teacher (the recipe)")
    wall = ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())
    lr_text = "decaying linearly to 0 over the last phase" if recipe.lr_decay else "constant"
    return f"""## Flash distillation (student rows)
- Method: `flashsd3.training.flash` (the released SD3 recipe's phases, mixture, losses and 1:1 G/D AdamW
  updates), in pixel space with L2 distillation; student = the teacher + LoRA on every linear (rank
  {recipe.rank}, alpha {recipe.alpha}); teacher = the same module with the adapters off.
- Settings: {recipe.steps} batches of {recipe.batch} (4 phases of {recipe.steps // 4}), AdamW lr {recipe.lr}
  ({lr_text}), weight decay {recipe.weight_decay}; K = {recipe.flash.teacher_steps} (shift
  {recipe.flash.shift}); guidance w ~ U{list(recipe.flash.guidance)} against the learnt empty prompt; start
  points: {start}; discriminator step (`d_pass={recipe.flash.d_pass}`); head width {recipe.flash.disc_width}.
- Rows: `student_init` is the Flash sampler (4 steps, no CFG) on the untrained student (= the teacher);
  `student_N` the distilled student with the Flash sampler at N steps; ablation `student_4_no_adv_dmd`
  (lambda_adv = lambda_dmd = 0); `student_4_mid_features` (the discriminator reads teacher blocks' image tokens).
  `paired_l2`: per-pixel mean squared difference to the reference sample from the same starting noise (the Flash
  sampler's re-noise draws are fixed per step, the same for every row).
- Wall time: {wall}.

| target (student_4) | value | bound | met |
|---|---:|---:|---|
{check_md}

The table's Frechet distances compare the student with the data; `FLASH_DIAGNOSIS.md` (when present) says why a
target is missed.

Plots: {", ".join(f"`{p}`" for p in plots)}.
"""
