"""Recipes (flashsd3/recipes.py): the presets against their published sources, the choice by config, overrides."""
import dataclasses

import pytest

from flashsd3.config import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, TINY
from flashsd3.recipes import RECIPES, Recipe, get_recipe, override, recipe_for
from flashsd3.sampling import SkipLayerGuidance

# Stability-AI/sd3.5 sd3_infer.py CONFIGS (commit fbf8f48), written out: shift, steps, cfg, sampler
STABILITY_CONFIGS = {
    "sd3.5-medium": (3.0, 50, 5.0, "dpmpp_2m"),
    "sd3.5-large": (3.0, 40, 4.5, "dpmpp_2m"),
    "sd3.5-large-turbo": (3.0, 4, 1.0, "euler"),
}


def test_presets_match_their_sources():
    for name, (shift, steps, cfg, sampler) in STABILITY_CONFIGS.items():
        r = RECIPES[name]
        assert (r.shift, r.steps, r.guidance, r.sampler, r.slg) == (shift, steps, cfg, sampler, None), name
    slg = RECIPES["sd3.5-medium-slg"]  # CONFIGS["sd3.5_medium"]["skip_layer_config"]
    assert (slg.sampler, slg.steps, slg.guidance, slg.shift) == ("dpmpp_2m", 50, 4.0, 3.0)
    assert slg.slg == SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, stop=0.2)
    assert (RECIPES["flash-sd3"].sampler, RECIPES["flash-sd3"].steps, RECIPES["flash-sd3"].guidance,
            RECIPES["flash-sd3"].shift) == ("flash", 4, 0.0, 3.0)  # model card + SD3 scheduler_config.json
    assert (RECIPES["sd3"].sampler, RECIPES["sd3"].steps, RECIPES["sd3"].guidance) == ("euler", 28, 7.0)


def test_recipe_for_config():
    assert recipe_for(SD3_MEDIUM).name == "sd3" and recipe_for(SD3_MEDIUM, flash=True).name == "flash-sd3"
    assert recipe_for(SD35_MEDIUM).name == "sd3.5-medium" and recipe_for(SD35_LARGE).name == "sd3.5-large"
    assert recipe_for(TINY).name == "sd3"
    assert recipe_for(dataclasses.replace(TINY, qk_norm="rms_norm", dual_attention_layers=(0,))).name == "sd3.5-medium"
    with pytest.raises(ValueError, match="Flash SD3 recipe is for SD3-medium"):
        recipe_for(SD35_LARGE, flash=True)


def test_override():
    base = get_recipe("sd3.5-medium-slg")
    assert override(base) == base
    r = override(base, steps=20, guidance=3.0, sampler="euler", skip_layer_guidance_scale=1.0)
    assert (r.steps, r.guidance, r.sampler, r.slg.scale, r.slg.layers) == (20, 3.0, "euler", 1.0, (7, 8, 9))
    assert override(base, skip_guidance_layers=[]).slg is None  # an empty list turns SLG off
    on = override(get_recipe("sd3"), skip_guidance_layers=[3, 1])
    assert on.slg == SkipLayerGuidance(layers=(1, 3), scale=2.8, start=0.01, stop=0.2)  # diffusers' defaults
    with pytest.raises(ValueError, match="skip_layer_guidance_start need skip_guidance_layers"):
        override(get_recipe("sd3"), skip_layer_guidance_start=0.1)


@pytest.mark.parametrize("kw, match", [
    ({"sampler": "dpm"}, "sampler must be one of flash, flash_initial, euler, dpmpp_2m"),
    ({"steps": 0}, "num_steps must be a positive int"),
    ({"steps": 2.0}, "num_steps must be a positive int"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"guidance": "7"}, "guidance must be a finite number"),
    ({"shift": 0.0}, "shift must be > 0"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        override(get_recipe("sd3"), **kw)


def test_lookup_errors():
    assert get_recipe(RECIPES["sd3"]) is RECIPES["sd3"]
    with pytest.raises(ValueError, match="recipe must be a Recipe or one of flash-sd3, sd3, sd3.5-medium"):
        get_recipe("sd3.5")
    assert isinstance(RECIPES["sd3"], Recipe) and RECIPES["sd3"].cfg and not RECIPES["sd3.5-large-turbo"].cfg
