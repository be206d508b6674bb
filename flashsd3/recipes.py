"""Sampling recipes: the published settings of each model, in one place, and the choice by model config.

Sources: Flash SD3 (jasperai/flash-sd3 model card: 4 steps, guidance_scale 0) with SD3-medium's
scheduler/scheduler_config.json (shift 3.0); SD3-medium (model card and diffusers' StableDiffusion3Pipeline
docs: 28 steps, guidance 7.0, same scheduler config); the SD3.5 family as Stability-AI/sd3.5 `sd3_infer.py`
CONFIGS defines it. Stability's reference reads the "cfg" of CONFIGS["sd3.5_medium"]["skip_layer_config"]
(4.0) into a variable it never uses afterwards, so its --skip_layer_cfg runs keep CFG 5; the recipe here
uses the 4.0 the config states.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import MMDiTConfig
from .sampling.guidance import SkipLayerGuidance
from .sampling.table import get_sampler


@dataclass(frozen=True)
class Recipe:
    """How to sample one model: the sampler, its schedule and guidance."""

    name: str
    sampler: str  # a key of flashsd3.sampling.SAMPLERS
    steps: int  # sampler steps (model calls, twice the batch with CFG)
    guidance: float  # classifier-free guidance scale; on only if > 1 (diffusers' rule)
    shift: float  # time shift of the sigma table (scheduler_config.json "shift")
    slg: SkipLayerGuidance | None = None  # skip-layer guidance, needs guidance > 1

    def __post_init__(self):
        get_sampler(self.sampler)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {self.steps!r}")
        for name in ("guidance", "shift"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift!r}")

    @property
    def cfg(self) -> bool:
        return self.guidance > 1

    def replace(self, **changes) -> Recipe:
        """A copy with the given fields changed; fields given as None keep the recipe's value."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


FLASH_SD3 = Recipe("flash-sd3", "flash", 4, 0.0, 3.0)
SD3 = Recipe("sd3", "euler", 28, 7.0, 3.0)
SD35_MEDIUM = Recipe("sd3.5-medium", "dpmpp_2m", 50, 5.0, 3.0)
SD35_MEDIUM_SLG = Recipe("sd3.5-medium-slg", "dpmpp_2m", 50, 4.0, 3.0,
                         SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, stop=0.2))
SD35_LARGE = Recipe("sd3.5-large", "dpmpp_2m", 40, 4.5, 3.0)
SD35_LARGE_TURBO = Recipe("sd3.5-large-turbo", "euler", 4, 1.0, 3.0)

RECIPES: dict[str, Recipe] = {r.name: r for r in (FLASH_SD3, SD3, SD35_MEDIUM, SD35_MEDIUM_SLG, SD35_LARGE,
                                                  SD35_LARGE_TURBO)}


def get_recipe(recipe: Recipe | str) -> Recipe:
    """A Recipe as given, or the preset of that name."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"recipe must be a Recipe or one of {', '.join(RECIPES)}, got {recipe!r}")
    return RECIPES[recipe]


def override(recipe: Recipe, *, steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
             shift: float | None = None, skip_guidance_layers=None, skip_layer_guidance_scale: float | None = None,
             skip_layer_guidance_start: float | None = None,
             skip_layer_guidance_stop: float | None = None) -> Recipe:
    """`recipe` with the given settings changed (None keeps the recipe's), checked. Skip-layer guidance:
    layers turn it on (scale/start/stop default to the recipe's, else diffusers' 2.8 / 0.01 / 0.2), an empty
    list turns it off; scale/start/stop alone adjust the recipe's and need one that has SLG."""
    recipe = recipe.replace(steps=steps, guidance=guidance, sampler=sampler, shift=shift)
    slg = recipe.slg
    tuning = {k: v for k, v in (("scale", skip_layer_guidance_scale), ("start", skip_layer_guidance_start),
                                ("stop", skip_layer_guidance_stop)) if v is not None}
    if skip_guidance_layers is not None and _empty(skip_guidance_layers):
        slg = None
    elif skip_guidance_layers is not None:
        base = slg or SkipLayerGuidance(layers=(0,))
        slg = SkipLayerGuidance(layers=skip_guidance_layers, scale=base.scale, start=base.start, stop=base.stop)
    elif tuning and slg is None:
        raise ValueError(f"{', '.join('skip_layer_guidance_' + k for k in tuning)} need skip_guidance_layers "
                         f"(recipe {recipe.name!r} has no skip-layer guidance)")
    if slg is not None and tuning:
        slg = dataclasses.replace(slg, **tuning)
    return dataclasses.replace(recipe, slg=slg)


def _empty(layers) -> bool:
    return isinstance(layers, (list, tuple)) and len(layers) == 0


def recipe_for(config: MMDiTConfig, *, flash: bool = False) -> Recipe:
    """The recipe of the model family `config` belongs to: SD3 has no qk-norm; SD3.5-medium has MMDiT-X
    (dual attention) blocks; SD3.5-large has qk-norm and none (the published configs, config.py presets).
    SD3.5-large-turbo has large's architecture: ask for "sd3.5-large-turbo" by name.
    flash: the Flash SD3 LoRA is loaded (it exists for SD3-medium only)."""
    if config.qk_norm is None:
        return FLASH_SD3 if flash else SD3
    if flash:
        raise ValueError("the Flash SD3 recipe is for SD3-medium; this model has qk-norm (SD3.5)")
    return SD35_MEDIUM if config.dual_attention_layers else SD35_LARGE


def default_recipe(config: MMDiTConfig, *, adapters: bool) -> Recipe:
    """The recipe of a loaded model (from_pretrained's and flashsd3-sample's default): an adapter on SD3
    (no qk-norm) is taken for Flash SD3's, this package's purpose; pass a recipe for other adapters."""
    return recipe_for(config, flash=adapters and config.qk_norm is None)
