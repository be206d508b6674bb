"""The chain-start option (--chain-starts, training/flash/step.chain_start) on hand-made callables: the student's
own Flash sampler chain from the pass's noise z over the sampler's sigmas, fresh re-noise from per-sample streams
keyed CHAIN, no gradient through the rollout, the target = the teacher's CFG solve from z (so at mode 0 the
recipe's start at k = 0), one coin per batch, and the calls it costs."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from flashsd3 import rng
from flashsd3.sampling import flash_sigmas
from flashsd3.training.flash import (
    FlashBatch,
    FlashModels,
    StepRandom,
    chain_start,
    draw_guidance,
    draw_start_index,
    flash_step,
    named_recipe,
    noised_data_start,
    recipe_start,
)
from flashsd3.training.flash.cost import CallCounter
from flashsd3.training.flash.step import CHAIN
from flashsd3.training.loop import OptimizerStep

# chain starts (the preset's) re-noised as the released sampler; on an 8-step target grid, which the tolerances
# and call counts below are worked out for (the preset's 16-step grid: tests/test_flash_recipes.py)
CHAIN_RECIPE = named_recipe("distill", renoise="fresh", target_steps=8)
SEED, B = 11, 3


class Recorder:
    """v(x, t, c) = 0.5 x + c: records the timesteps and inputs of each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, c):
        self.calls.append((t.clone(), x.clone(), torch.is_grad_enabled()))
        return 0.5 * x + c.view(-1, 1, 1, 1)


def _batch(ids=(5, 6, 7)):
    g = torch.Generator().manual_seed(0)
    n = len(ids)
    return FlashBatch(torch.randn(n, 2, 4, 4, generator=g), (torch.full((n,), 2.0),), (torch.full((n,), -1.0),),
                      ids=list(ids))


def _step_for(recipe, phase: int, k: int) -> int:
    """A batch step (in `phase`) whose drawn start index is k."""
    first = sum(recipe.phase_batches[:phase])
    return next(s for s in range(first, first + 500) if
                draw_start_index(recipe, phase, StepRandom(SEED, s, 0, []).batch) == k)


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_chain_visits_the_sampler_sigmas_in_order_with_fresh_keyed_noise(j):
    recipe, batch, student = CHAIN_RECIPE, _batch(), Recorder()
    models = FlashModels(student=student, teacher=None, features=None, head=None)
    step = _step_for(recipe, 3, recipe.mode_indices()[j])
    start = chain_start(models, recipe, batch, 3, StepRandom(SEED, step, 0, batch.ids))
    sigmas = flash_sigmas(4, 3.0)  # 1, 0.8577, 0.6022, 0.0089, 0
    assert start.k == recipe.mode_indices()[j] and start.sigma == sigmas[j]
    assert [float(t[0]) for t, _, _ in student.calls] == (1000 * sigmas[:j]).tolist()  # float32, as the sampler's
    assert all(len(t) == B and not grad for t, _, grad in student.calls)
    # by hand: z = the pass's per-sample noise, then x0 = x - s_i v, re-noised with the i-th draw of its stream
    again = StepRandom(SEED, step, 0, batch.ids)
    x = z = again.randn(batch.x0)
    streams = rng.sample_generators(SEED, step, 0, CHAIN, ids=batch.ids)
    draws = []
    for i in range(j):
        e = rng.randn(streams, x.shape[1:])
        draws.append(e)
        torch.testing.assert_close(student.calls[i][1], x, rtol=0, atol=0)
        x0 = x - sigmas[i] * (0.5 * x + 2.0)
        x = sigmas[i + 1] * e + (1 - sigmas[i + 1]) * x0
    torch.testing.assert_close(start.x_k, x, rtol=0, atol=0)  # the same float32 operations in the same order
    if j >= 2:  # fresh noise at each step, unlike the pass's z
        assert not torch.allclose(draws[0], draws[1]) and not torch.allclose(draws[0], z)


