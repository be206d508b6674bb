"""The named Flash recipes (training.flash.RECIPES, --recipe) on hand-made tensors: the presets' fields, the
mixture modes at the Flash sampler's sigmas, the start points and the teacher's target on the coarser grid,
and --recipe as the base that explicit settings override."""
import math
from dataclasses import replace

import pytest
import torch

from flashsd3.sampling import flash_sigmas, flow_match_sigmas
from flashsd3.training.config import flat, make_config
from flashsd3.training.flash import (
    RECIPES,
    FlashBatch,
    FlashModels,
    FlashRecipe,
    StepRandom,
    draw_guidance,
    draw_start_index,
    mixture_probs,
    named_recipe,
    noised_data_start,
)
from flashsd3.training.flash.task import FlashConfig

ZERO = (0.0, 0.0, 0.0, 0.0)


def test_presets_fields():
    assert RECIPES["flash-sd3"] == FlashRecipe()  # the released recipe is the default, field for field
    d = RECIPES["distill"]
    changed = {k for k in FlashRecipe.__dataclass_fields__ if getattr(d, k) != getattr(FlashRecipe(), k)}
    assert changed == {"recipe", "lambda_adv", "lambda_dmd", "mixture_modes", "target_steps", "chain_starts", "renoise",
                       "late_guidance"}
    assert d.late_guidance == 0.8
    assert (d.lambda_adv, d.lambda_dmd, d.mixture_modes, d.target_steps) == (ZERO, ZERO, "sampler", 16)
    assert (d.chain_starts, d.renoise, d.sampler) == (1.0, "initial", "flash_initial")
    assert d.lambda_distill == (1.0,) * 4 and d.mode_weights == FlashRecipe().mode_weights  # the recipe's phases
    assert not d.uses_discriminator() and FlashRecipe().uses_discriminator()
    assert named_recipe("distill", target_steps=0).target_steps == 0
    with pytest.raises(ValueError, match="--recipe must be one of flash-sd3, distill"):
        named_recipe("dmd2")
    with pytest.raises(ValueError, match="--target-steps must be >= 0"):
        FlashRecipe(target_steps=-1)


def test_mode_indices_are_the_grid_points_nearest_the_sampler_sigmas():
    """K = 32, shift 3: sampler sigmas 1, 0.8577, 0.6022, 0.0089 -> grid indices 0, 10, 21, 31 (grid 1, 0.8635,
    0.5905, 0.0089); 3 sampler steps (1, 0.7511, 0.0089) -> 0, 15, 31; 2 steps (1, 0.0089) -> 0, 31."""
    r = RECIPES["distill"]
    grid = r.grid()
    assert r.mode_indices() == (0, 10, 21, 31)
    expected = torch.tensor([1.0, 0.8635, 0.5905, 0.0089])
    torch.testing.assert_close(grid[[0, 10, 21, 31]], expected, rtol=0, atol=5e-5)  # literals rounded to 4 decimals
    for i, s in zip(r.mode_indices(), flash_sigmas(4, 3.0)[:-1], strict=True):
        assert (grid[:-1] - s).abs().argmin() == i
    three = replace(r, sampler_steps=3, mode_weights=((0.3, 0.3, 0.4),) * 4)
    assert three.mode_indices() == (0, 15, 31)
    assert abs(grid[15] - 0.7511) < min(abs(grid[14] - 0.7511), abs(grid[16] - 0.7511))
    assert replace(r, sampler_steps=2, mode_weights=((0.5, 0.5),) * 4).mode_indices() == (0, 31)
    assert FlashRecipe().mode_indices() == (0, 8, 16, 24)  # the released recipe's: m K / 4
    with pytest.raises(ValueError, match="--sampler-steps 3 needs as many weights"):
        replace(r, sampler_steps=3)


def test_start_indices_concentrate_at_the_modes():
    r = RECIPES["distill"]
    for phase in range(4):
        p = mixture_probs(r, phase)
        on = [m for m, w in zip(r.mode_indices(), r.mode_weights[phase], strict=True) if w > 0]
        near = sum(p[i].item() for m in on for i in range(max(m - 1, 0), min(m + 2, 32)))
        # std 0.5 index: index m +- 2 has exp(-8) = 3.4e-4 of the peak's weight; measured 1 - 4.4e-4 within m +- 1
        assert near > 1 - 1e-3, phase
        assert set(torch.topk(p, len(on)).indices.tolist()) == set(on), phase
    # phase 0 weighs only the low-noise modes (21, 31): indices 0 and 10 get their Gaussian tails alone,
    # exp(-2 * 11^2) ~ 1e-105 (measured 3.3e-106)
    assert mixture_probs(r, 0)[[0, 10]].sum() < 1e-100


