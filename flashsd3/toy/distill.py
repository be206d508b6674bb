"""Flash Diffusion distillation of the toy teacher into a 1-4 step LoRA student, and the student rows of the table.

The method is flashsd3.training.flash unchanged (recipe, losses, one iteration); only sizes change for a CPU: pixel
space (L2 distillation, no VAE/LPIPS), learnt attribute tokens with the learnt empty prompt as the CFG negative, a
guidance range around the toy's own CFG scale, shorter phases, a bigger learning rate, and a discriminator head
sized for 16x16 inputs. Options, each named: `bank` (precomputed teacher trajectories instead of noised data + live
solves: not the recipe), `modes="sampler"` (mixture modes at the 4-step sampler's sigmas), `disc_blocks`
(intended-features discriminator).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..lora import add_lora, lora_disabled, lora_parameters
from ..sampling import flash_sigmas, flow_match_sigmas, sample_flash
from ..sampling.flow_match import euler_step, loop_timesteps
from ..training.flash import (
    BankStart,
    FlashBatch,
    FlashRecipe,
    draw_start_index,
    flash_update,
    make_head,
    mmdit_flash_models,
)
from .data import make_batch, random_labels, render
from .model import load_teacher


@dataclass(frozen=True)
class ToyFlashRecipe:
    steps: int = 600  # batches, in 4 equal phases
    batch: int = 32
    lr: float = 1e-3  # AdamW, adapters and head (SD3 recipe: 1e-5; tiny models take more, §5.3)
    weight_decay: float = 0.01  # torch's AdamW default, as the recipe
    rank: int = 32  # LoRA on every linear of the toy MMDiT (width 128); scale alpha / rank = 1
    alpha: float = 32.0
    K: int = 32  # teacher grid (the recipe's)
    shift: float = 3.0  # the toy samplers' grid shift (SD3's)
    guidance: tuple[float, float] = (2.0, 4.0)  # w ~ U: around the toy reference's CFG 3 (SD3: 7-13 around 7)
    lambda_adv: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)
    lambda_dmd: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7)
    modes: str = "recipe"
    disc_blocks: tuple[int, ...] = ()  # () = the teacher's output (released code); else these blocks' tokens
    head_width: int = 32
    d_pass: str = "reuse"  # one forward for G and D (§5.2); "fresh" = the recipe's second forward
    bank: int = 0  # 0 = the recipe; N = a bank of N teacher CFG trajectories (option)
    probe: int = 64  # fixed prompts/noises whose 1-step paired L2 to the reference is logged
    probe_every: int = 25
    seed: int = 0

    def flash_recipe(self) -> FlashRecipe:
        q = self.steps // 4
        return FlashRecipe(K=self.K, shift=self.shift, phase_batches=(q, q, q), guidance=self.guidance,
                           lambda_adv=self.lambda_adv, lambda_dmd=self.lambda_dmd, modes=self.modes,
                           disc_input="blocks" if self.disc_blocks else "output", disc_blocks=self.disc_blocks,
                           d_pass="reuse" if self.bank else self.d_pass)


def variants(base: ToyFlashRecipe, mid_blocks: tuple[int, ...] = (1, 2)) -> dict[str, ToyFlashRecipe]:
    """The runs of the table: the recipe, the ablation without DMD and GAN, the intended-features discriminator."""
    return {"student": base,
            "no_adv_dmd": replace(base, lambda_adv=(0.0,) * 4, lambda_dmd=(0.0,) * 4),
            "mid_features": replace(base, disc_blocks=mid_blocks)}


@dataclass
class Bank:
    """N teacher CFG Euler trajectories on the K-grid: states (N, K, C, H, W) at sigma_0..sigma_{K-1}, ends."""

    labels: torch.Tensor
    guidance: torch.Tensor  # (N,) w of each trajectory
    states: torch.Tensor
    final: torch.Tensor


@torch.no_grad()
def make_bank(model, text, recipe: ToyFlashRecipe, n: int, generator: torch.Generator, chunk: int = 256) -> Bank:
    grid = flow_match_sigmas(recipe.K, recipe.shift)
    labels = random_labels(n, generator)
    lo, hi = recipe.guidance
    w = lo + (hi - lo) * torch.rand(n, generator=generator)
    x = torch.randn(n, model.config.in_channels, 16, 16, generator=generator)
    states = torch.empty(n, recipe.K, *x.shape[1:])
    for s in range(0, n, chunk):
        lab, xs, ws = labels[s:s + chunk], x[s:s + chunk], w[s:s + chunk].view(-1, 1, 1, 1)
        both = tuple(torch.cat([u, c]) for u, c in zip(text.empty(len(lab)), text(lab), strict=True))
        t = loop_timesteps(grid, xs)
        for i in range(recipe.K):
            states[s:s + chunk, i] = xs
            v_u, v_c = model(torch.cat([xs, xs]), torch.cat([t[i], t[i]]), *both).chunk(2)
            xs = euler_step(xs, v_u + ws * (v_c - v_u), grid[i], grid[i + 1])
        x[s:s + chunk] = xs
    return Bank(labels, w, states, x)


def _batch(recipe: ToyFlashRecipe, flash: FlashRecipe, text, bank: Bank | None, step: int, gen: torch.Generator):
    B = recipe.batch
    start = None
    if bank is not None:
        idx = torch.randint(len(bank.labels), (B,), generator=gen)
        labels = bank.labels[idx]
        images = render(labels, gen)  # real data of the same prompts, for the discriminator
        k = draw_start_index(flash, flash.phase(step), gen)
        start = BankStart(k, bank.states[idx, k], bank.final[idx], float(bank.guidance[idx].mean()))
    else:
        images, labels = make_batch(B, gen)
    with torch.no_grad():
        cond, uncond = text(labels), text.empty(B)
    return FlashBatch(images, cond, uncond, list(range(B)), start)


@torch.no_grad()
def flash_samples(model, text, labels: torch.Tensor, noise: torch.Tensor, steps: int, shift: float = 3.0,
                  renoise_seed: int = 4242, batch: int = 250) -> torch.Tensor:
    """The Flash sampler (no guidance) for (N, 3) labels from (N, C, H, W) noise; the re-noise of step i is
    drawn for all N at once from renoise_seed + i, so every row sees the same draws for the same sample."""
    renoise = [torch.randn(noise.shape, generator=torch.Generator().manual_seed(renoise_seed + i))
               for i in range(steps - 1)]
    out = []
    for s in range(0, len(labels), batch):
        cond = text(labels[s:s + batch])
        rn = [r[s:s + batch] for r in renoise]
        out.append(sample_flash(lambda x, t, c=cond: model(x, t, *c), noise[s:s + batch], flash_sigmas(steps, shift),
                                noise=rn))
    return torch.cat(out)


def paired_l2(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the per-pixel mean squared difference to the reference made from the same noise."""
    return ((images.float() - reference.float()) ** 2).flatten(1).mean(1).mean().item()