@pytest.mark.parametrize("j", [1, 2, 3])
def test_chain_with_renoise_initial_re_noises_with_z(j):
    """--renoise initial: every step of the rollout re-noises the student's x0 with the pass's own z (the
    flash_initial sampler), so the point is the forward process of the last x0 at s_j with z."""
    recipe, batch, student = named_recipe("distill"), _batch(), Recorder()
    assert recipe.sampler == "flash_initial" and CHAIN_RECIPE.sampler == "flash"
    models = FlashModels(student=student, teacher=None, features=None, head=None)
    step = _step_for(recipe, 3, recipe.mode_indices()[j])
    start = chain_start(models, recipe, batch, 3, StepRandom(SEED, step, 0, batch.ids))
    sigmas = flash_sigmas(4, 3.0)
    x = z = StepRandom(SEED, step, 0, batch.ids).randn(batch.x0)
    for i in range(j):
        torch.testing.assert_close(student.calls[i][1], x, rtol=0, atol=0)
        x0 = x - sigmas[i] * (0.5 * x + 2.0)
        x = sigmas[i + 1] * z + (1 - sigmas[i + 1]) * x0
    torch.testing.assert_close(start.x_k, x, rtol=0, atol=0)  # the same float32 operations in the same order
    fresh = chain_start(FlashModels(student=Recorder(), teacher=None, features=None, head=None), CHAIN_RECIPE,
                        batch, 3, StepRandom(SEED, step, 0, batch.ids))
    assert not torch.allclose(fresh.x_k, start.x_k)  # the released sampler's fresh draws are another chain
    with pytest.raises(ValueError, match="--renoise must be one of fresh, initial, got 'same'"):
        replace(CHAIN_RECIPE, renoise="same")


def test_chain_is_the_same_per_sample_on_any_shard():
    recipe, student = CHAIN_RECIPE, Recorder()
    models = FlashModels(student=student, teacher=None, features=None, head=None)
    step = _step_for(recipe, 3, recipe.mode_indices()[3])
    whole = chain_start(models, recipe, _batch((5, 6, 7)), 3, StepRandom(SEED, step, 0, [5, 6, 7]))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    parts = []
    for rows in ((0,), (1, 2)):
        ids = [5 + r for r in rows]
        b = FlashBatch(x0[list(rows)], (torch.full((len(rows),), 2.0),), (torch.full((len(rows),), -1.0),), ids=ids)
        parts.append(chain_start(models, recipe, b, 3, StepRandom(SEED, step, 0, ids)).x_k)
    torch.testing.assert_close(torch.cat(parts), whole.x_k, rtol=0, atol=0)


def test_the_target_is_the_teacher_solve_from_z_and_mode_0_is_the_data_start_at_k_0():
    """A constant-velocity teacher: the target is z - v_cfg at every mode; at k = 0 the chain start's point and
    target equal the recipe's (noised data at sigma 1 is the noise itself)."""
    recipe, batch, calls = CHAIN_RECIPE, _batch(), []

    def teacher(x, t, c):
        calls.append(float(t[0]))
        return c.view(-1, 1, 1, 1) * torch.ones_like(x)

    models = FlashModels(student=Recorder(), teacher=teacher, features=None, head=None)
    for k in recipe.mode_indices():
        step = _step_for(recipe, 3, k)
        start = chain_start(models, recipe, batch, 3, StepRandom(SEED, step, 0, batch.ids))
        again = StepRandom(SEED, step, 0, batch.ids)
        draw_start_index(recipe, 3, again.batch)
        w, z = recipe.step_guidance(draw_guidance(recipe, again.batch), recipe.chain_step(k)), again.randn(batch.x0)
        assert start.guidance == w  # the drawn w at step 0, --late-guidance (0.8) times it after
        calls.clear()
        # the target is an 8-step float32 Euler solve of a constant velocity at |x| <= 40 (ulp 3.8e-6), checked
        # against its closed form: measured 3.8e-6 (1 ulp), asserted at 1e-5 (2.6 ulp; these fixed inputs never
        # reach the 4-ulp worst case of 8 half-ulp roundings)
        torch.testing.assert_close(start.target(), z - (-1.0 + w * 3.0), rtol=0, atol=1e-5)
        assert calls == (1000 * recipe.target_sigmas(0)[:-1]).tolist()  # the 8-step solve from sigma 1
        if k == 0:
            data = noised_data_start(models, recipe, batch, 3, StepRandom(SEED, step, 0, batch.ids))
            assert (data.k, data.guidance) == (start.k, start.guidance)
            assert torch.equal(data.x_k, start.x_k) and torch.equal(data.target(), start.target())