def test_target_sigmas_on_the_coarse_grid():
    r, coarse = named_recipe("distill", target_steps=8), flow_match_sigmas(8, 3.0)
    grid = r.grid()
    torch.testing.assert_close(r.target_sigmas(10), torch.cat([grid[10:11], coarse[3:]]), rtol=0, atol=0)
    torch.testing.assert_close(r.target_sigmas(0), coarse, rtol=0, atol=0)  # sigma 1 is a point of both
    torch.testing.assert_close(r.target_sigmas(31), torch.tensor([grid[31].item(), 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(FlashRecipe().target_sigmas(10), grid[10:], rtol=0, atol=0)  # the recipe: K-grid
    assert [len(r.target_sigmas(k)) - 1 for k in r.mode_indices()] == [8, 6, 4, 1]  # CFG calls per target
    preset = RECIPES["distill"]  # the preset's 16-step grid
    torch.testing.assert_close(preset.target_sigmas(0), flow_match_sigmas(16, 3.0), rtol=0, atol=0)
    assert [len(preset.target_sigmas(k)) - 1 for k in preset.mode_indices()] == [16, 12, 6, 1]  # 0.8635, 0.8577, ...


@pytest.mark.parametrize("name", ["flash-sd3", "distill"])
def test_start_point_is_the_data_noised_at_the_drawn_index_and_its_target_the_cfg_solve(name):
    """A constant-velocity teacher: Euler is exact, so the target is x_k - sigma_k v_cfg whatever the grid;
    x_k = (1 - sigma_k) x0 + sigma_k e with k, w and e the pass's own draws; one CFG call per solver step."""
    recipe, calls = RECIPES[name], []

    def teacher(x, t, c):
        calls.append(len(x))
        return c.view(-1, 1, 1, 1) * torch.ones_like(x)

    B = 3
    x0 = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = (torch.full((B,), 2.0),), (torch.full((B,), -1.0),)
    models = FlashModels(student=None, teacher=teacher, features=None, head=None)
    batch, late = FlashBatch(x0, cond, uncond, ids=[5, 6, 7]), set()
    for phase, step in enumerate((0, 2500, 5000, 7500)):
        start = noised_data_start(models, recipe, batch, phase, StepRandom(11, step, 0, batch.ids))
        again = StepRandom(11, step, 0, batch.ids)
        k, drawn = draw_start_index(recipe, phase, again.batch), draw_guidance(recipe, again.batch)
        w = drawn if recipe.chain_step(k) == 0 else recipe.late_guidance * drawn  # distill: 0.8 w after step 0
        s = recipe.grid()[k]
        assert (start.k, start.guidance) == (k, w)
        late.add(w != drawn)
        torch.testing.assert_close(start.x_k, (1 - s) * x0 + s * again.randn(x0), rtol=0, atol=0)  # same ops
        calls.clear()
        v = -1.0 + w * (2.0 - (-1.0))
        # an up-to-16-step float32 Euler solve of a constant velocity vs its closed form, |x| <= 40 (ulp 3.8e-6):
        # measured 3.8e-6 (1 ulp), asserted at 1e-5 (2.6 ulp; these fixed inputs never reach the worst case of
        # a half-ulp rounding per step)
        torch.testing.assert_close(start.target(), start.x_k - s * v, rtol=0, atol=1e-5)
        assert calls == [2 * B] * (len(recipe.target_sigmas(k)) - 1)  # batched [neg, cond]
    assert late == ({False} if name == "flash-sd3" else {False, True})  # distill: these draws reach steps 0 and 2+


def test_late_guidance_scales_the_targets_after_the_first_sampler_step():
    r = named_recipe("distill")
    assert (r.late_guidance, FlashRecipe().late_guidance) == (0.8, 1.0)
    assert [r.step_guidance(2.5, j) for j in range(4)] == [2.5, 2.0, 2.0, 2.0]
    assert [FlashRecipe().step_guidance(3.0, j) for j in range(4)] == [3.0] * 4  # one w: the released recipe
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=f"--late-guidance must be a finite factor > 0, got {bad}"):
            named_recipe("distill", late_guidance=bad)


def test_a_stored_config_from_before_a_setting_existed_keeps_its_run(tmp_path):
    """config.json of a distill run saved before --chain-starts / --renoise / --late-guidance existed: a resume and
    a checkpoint's check read it as the run it was (noised-data starts, fresh re-noise, one w), not as today's
    preset; a stored value wins over the table."""
    from flashsd3.training.config import ADDED_SETTINGS, config_differences, resumed_config

    cfg = make_config(FlashConfig, ({"cache": "c", "out": str(tmp_path), "recipe": "distill"}, None))
    old = {k: v for k, v in flat(cfg).items() if k not in ADDED_SETTINGS}
    back = resumed_config(FlashConfig, old, {}, tmp_path)
    assert back.recipe == replace(cfg.recipe, chain_starts=0.0, renoise="fresh", late_guidance=1.0)
    assert config_differences(FlashConfig, back, old) == []
    assert "--late-guidance 1.0 (this run: 0.8)" in config_differences(FlashConfig, cfg, old)
    assert resumed_config(FlashConfig, flat(cfg), {}, tmp_path).recipe == cfg.recipe  # stored values kept


def test_recipe_setting_is_the_base_that_other_settings_override():
    base = {"cache": "c", "out": "o"}
    cfg = make_config(FlashConfig, (base, None))
    assert cfg.recipe == RECIPES["flash-sd3"]
    cfg = make_config(FlashConfig, ({**base, "recipe": "distill"}, "run.toml"), ({"target_steps": 24}, None))
    assert cfg.recipe == named_recipe("distill", target_steps=24)
    cfg = make_config(FlashConfig, ({**base, "lambda_dmd": [0, 0.1, 0.1, 0.1]}, None), ({"recipe": "distill"}, None))
    assert cfg.recipe == named_recipe("distill", lambda_dmd=(0.0, 0.1, 0.1, 0.1))  # the file's value stays
    saved = {k: v for k, v in flat(cfg).items() if k != "command"}  # config.json gives the same run back
    assert make_config(FlashConfig, (saved, "config.json")) == cfg
    with pytest.raises(ValueError, match="--recipe must be one of flash-sd3, distill, got 'fast'"):
        make_config(FlashConfig, ({**base, "recipe": "fast"}, None))


def test_recipe_flag_help_says_flags_override():
    from flashsd3.training.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["flash"]
    action = next(a for a in sub._actions if "--recipe" in a.option_strings)
    assert action.choices == ("flash-sd3", "distill") and "override" in action.help