def distil(teacher_path, recipe: ToyFlashRecipe, *, probe_labels: torch.Tensor, probe_noise: torch.Tensor,
           probe_ref: torch.Tensor, bank: Bank | None = None, log=print):
    """Distil a LoRA student from the teacher file; returns (model with adapters, text, history of scalars).
    probe_*: fixed prompts, noises and the reference's samples for the logged 1-step paired L2."""
    model, text = load_teacher(teacher_path)
    model.requires_grad_(False)
    text.requires_grad_(False)
    torch.manual_seed(recipe.seed)
    add_lora(model, rank=recipe.rank, alpha=recipe.alpha, targets="all-linear")
    flash = recipe.flash_recipe()
    torch.manual_seed(recipe.seed + 1)
    head = make_head(flash, model, probe_noise.shape[-1], recipe.head_width)
    models = mmdit_flash_models(model, head, flash)
    opt_g = torch.optim.AdamW(lora_parameters(model), lr=recipe.lr, weight_decay=recipe.weight_decay)
    opt_d = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen, history, t0 = torch.Generator().manual_seed(recipe.seed + 31), [], time.perf_counter()
    for step in range(recipe.steps):
        batch = _batch(recipe, flash, text, bank, step, gen)
        logs = {"step": step, **flash_update(models, flash, batch, step, recipe.seed, opt_g, opt_d)}
        if step % recipe.probe_every == 0 or step == recipe.steps - 1:
            one = flash_samples(model, text, probe_labels, probe_noise, 1, recipe.shift)
            logs["probe_paired_l2"] = paired_l2(one, probe_ref)
            log(f"  step {step} phase {logs['phase']} k {logs['k']:2d} distill {logs['distill']:.4f} "
                f"dmd {logs.get('dmd', 0):.4f} adv {logs.get('adv', 0):.3f} d {logs['d']:.3f} "
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


def student_rows(teacher_path, evaluator, ref_images: torch.Tensor, base: ToyFlashRecipe, *,
                 log=print) -> tuple[dict, dict, dict, dict]:
    """Distil the three variants and score the student rows on the evaluator's set (its prompts and noise).
    Returns (rows, images, histories per run, wall seconds per part)."""
    es, walls = evaluator.eval_set, {}
    n_probe = base.probe
    probe_labels, probe_noise = es.labels[:n_probe], es.noise[:n_probe]
    probe_ref = ref_images[:n_probe]
    bank = None
    if base.bank:
        t0 = time.perf_counter()
        model, text = load_teacher(teacher_path)
        bank = make_bank(model, text, base, base.bank, torch.Generator().manual_seed(base.seed + 77))
        walls["bank"] = time.perf_counter() - t0
        log(f"bank of {base.bank} teacher trajectories (K={base.K}) in {walls['bank']:.0f}s")
    models, histories = {}, {}
    for name, recipe in variants(base).items():
        t0 = time.perf_counter()
        log(f"distilling {name}: {recipe}")
        model, text, histories[name] = distil(teacher_path, recipe, probe_labels=probe_labels,
                                              probe_noise=probe_noise, probe_ref=probe_ref, bank=bank, log=log)
        models[name] = (model, text)
        walls[f"distil_{name}"] = time.perf_counter() - t0
    rows, images = {}, {}
    t0 = time.perf_counter()
    for row, (run, steps) in STUDENT_ROWS.items():
        model, text = models[run]
        if row == "student_init":
            images[row] = teacher_no_adapter_samples(model, text, es.labels, es.noise, steps, base.shift)
        else:
            images[row] = flash_samples(model, text, es.labels, es.noise, steps, base.shift)
        rows[row] = {**evaluator.score(images[row]), "steps": steps, "guidance": 0.0, "nfe": steps,
                     "sampler": "flash", "paired_l2": paired_l2(images[row], ref_images)}
        log(f"{row}: adherence {rows[row]['adherence']:.3f} fd_data {rows[row]['fd_data']:.2f} "
            f"fd_ref {rows[row]['fd_ref']:.2f} paired_l2 {rows[row]['paired_l2']:.4f}")
    walls["student_eval"] = time.perf_counter() - t0
    return rows, images, histories, walls



def plot_histories(histories: dict, recipe: ToyFlashRecipe, out, smooth) -> list[str]:
    """Loss curves per run (distillation, DMD, adversarial, discriminator with its 0.25 LSGAN equilibrium, the
    probe's 1-step paired L2); phases are the 4 equal quarters of the x axis. Returns the file names."""
    from .plots import line_plot

    names = []
    for run, hist in histories.items():
        series = {key: [h.get(key, 0.0) for h in hist] for key in ("distill", "dmd", "adv")}
        series = {f"{k} (25-step mean)": smooth(v, 25) for k, v in series.items() if any(v)}
        line_plot(series, out / f"flash_{run}_losses.png", log_y=True,
                  title=f"{run}: generator losses, phases = x quarters ({recipe.steps // 4} steps each)")
        d = [h["d"] for h in hist]
        line_plot({"L_D (25-step mean)": smooth(d, 25), "0.25 (LSGAN equilibrium)": [0.25] * len(d)},
                  out / f"flash_{run}_discriminator.png", log_y=False, title=f"{run}: discriminator loss")
        probe = [h["probe_paired_l2"] for h in hist if "probe_paired_l2" in h]
        line_plot({"1-step paired L2 to the reference": probe}, out / f"flash_{run}_paired_l2.png", log_y=True,
                  xlabel=f"probe (every {recipe.probe_every} steps)", title=f"{run}: student 1-step paired L2")
        names += [f"flash_{run}_{p}.png" for p in ("losses", "discriminator", "paired_l2")]
    return names


def target_checks(rows: dict) -> dict[str, dict]:
    """The issue's targets for student_4 against the reference (teacher_cfg_ref) and teacher 4-step CFG."""
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


def flash_markdown(rows: dict, recipe: ToyFlashRecipe, walls: dict, plots: list[str]) -> str:
    checks = target_checks(rows)
    check_md = "\n".join(f"| {name} | {c['value']:.2f} | {c['bound']:.2f} | {'yes' if c['ok'] else '**no**'} |"
                         for name, c in checks.items())
    start = (f"a bank of {recipe.bank} precomputed teacher CFG trajectories (option, not the recipe: start points "
             "lie on teacher trajectories, targets are their ends)" if recipe.bank else
             "data noised at sigma_k, target solved live by the teacher (the recipe)")
    wall = ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())
    return f"""## Flash distillation (student rows)
- Method: `flashsd3.training.flash` (the released SD3 recipe's phases, mixture, losses and 1:1 G/D AdamW
  updates), in pixel space with L2 distillation; student = the teacher + LoRA on every linear (rank
  {recipe.rank}, alpha {recipe.alpha}); teacher = the same module with the adapters off.
- Settings: {recipe.steps} batches of {recipe.batch} (4 phases of {recipe.steps // 4}), AdamW lr {recipe.lr},
  weight decay {recipe.weight_decay}; K = {recipe.K} (shift {recipe.shift}); guidance w ~ U{list(recipe.guidance)}
  against the learnt empty prompt; start points: {start}; discriminator step on the generator pass's draws
  (`d_pass={recipe.d_pass if not recipe.bank else 'reuse'}`); head width {recipe.head_width}.
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
