"""Flash distillation pieces (flashsd3/training/flash) against the recipe's numbers and hand derivations
(the unit checks the Flash recipe implies: gojasper/flash-diffusion `flash_diffusion_model.py`, `flash_sd3.yaml`)."""
import copy

import pytest
import torch

from flashsd3.config import TINY
from flashsd3.mmdit import MMDiT
from flashsd3.training.flash import (
    DiscriminatorHead,
    FlashBatch,
    FlashModels,
    FlashRecipe,
    StepRandom,
    disc_head_downsamples,
    discriminator_loss,
    dmd_loss,
    dmd_velocities,
    draw_start_index,
    expected_teacher_steps,
    flash_step,
    generator_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    mixture_probs,
    student_x0,
    teacher_target,
)
from flashsd3.training.loop import OptimizerStep

# the recipe's mixture table (4 decimals; from flash_sd3.yaml's MIXTURE_WEIGHTS / MIXTURE_VAR):
# P(idx) per phase at the indices listed
TABLE = {
    0: {0: 0.0, 8: 0.0, 15: 0.0532, 16: 0.3933, 17: 0.0532, 23: 0.0532, 24: 0.3933, 25: 0.0532},
    1: {0: 0.0795, 1: 0.0108, 7: 0.0323, 8: 0.2385, 16: 0.2385, 24: 0.2385},
    2: {0: 0.2020, 1: 0.0273, 8: 0.2020, 9: 0.0273, 16: 0.2020, 24: 0.2020},
    3: {0: 0.3287, 1: 0.0445, 8: 0.1643, 16: 0.1643, 23: 0.0222, 24: 0.1643},
}


@pytest.mark.parametrize("phase", range(4))
def test_mixture_matches_the_recipe_table(phase):
    p = mixture_probs(FlashRecipe(), phase)
    assert p.shape == (32,) and abs(p.sum().item() - 1) < 1e-12
    for i, want in TABLE[phase].items():
        assert abs(p[i].item() - want) < 5e-5, (phase, i)  # the table is rounded to 4 decimals
    steps = (12.0, 17.4, 19.6, 21.9)[phase]  # E[K - k], table rounded to 0.1
    assert abs(expected_teacher_steps(FlashRecipe(), phase) - steps) < 0.05


def test_start_index_draws_follow_the_mixture():
    r, g = FlashRecipe(), torch.Generator().manual_seed(0)
    draws = torch.tensor([draw_start_index(r, 3, g) for _ in range(20_000)])
    # binomial std of a 0.33 frequency over 20k draws is 0.0033: 4 sigma
    assert abs((draws == 0).double().mean().item() - 0.3287) < 0.014
    assert set(draws.tolist()) <= set(range(32))


def test_grids_phases_and_options():
    r = FlashRecipe()
    torch.testing.assert_close(r.grid()[[0, 8, 16, 24, 31, 32]],
                               torch.tensor([1.0, 0.8965, 0.7389, 0.4700, 0.00893, 0.0]), rtol=0, atol=5e-5)
    torch.testing.assert_close(r.adv_sigmas(), torch.tensor([0.0294, 0.5, 0.75, 0.9]), rtol=0, atol=5e-5)
    assert [r.phase(s) for s in (0, 2499, 2500, 4999, 5000, 7500, 10**6)] == [0, 0, 1, 1, 2, 3, 3]
    assert r.mode_indices() == (0, 8, 16, 24)
    assert FlashRecipe(mixture_modes="sampler").mode_indices() == (0, 10, 21, 31)  # sigmas 1, .8577, .6022, .0089
    assert disc_head_downsamples(128) == 4 and disc_head_downsamples(16) == 2 and disc_head_downsamples(8) == 1
    with pytest.raises(ValueError, match="--lambda-adv"):
        FlashRecipe(lambda_adv=(0, 1))
    with pytest.raises(ValueError, match="--disc-blocks"):
        FlashRecipe(disc_input="blocks")


