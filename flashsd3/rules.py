"""The rules a run's arguments must follow, as pure functions of (model config, arguments), shared by the
pipeline (`FlashSD3Pipeline`, Python argument names) and flashsd3-sample's preflight (flag names): each rule and
its message exist once; the caller says what the argument is called (`name="seed"` or `name="--seed"`).

No torch here: the CLI checks its flags before torch is imported (it sets MKL's environment first).
"""
from __future__ import annotations

import math
import numbers

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
VAE_DOWNSCALE = 8  # SD3's VAE and the demo's: 4 levels of block_out_channels (vae/config.json)
MAX_STEPS = 10_000  # sampler steps: far above any recipe (SD3.5: 50), far below a sigma table that cannot be allocated


class InputError(ValueError):
    """An argument that breaks a rule; the message names it as the caller calls it."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _show(v) -> str:
    text = repr(v)
    return text if len(text) < 60 else text[:57] + "..."


# Size ------------------------------------------------------------------------------------------------

def size_factor(config, vae_downscale: int = VAE_DOWNSCALE) -> int:
    """Image pixels per token side: VAE downscale x patch size (16 for SD3). Without a config (a hub model
    not yet downloaded) patch 2, which every published SD3 / SD3.5 transformer has."""
    return vae_downscale * (config.patch_size if config is not None else 2)


def check_size(config, height, width, *, vae_downscale: int = VAE_DOWNSCALE,
               names: tuple[str, str] = ("height", "width")) -> None:
    """The output must be a positive multiple of the factor a side and fit the position table
    (pos_embed_max_size tokens a side; not checked without a config)."""
    factor = size_factor(config, vae_downscale)
    for name, value in zip(names, (height, width), strict=True):
        if not _is_int(value) or value <= 0 or value % factor:
            raise InputError(f"{name} must be a positive multiple of {factor} (VAE x patch size) for this model, "
                             f"got {_show(value)}")
        if config is not None and value // factor > config.pos_embed_max_size:
            raise InputError(f"{name} {value} exceeds the position table: at most "
                             f"{config.pos_embed_max_size * factor} pixels for this model")


def edit_size(image_size: tuple[int, int], height, width, factor: int, *, image: str = "image",
              names: tuple[str, str] = ("height", "width")) -> tuple[int, int]:
    """(height, width) of an edit of an image of `image_size` = (height, width): the given size (the image is
    resized to it), else the image's own, refused unless a multiple of `factor` (a silent resize or crop
    would change the picture the user asked to edit)."""
    h, w = image_size
    if height is not None and width is not None:
        return height, width
    if height is not None or width is not None:
        raise InputError(f"{image} is {w}x{h}: give both {names[0]} and {names[1]} to resize it, or neither to "
                         "keep its size")
    if h % factor or w % factor:
        raise InputError(f"{image} is {w}x{h} (width x height), not a multiple of {factor} for this model: pass "
                         f"{names[1]} and {names[0]} to resize it (nearest: width {_nearest(w, factor)}, height "
                         f"{_nearest(h, factor)}), or crop it")
    return h, w


def _nearest(value: int, factor: int) -> str:
    low = value // factor * factor
    return " or ".join(str(v) for v in (low, low + factor) if v > 0)


# Numbers ---------------------------------------------------------------------------------------------

def check_number(value, name: str, *, low: float | None = None, high: float | None = None) -> float:
    """A finite real number in [low, high] (no bound where None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {_show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


# Seeds -----------------------------------------------------------------------------------------------

def check_seed(seed, count: int, name: str = "seed") -> None:
    """Image k of `count` uses seed + k; every one must be a seed a torch generator takes."""
    if not _is_int(seed):
        raise InputError(f"{name} must be an int, got {type(seed).__name__} {_show(seed)}")
    if not 0 <= seed <= SEED_LIMIT - count:
        need = f"; image {count - 1} would need {seed + count - 1}" if seed >= 0 and count > 1 else ""
        raise InputError(f"{name} must be an int in [0, 2**64 - {count}] for {count} image(s) (image k uses "
                         f"{name} + k, and a torch generator takes 0 .. 2**64 - 1{need}), got {seed}")


# Steps and strength ----------------------------------------------------------------------------------

def check_steps(steps, name: str = "num_steps") -> None:
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"{name} must be an int from 1 to {MAX_STEPS}, got {_show(steps)}")


def check_strength(strength, name: str = "strength") -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise InputError(f"{name} must be a number in (0, 1] (the part of the schedule run from the noised image; "
                         f"1: from pure noise), got {_show(strength)}")
    return float(strength)


def edit_start(num_steps: int, strength: float) -> int:
    """The index of the sigma table an edit starts from: diffusers' get_timesteps,
    t_start = int(max(n - min(n * strength, n), 0)); it runs num_steps - edit_start steps."""
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


def check_strength_leaves_a_step(strength: float, num_steps: int, *, name: str = "strength",
                                 steps: str = "steps") -> None:
    """An edit must run at least one step: a strength so small that n x strength vanishes next to n
    (about 1e-16) starts at the end of the table."""
    if edit_start(num_steps, strength) >= num_steps:
        raise InputError(f"{name} {strength:g} leaves no step of the {num_steps}-step schedule: an edit starts at "
                         f"step int(n - n x {name}) (diffusers' img2img), here {num_steps} of {num_steps} {steps}; "
                         f"give a larger {name} (1 / n = {1 / num_steps:g} runs the last step)")


# Skip-layer guidance ----------------------------------------------------------------------------------

def check_skip_layers(layers, depth: int, name: str = "skip_guidance_layers") -> None:
    bad = [i for i in layers if i >= depth]
    if bad:
        raise InputError(f"{name} {bad} beyond the model's {depth} joint blocks (0..{depth - 1})")


def guided_steps(start: float, stop: float, num_steps: int) -> list[int]:
    """Steps i of `num_steps` that skip-layer guidance acts on: start * n < i < stop * n (diffusers'
    StableDiffusion3Pipeline and Stability's sd3_impls.py SkipLayerCFGDenoiser, both strict)."""
    return [i for i in range(num_steps) if slg_guides(i, num_steps, start, stop)]


def slg_guides(step: int, num_steps: int, start: float, stop: float) -> bool:
    return num_steps * start < step < num_steps * stop


def control_active(step: int, num_steps: int, start: float, stop: float) -> bool:
    """A ControlNet acts on step i of n unless i / n < start or (i + 1) / n > stop (diffusers'
    StableDiffusion3ControlNetPipeline, controlnet_keep)."""
    return not (step / num_steps < start or (step + 1) / num_steps > stop)


def check_slg_window(start: float, stop: float, num_steps: int, strength: float | None = None, *,
                     names: tuple[str, ...] = ("skip_layer_guidance_start", "skip_layer_guidance_stop", "num_steps",
                                               "strength"), off: str = "skip_guidance_layers=[]") -> None:
    """Refuse skip-layer guidance that guides no step of the run (an edit runs the last steps of the
    `num_steps` schedule, see `edit_start`): it would change nothing while the run records it as on. The
    message says the fewest steps that would guide one."""
    def run(n: int) -> int:
        return n if strength is None else n - edit_start(n, strength)

    if guided_steps(start, stop, run(num_steps)):
        return
    enough = next((n for n in range(num_steps + 1, MAX_STEPS + 1) if guided_steps(start, stop, run(n))), None)
    more = f"{names[2]} >= {enough}, " if enough else ""
    n = run(num_steps)
    of = "" if strength is None else f" (the steps {names[3]} {strength:g} runs of {num_steps})"
    raise InputError(f"skip-layer guidance on {names[0]} {start:g} .. {names[1]} {stop:g} guides no step of {n}{of} "
                     f"(step i is guided when {n} x {start:g} < i < {n} x {stop:g}): give {more}a wider window, "
                     f"or {off} to turn it off")
