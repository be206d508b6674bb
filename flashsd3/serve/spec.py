"""A request, whatever its API, as what to generate: `Spec`, checked against the model and the limits.

The recipe is resolved by `flashsd3.settings.run_recipe` (the CLI's own rules and messages, flag names
turned into field names) and the metadata by `flashsd3.cli.run_metadata`, so an image's settings and PNG
text are those of `flashsd3-sample` with the same prompt, seed and settings.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

from ..rules import InputError, check_seed, check_size, edit_size
from ..settings import Edit, check_schedule, flag_names, run_recipe
from .controls import check_masks, fit, output_size
from .errors import ApiError
from .limits import Limits

RECIPE_FIELDS = ("recipe", "steps", "guidance", "sampler", "shift", "slg_layers", "slg_scale", "slg_start",
                 "slg_stop")
# flashsd3-sample's flags that are request fields here (a message naming --max-* names a server flag)
FLAG = re.compile(r"--(prompt|negative-prompt|seed|recipe|steps|guidance|sampler|shift|slg-layers|slg-scale|"
                  r"slg-start|slg-stop|height|width|image|mask|strength)\b")


@dataclass
class Spec:
    """One request: `n` images of one prompt, image k from seed + k (flashsd3-sample's rule)."""

    prompt: str
    negative: str | None  # effective: None without CFG (as the CLI)
    n: int
    seed: int
    height: int
    width: int
    recipe: object  # flashsd3.recipes.Recipe
    edit: Edit | None
    loras: tuple[tuple[str, float], ...]  # (name, scale) of the adapters chosen, in load order
    controls: tuple = ()  # serve.controls.Unit: the ControlNets chosen, in the request's order
    notes: list[str] = field(default_factory=list)  # what was ignored, for the response's info
    meta: dict = field(default_factory=dict)  # run metadata (flashsd3.cli.run_metadata), set by the engine

    @property
    def key(self) -> tuple:
        """Requests with equal keys run in one model call."""
        kind = None if self.edit is None else "img2img" if self.edit.mask is None else "inpaint"
        return (self.height, self.width, self.recipe, self.loras, kind, self.edit.strength if self.edit else None,
                tuple(u.key for u in self.controls))

    @property
    def steps(self) -> int:
        """Sampler steps run (an edit runs the last part of the schedule, diffusers' get_timesteps)."""
        n = self.recipe.steps
        if self.edit is None:
            return n
        return n - int(max(n - min(n * self.edit.strength, n), 0))


def api_message(message: str, renames: dict[str, str]) -> str:
    """A CLI message with its flags as this API's field names ('--steps' -> 'steps', or a rename)."""
    def name(m):
        plain = m.group(1).replace("-", "_")
        return renames.get(plain, plain)
    return FLAG.sub(name, flag_names(message))


def build_spec(values: dict, engine, limits: Limits, *, status: int, renames: dict[str, str] | None = None,
               notes: list[str] | None = None) -> Spec:
    """values: prompt, negative_prompt, n, seed, width, height, the recipe fields, loras, strength, for an
    edit image / image_label / mask / mask_label (PIL images, already checked), and controls (serve.controls
    Units, checked but for the size)."""
    renames = renames or {}

    def fail(message: str, param: str | None, code: str = "invalid_value"):
        param = renames.get(param, param)
        return ApiError(status, api_message(message, renames), param=param, code=code)

    prompt = values.get("prompt")
    if not isinstance(prompt, str):
        raise fail("prompt is required (a string)", "prompt", "missing_prompt")
    negative = values.get("negative_prompt")
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if text is not None and len(text) > limits.max_prompt:
            raise fail(f"{name} has {len(text)} characters; at most {limits.max_prompt} (--max-prompt-chars)", name,
                       "prompt_too_long")
    n = values.get("n", 1)
    if not 1 <= n <= limits.max_images:
        raise fail(f"n (images) must be in [1, {limits.max_images}], got {n} (--max-images)", "n", "too_many_images")
    seed = values.get("seed")
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    try:
        check_seed(seed, n, "seed")
    except InputError as e:
        raise fail(str(e), "seed") from None
    chosen = engine.choose_loras(values.get("loras"), lambda m: fail(m, "loras", "unknown_lora"))
    recipe = _recipe(values, engine, bool(chosen), limits, fail)
    edit = _edit(values)
    controls = values.get("controls") or []
    explicit = values.get("height") is not None or values.get("width") is not None
    if edit is None and controls:  # the first control image's size unless one is given (flashsd3-sample's rule)
        h, w = output_size(controls, values.get("height"), values.get("width"), engine.image_factor, status)
        values = {**values, "height": h, "width": w}
    height, width = _size(values, edit, engine, limits, fail)
    controls = fit(controls, height, width, explicit, status)
    check_masks(controls, edit, status)
    try:
        check_schedule(recipe, edit)  # a step left to run, and one for skip-layer guidance to act on
    except InputError as e:
        field_ = FLAG.search(str(e))
        raise fail(str(e), field_.group(1).replace("-", "_") if field_ else None) from None
    notes = list(notes or [])
    if negative and not recipe.cfg:
        notes.append(f"negative_prompt ignored: guidance {recipe.guidance:g} <= 1 (recipe {recipe.name})")
    spec = Spec(prompt, negative if recipe.cfg else None, n, seed, height, width, recipe, edit, chosen,
                tuple(controls), notes)
    spec.meta = engine.metadata(spec)
    return spec


def _recipe(values: dict, engine, adapters: bool, limits: Limits, fail):
    from ..recipes import RECIPES
    from ..sampling.table import SAMPLERS

    args = SimpleNamespace(demo=engine.demo, **{k: values.get(k) for k in RECIPE_FIELDS})
    if args.recipe is not None and args.recipe not in RECIPES:
        raise fail(f"recipe {args.recipe!r} is not one of {', '.join(RECIPES)}", "recipe", "unknown_recipe")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise fail(f"sampler {args.sampler!r} is not one of {', '.join(SAMPLERS)}", "sampler", "unknown_sampler")
    try:
        rec = run_recipe(args, engine.config, adapters)
    except InputError as e:
        field_ = FLAG.search(str(e))
        raise fail(str(e), field_.group(1).replace("-", "_") if field_ else None) from None
    if rec.steps > limits.max_steps:
        raise fail(f"steps {rec.steps} exceeds this server's cap of {limits.max_steps} (--max-steps)", "steps",
                   "too_many_steps")
    return rec


def _edit(values: dict) -> Edit | None:
    image = values.get("image")
    if image is None:
        return None
    mask, strength = values.get("mask"), values.get("strength")
    if strength is None:
        from ..pipeline.core import IMG2IMG_STRENGTH, INPAINT_STRENGTH
        strength = INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH
    return Edit(image, values.get("image_label", "upload"), mask, values.get("mask_label") if mask else None,
                strength)


def _size(values: dict, edit: Edit | None, engine, limits: Limits, fail) -> tuple[int, int]:
    """The request's size; an edit's default is its image's (a multiple of the model's factor, else refused)."""
    height, width = values.get("height"), values.get("width")
    factor = engine.image_factor
    if edit is not None:
        w, h = edit.image.size
        if edit.mask is not None and edit.mask.size != (w, h):
            mw, mh = edit.mask.size
            raise fail(f"mask is {mw}x{mh} but the image is {w}x{h}: they must be the same size", "mask",
                       "mask_size")
        try:
            height, width = edit_size((h, w), height, width, factor)
        except InputError as e:
            raise fail(str(e), "image" if "multiple" in str(e) else "width", "image_size") from None
    height = engine.default_size if height is None else height
    width = engine.default_size if width is None else width
    if height < 1 or width < 1:
        raise fail(f"size {width}x{height}: width and height must be positive", "width")
    try:
        check_size(engine.config, height, width)
    except InputError as e:
        raise fail(str(e), "height" if "height" in str(e) else "width", "invalid_size") from None
    if height * width > limits.max_pixels:
        raise fail(f"size {width}x{height} = {width * height} pixels exceeds this server's cap of "
                   f"{limits.max_pixels} (--max-pixels)", "width", "image_too_large")
    return height, width