def test_teacher_target_makes_k_to_zero_cfg_steps():
    """A constant velocity field is integrated exactly by Euler: the solve from sigma_k ends at
    x_k - sigma_k * v_cfg iff it runs to sigma 0; the model is called K - k times on [neg, cond]."""
    r, calls = FlashRecipe(teacher_steps=8), []
    c_cond, c_neg = torch.full((2, 1), 2.0, dtype=torch.float64), torch.full((2, 1), -1.0, dtype=torch.float64)

    def teacher(x, t, c):
        calls.append(t.clone())
        return c.view(-1, 1, 1, 1).expand_as(x) * torch.ones_like(x)

    grid, x = r.grid(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for k in (0, 3, 7):
        calls.clear()
        y = teacher_target(teacher, x, grid[k:], (c_cond,), (c_neg,), 5.0)
        v = -1.0 + 5.0 * (2.0 - (-1.0))  # v_neg + w (v_cond - v_neg)
        assert len(calls) == r.teacher_steps - k and all(t.shape == (4,) for t in calls)  # batched [neg, cond]
        torch.testing.assert_close(torch.stack([t[0] for t in calls]), grid[k:-1] * 1000, rtol=0, atol=0)
        # fp64 state, float32 sigma differences: Euler sums telescope to sigma_k up to float32 rounding
        torch.testing.assert_close(y, x - grid[k].double() * v, rtol=0, atol=1e-5)


def _tiny(seed):
    torch.manual_seed(seed)
    return MMDiT(TINY).double().eval()


def _cond(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 5, TINY.context_dim, generator=g, dtype=torch.float64),
            torch.randn(B, TINY.pooled_dim, generator=g, dtype=torch.float64))


