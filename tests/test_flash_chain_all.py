"""--chain-steps all (training/flash/step.chain_all_loss) on hand-made callables: one teacher solve from z, every
sampler step of the student's chain regressed onto it, weighted by the probability the drawn chain start gives
that step; the points and the target are the drawn chain start's (chain_start_at), bitwise; the calls it costs."""
import math
import sys
from dataclasses import replace

import pytest
import torch

from flashsd3.training.flash import (
    FlashModels,
    StepRandom,
    chain_all_loss,
    chain_start_at,
    distill_l2,
    draw_guidance,
    flash_step,
    named_recipe,
    student_x0,
)
from test_flash_chain import SEED, Recorder, _batch, counted_models

ALL = named_recipe("distill", chain_steps="all")


def test_step_weights_are_the_mixture_mass_per_mode_written_out():
    """Modes 0, 10, 21, 31 of a 32-grid, std 0.5: mode j's mass is w_j times its Gaussian summed over the grid
    (half cut at both ends); the other modes' tails reach across 5+ indices, below float64's resolution of it."""
    mus, grid = (0, 10, 21, 31), range(32)
    assert ALL.mode_indices() == mus
    for phase, w in enumerate(ALL.mode_weights):
        mass = [w[j] * sum(math.exp(-((i - mu) ** 2) / (2 * 0.5**2)) for i in grid) for j, mu in enumerate(mus)]
        got = ALL.chain_step_weights(phase)
        # float64 (eps = 2^-52): the total is 4 normalised terms summed, <= 4 roundings of half an eps each, so
        # 2 eps bounds it (measured 0); per step, the same masses summed in another order: measured <= 1.3 eps,
        # asserted at 2 eps. A mode weighted 0 keeps only the other modes' tails on its indices, at least 6 away
        # (indices 6..15 and 16..26 lie nearest modes 10 and 21): <= exp(-6^2 / (2 * 0.5^2)) = exp(-72) of the
        # total (measured 2.2e-32 against 5.4e-32), with 2 eps for its own roundings
        eps2 = 2 * sys.float_info.epsilon
        assert math.isclose(sum(got), 1.0, rel_tol=eps2)
        for j in range(4):
            if w[j] == 0:
                assert got[j] <= math.exp(-72) * (1 + eps2), (phase, j, got)
            else:
                assert math.isclose(got[j], mass[j] / sum(mass), rel_tol=eps2), (phase, j, got)


@pytest.mark.parametrize("phase", [0, 3])
@pytest.mark.parametrize("renoise", ["initial", "fresh"])
@pytest.mark.parametrize("late", [1.0, 0.75])
def test_loss_is_the_weighted_sum_over_the_drawn_chain_starts(phase, renoise, late):
    """Each step's point and target equal the drawn chain start at that step's mode (same z, the same w: the
    drawn one at step 0, late_guidance times it after) bitwise; the loss is sum_j P_j L2(x0_j, y_j) over the
    steps whose mode the phase weighs, summed in step order."""
    recipe, batch, step = replace(ALL, renoise=renoise, late_guidance=late), _batch(), 7
    student, teacher = Recorder(), Recorder()
    models = FlashModels(student=student, teacher=teacher, features=None, head=None)
    loss, _, w = chain_all_loss(models, recipe, batch, phase, StepRandom(SEED, step, 0, batch.ids))
    assert w == draw_guidance(recipe, StepRandom(SEED, step, 0, batch.ids).batch)
    trained = [m > 0 for m in recipe.mode_weights[phase]]
    assert [grad for t, _, grad in student.calls] == trained  # every step is called; grad where trained
    weights, expected = recipe.chain_step_weights(phase), torch.zeros(())
    for j, mode in enumerate(recipe.mode_indices()):
        start = chain_start_at(FlashModels(student=Recorder(), teacher=Recorder(), features=None, head=None),
                               recipe, batch, mode, recipe.step_guidance(w, j), StepRandom(SEED, step, 0, batch.ids))
        assert torch.equal(student.calls[j][1], start.x_k), j  # the same chain point
        if trained[j]:
            x0 = student_x0(Recorder(), start.x_k, start.sigma.expand(len(start.x_k)).clone(), batch.cond)
            expected = expected + weights[j] * distill_l2(x0, start.target())
    assert torch.equal(loss, expected), (loss, expected)


def test_refused_without_chain_starts_or_with_dmd_or_gan():
    for changes in ({"chain_starts": 0.5}, {"lambda_dmd": (0.0, 0.3, 0.5, 0.7)}, {"lambda_adv": (0.0, 0.1, 0.3, 0.5)}):
        with pytest.raises(ValueError, match="--chain-steps all trains every chain step against one teacher solve"):
            named_recipe("distill", chain_steps="all", **changes)
    with pytest.raises(ValueError, match="--chain-steps all"):
        named_recipe("flash-sd3", chain_steps="all")
    with pytest.raises(ValueError, match="--chain-steps must be one of drawn, all, got 'some'"):
        named_recipe("distill", chain_steps="some")


@pytest.mark.parametrize("late, solves", [(1.0, (1, 1)), (0.75, (1, 2))])
def test_an_iteration_costs_one_solve_per_guidance_and_every_step(late, solves):
    """Per row: the teacher's 16-step CFG solve (32 rows) once per guidance a trained step needs (one w, or
    --late-guidance: step 0's w and the later steps' own; phase 0 trains only steps 2 and 3), 4 student
    forwards, a backward through each trained step (phase 0 weighs 2 of the 4 modes, phase 3 all of them); the
    update moves the student."""
    models, c, student, update = counted_models()
    recipe = replace(ALL, phase_batches=(1, 1, 1), late_guidance=late)
    batch, before = _batch(), [p.clone() for p in student.parameters()]
    for step, backward, n in ((0, 2.0, solves[0]), (3, 4.0, solves[1])):
        c.reset()
        logs = flash_step(models, recipe, batch, step, SEED, update)
        assert c.per_sample(3) == {"student": (4.0, backward), "teacher": (32.0 * n, 0.0)}, step
        assert logs["phase"] == step and logs["k"] == 31 and "dmd" not in logs and "grad_norm_d" not in logs
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