def test_recipe_start_draws_one_coin_per_batch():
    batch, models = _batch(), FlashModels(student=Recorder(), teacher=None, features=None, head=None)

    def chained(p, step):
        recipe = named_recipe("distill", chain_starts=p)
        return recipe_start(models, recipe, batch, 3, StepRandom(SEED, step, 0, batch.ids)).sigma is not None

    steps = range(7500, 7700)
    coins = [float(torch.rand((), generator=rng.generator(SEED, s, 0, CHAIN))) for s in steps]
    assert [chained(0.5, s) for s in steps] == [c < 0.5 for c in coins]
    assert 80 < sum(c < 0.5 for c in coins) < 120
    assert all(chained(1.0, s) for s in steps[:20]) and not any(chained(0.0, s) for s in steps[:20])
    data_recipe = named_recipe("distill", chain_starts=0.0)
    data = recipe_start(models, data_recipe, batch, 3, StepRandom(SEED, 7500, 0, batch.ids))
    same = noised_data_start(models, data_recipe, batch, 3, StepRandom(SEED, 7500, 0, batch.ids))
    assert data.k == same.k and torch.equal(data.x_k, same.x_k)


def test_chain_step_and_settings():
    r = CHAIN_RECIPE
    assert [r.chain_step(k) for k in (0, 1, 9, 10, 11, 15, 16, 20, 21, 26, 27, 31)] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2,
                                                                                           3, 3]
    assert named_recipe("distill").chain_starts == 1 and named_recipe("flash-sd3").chain_starts == 0
    with pytest.raises(ValueError, match=r"--chain-starts is a probability in \[0, 1\], got 1.5"):
        named_recipe("distill", chain_starts=1.5)
    with pytest.raises(ValueError, match="--chain-starts maps one mode per sampler step: --sampler-steps 2"):
        named_recipe("flash-sd3", chain_starts=0.5, sampler_steps=2)


class Velocity(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x, t, c):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1) / 1000) + c.view(-1, 1, 1, 1)


def counted_models():
    """(models, counter, student module, update): a trainable student and a frozen teacher (Velocity, seed 0),
    both wrapped by one CallCounter, and an AdamW step on the student."""
    torch.manual_seed(0)
    teacher, student = Velocity().requires_grad_(False), Velocity()
    c = CallCounter()
    models = FlashModels(student=c.wrap(student, "student"), teacher=c.wrap(teacher, "teacher"), features=None,
                         head=None)
    return models, c, student, OptimizerStep(torch.optim.AdamW(student.parameters()), clip=0.0)


def test_a_chain_iteration_costs_j_student_forwards_without_grad_and_the_full_solve():
    models, c, _, update = counted_models()
    recipe = replace(CHAIN_RECIPE, phase_batches=(1, 1, 1))
    batch = _batch()
    for step in range(4):
        c.reset()
        logs = flash_step(models, recipe, batch, step, SEED, update)
        j = recipe.chain_step(logs["k"])
        assert logs["k"] == recipe.mode_indices()[j]
        assert c.per_sample(B) == {"student": (1.0 + j, 1.0), "teacher": (2.0 * 8, 0.0)}, step
        assert [k.grad for k in c.calls if k.name == "student"] == [False] * j + [True]  # the rollout first