def test_dmd_sgd_step_moves_x0_along_real_minus_fake():
    teacher, student = _tiny(0), _tiny(1)
    models = FlashModels(student=student, teacher=teacher, features=teacher, head=torch.nn.Identity())
    cond, uncond = _cond(3), _cond(3, seed=1)
    x0_hat = torch.randn(3, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    v_real, v_fake = dmd_velocities(models, x0_hat, sigma, noise, cond, uncond, 4.0)
    x_prime = sigma.view(-1, 1, 1, 1) * noise + (1 - sigma.view(-1, 1, 1, 1)) * x0_hat.detach()
    x0_real, x0_fake = x_prime - sigma.view(-1, 1, 1, 1) * v_real, x_prime - sigma.view(-1, 1, 1, 1) * v_fake

    loss = dmd_loss(x0_hat, v_real, v_fake)
    loss.backward()
    lr = 0.1
    delta = -lr * x0_hat.grad  # one SGD step
    for b in range(3):
        d, want = delta[b].flatten().double(), (x0_real - x0_fake)[b].flatten()
        cos = torch.dot(d, want) / (d.norm() * want.norm())
        assert cos.item() > 1 - 1e-12  # fp64 inputs: the loss is computed in fp64
        lam = 1 / ((x0_hat[b].detach() - v_real[b]).abs().mean() + 1e-5)
        expected = lr * 2 / x0_hat.numel() * lam / sigma[b] * want  # (2/numel) lambda (v_r - v_f) = .../sigma'
        torch.testing.assert_close(d, expected, rtol=1e-8, atol=0)  # x0 - sg(x0 - g) cancels ~|x0|/|g| digits


def test_lsgan_losses_and_head_shapes():
    zeros = torch.zeros(4, 25)
    assert lsgan_discriminator_loss(zeros, zeros).item() == pytest.approx(0.25)  # D outputs 1/2: equilibrium
    assert lsgan_generator_loss(zeros).item() == pytest.approx(0.25)
    big = torch.full((4, 25), 30.0)
    assert lsgan_discriminator_loss(big, -big).item() < 1e-20 and lsgan_generator_loss(big).item() < 1e-20
    head = DiscriminatorHead(16, n_down=4)
    assert head(torch.randn(2, 16, 128, 128)).shape == (2, 25)  # the recipe's 5x5 patch logits
    assert DiscriminatorHead(4, n_down=disc_head_downsamples(16))(torch.randn(3, 4, 16, 16)).shape == (3, 1)
    assert all(not isinstance(m, torch.nn.Conv2d) or m.bias is None for m in head.modules())


def test_step_random_is_shard_invariant():
    x = torch.zeros(4, 3, 2, 2)
    full = StepRandom(7, 11, 0, [0, 1, 2, 3])
    halves = StepRandom(7, 11, 0, [0, 1]), StepRandom(7, 11, 0, [2, 3])
    assert torch.equal(full.randn(x), torch.cat([h.randn(x[:2]) for h in halves]))
    vals = torch.arange(10.0)
    assert torch.equal(full.choice(vals), torch.cat([h.choice(vals) for h in halves]))
    assert not torch.equal(StepRandom(7, 12, 0, [0]).randn(x[:1]), StepRandom(7, 11, 0, [0]).randn(x[:1]))


def _copy_models():
    """Student = a trainable copy of the teacher (what the LoRA student is, without adapters)."""
    teacher = _tiny(0).float().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    head = DiscriminatorHead(TINY.out_channels, n_down=1, width=8)
    return FlashModels(student=student, teacher=teacher, features=teacher, head=head), teacher, student, head


def _batch(B=2):
    g = torch.Generator().manual_seed(3)
    cond = tuple(c.float() for c in _cond(B))
    uncond = tuple(torch.zeros_like(c) for c in cond)
    return FlashBatch(torch.randn(B, 4, 8, 8, generator=g), cond, uncond, list(range(B)))


def test_student_at_init_equals_teacher_no_cfg_one_step():
    _, teacher, student, _ = _copy_models()
    b = _batch()
    sigma = torch.tensor([0.9, 0.4])
    x0 = student_x0(student, b.x0, sigma, b.cond)
    with torch.no_grad():
        want = b.x0 - sigma.view(-1, 1, 1, 1) * teacher(b.x0, sigma * 1000, *b.cond)
    torch.testing.assert_close(x0, want, rtol=0, atol=0)


def test_updates_touch_only_their_own_parameters():
    models, teacher, student, head = _copy_models()
    recipe = FlashRecipe(teacher_steps=4, phase_batches=(0, 0, 0), guidance_min=2.0, guidance_max=3.0)  # phase 3
    opt_g = torch.optim.AdamW(student.parameters(), lr=1e-3)
    opt_d = torch.optim.AdamW(head.parameters(), lr=1e-3)
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in
              (("teacher", teacher), ("student", student), ("head", head))}
    batch = _batch()
    loss_g, g = generator_loss(models, recipe, batch, 0, seed=0)
    assert {"distill", "dmd", "adv", "g_total"} <= set(g.losses)
    opt_g.zero_grad()
    loss_g.backward()
    assert all(p.grad is None for p in head.parameters()) and all(p.grad is None for p in teacher.parameters())
    opt_g.step()
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in before["head"].items())
    g_grads = [None if p.grad is None else p.grad.clone() for p in student.parameters()]
    loss_d, _ = discriminator_loss(models, recipe, batch, 0, seed=0)
    opt_d.zero_grad()
    loss_d.backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad)  # D backward adds nothing to the student
               for a, p in zip(g_grads, student.parameters(), strict=True))
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    opt_d.step()
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in s_before.items())  # D step: student fixed
    assert any(not torch.equal(v, head.state_dict()[k]) for k, v in before["head"].items())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before["student"].items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before["teacher"].items())


def test_flash_step_runs_every_phase_and_is_deterministic():
    def run():
        models, _, student, head = _copy_models()
        recipe = FlashRecipe(teacher_steps=4, phase_batches=(1, 1, 1), guidance_min=2.0, guidance_max=3.0)
        update = OptimizerStep(torch.optim.AdamW([*student.parameters(), *head.parameters()], lr=1e-3), clip=0.0)
        return [flash_step(models, recipe, _batch(), s, 0, update) for s in range(4)]

    logs = run()
    assert [log["phase"] for log in logs] == [0, 1, 2, 3]
    assert "dmd" not in logs[0] and "adv" not in logs[0] and "dmd" in logs[1] and "d" in logs[0]
    assert logs == run()


def _lora_models(recipe):
    from flashsd3.lora import add_lora
    from flashsd3.training.flash import make_head, mmdit_flash_models

    model = _tiny(0).float().requires_grad_(False)
    torch.manual_seed(5)
    add_lora(model, rank=4, alpha=4.0, targets="all-linear")
    head = make_head(recipe, model, 8)
    return model, head, mmdit_flash_models(model, head, recipe)


def test_lora_student_at_init_is_the_teacher_and_steps_touch_only_their_own():
    from flashsd3.lora import lora_parameters

    recipe = FlashRecipe(teacher_steps=4, phase_batches=(0, 0, 0), guidance_min=2.0, guidance_max=3.0)
    model, head, models = _lora_models(recipe)
    b = _batch()
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        want = b.x0 - sigma.view(-1, 1, 1, 1) * models.teacher(b.x0, sigma * 1000, *b.cond)
    torch.testing.assert_close(student_x0(models.student, b.x0, sigma, b.cond), want, rtol=0, atol=0)  # B = 0
    lora, base = lora_parameters(model), [p for p in model.parameters() if not p.requires_grad]
    opt_g, opt_d = torch.optim.AdamW(lora, lr=1e-2), torch.optim.AdamW(head.parameters(), lr=1e-2)
    def snap(ps):
        return [p.detach().clone() for p in ps]

    base0, lora0, head0 = snap(base), snap(lora), snap(head.parameters())
    loss, _ = generator_loss(models, recipe, b, 0, seed=1)
    loss.backward()
    assert all(p.grad is None for p in head.parameters()) and all(p.grad is None for p in base)
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    assert all(torch.equal(a, p) for a, p in zip(head0, head.parameters(), strict=True))
    lora1 = snap(lora)
    loss, _ = discriminator_loss(models, recipe, b, 0, seed=1)
    loss.backward()
    assert all(p.grad is None for p in lora)
    opt_d.step()
    assert all(torch.equal(a, p) for a, p in zip(lora1, lora, strict=True))
    assert all(torch.equal(a, p) for a, p in zip(base0, base, strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(lora0, lora, strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(head0, head.parameters(), strict=True))


def test_mid_block_features_option():
    recipe = FlashRecipe(teacher_steps=4, phase_batches=(0, 0, 0), guidance_min=2.0, guidance_max=3.0,
                         disc_input="blocks", disc_blocks=(0, 1))
    from flashsd3.lora import lora_parameters

    model, head, models = _lora_models(recipe)
    b = _batch()
    feats = models.features(b.x0, torch.full((2,), 500.0), *b.cond)
    assert feats.shape == (2, 2 * TINY.hidden_size, 4, 4)  # two blocks' image tokens on the 4x4 token grid
    assert head(feats).shape == (2, 1)
    logs = flash_step(models, recipe, b, 0, 0,
                      OptimizerStep(torch.optim.AdamW([*lora_parameters(model), *head.parameters()]), clip=0.0))
    assert logs["grad_norm"] > 0 and logs["grad_norm_d"] > 0 and "adv" in logs  # G gradient through the blocks


@pytest.mark.slow
def test_sd3_medium_shape_one_g_and_d_step_on_cpu(tmp_path):
    """One generator and one discriminator step on the SD3-medium-shaped model (random fp32 weights, flash-sd3
    LoRA r 64 alpha 8) at 256x256 on the CPU with activation checkpointing; the saved adapter has the published
    444-key layout. Prints the time of each part and the peak resident memory (run with -s)."""
    import json
    import resource
    import sys
    import time
    from argparse import Namespace
    from pathlib import Path

    from safetensors.torch import load_file

    from flashsd3.lora import save_lora
    from helpers_reference import read_tsv

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from bench_flash_step import (  # bench/bench_flash_step.py
        PartTimer,
        build,
        iteration,
    )

    args = Namespace(model="sd3-medium", resolution=256, batch=1, K=4, k=0, rank=64, alpha=8.0, checkpointing=True,
                     d_pass="reuse")
    t0 = time.perf_counter()
    model, head, recipe, batch = build(args, torch.device("cpu"), torch.float32)
    built = time.perf_counter() - t0
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    timer = PartTimer(torch.device("cpu"))
    iteration(model, head, recipe, batch, args, timer)  # k = 0: 4 teacher CFG calls
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    # B starts at 0, so A gets no gradient in the first step: every B moves
    assert len(before) == 444 and {n for n in before if n.endswith(".B")} <= set(moved)
    save_lora(model, tmp_path / "lora", name="default", format="peft")
    keys = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in keys.items()} == read_tsv("flash_sd3_adapter_keys.tsv")  # the published
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    print(json.dumps({"build_s": round(built, 1), "parts_s": {k: round(v, 1) for k, v in timer.times.items()},
                      "peak_rss_gib": round(peak, 2), "threads": torch.get_num_threads()}))
