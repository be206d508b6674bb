"""What flashsd3-sample runs: the recipe (the model's own or --recipe, then the flags), the image and mask of
an edit with the output size they give, and the settings recorded with each image.

The recipe is resolved as soon as the model's config is known (demo, local files, SD3-medium's hub repo:
`preflight.model_config`), so a bad flag fails before any model is loaded; for other hub ids, right after.
Presets and defaults live in `flashsd3.recipes` only; this module maps flags onto `recipes.override`.
torch is imported inside functions only: the CLI sets MKL's environment before torch loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import MMDiTConfig
from .preflight import PreflightError
from .rules import (
    InputError,
    check_size,
    check_skip_layers,
    check_slg_window,
    check_steps,
    check_strength,
    check_strength_leaves_a_step,
    size_factor,
)
from .rules import edit_size as rules_edit_size

SIZE_FLAGS = ("--height", "--width")

# the pipeline's argument names in library messages -> the flags that set them
FLAG_NAMES = {"skip_guidance_layers": "--slg-layers", "skip_layer_guidance_scale": "--slg-scale",
              "skip_layer_guidance_start": "--slg-start", "skip_layer_guidance_stop": "--slg-stop",
              "num_steps": "--steps"}
SLG_TUNING = (("--slg-scale", "slg_scale"), ("--slg-start", "slg_start"), ("--slg-stop", "slg_stop"))


def flag_names(message: str) -> str:
    for name, flag in FLAG_NAMES.items():
        message = message.replace(name, flag)
    return message


def run_recipe(args, config: MMDiTConfig, adapters: bool):
    """--recipe (default: the model's, as the pipeline picks it; flash-sd3 for --demo, as `Pipeline.demo`)
    with the flags that are set; skip-layer guidance checked against guidance and the model's depth."""
    from .recipes import FLASH_SD3, default_recipe, get_recipe, override

    base = get_recipe(args.recipe) if args.recipe else FLASH_SD3 if args.demo else \
        default_recipe(config, adapters=adapters)
    tuning = [flag for flag, attr in SLG_TUNING if getattr(args, attr) is not None]
    if tuning and (args.slg_layers == () or (args.slg_layers is None and base.slg is None)):
        why = "--slg-layers none turns it off" if args.slg_layers == () else f"recipe {base.name} has none"
        verb = "adjusts" if len(tuning) == 1 else "adjust"
        raise PreflightError(f"{', '.join(tuning)} {verb} skip-layer guidance, which is off ({why}): "
                             "give --slg-layers (e.g. 7,8,9) to turn it on")
    if args.steps is not None:
        check_steps(args.steps, "--steps")
    try:
        rec = override(base, steps=args.steps, guidance=args.guidance, sampler=args.sampler, shift=args.shift,
                       skip_guidance_layers=args.slg_layers, skip_layer_guidance_scale=args.slg_scale,
                       skip_layer_guidance_start=args.slg_start, skip_layer_guidance_stop=args.slg_stop)
    except ValueError as e:
        raise PreflightError(flag_names(str(e))) from None
    if rec.slg is None:
        return rec
    source = "--slg-layers" if args.slg_layers else f"skip-layer guidance (recipe {rec.name})"
    if not rec.cfg:  # SLG is a term of the CFG combination: without CFG there is nothing to add it to
        raise PreflightError(f"{source} needs classifier-free guidance, which is off: guidance {rec.guidance:g} "
                             f"<= 1 (sampler {rec.sampler}); skip-layer guidance adds a term to the CFG pass, "
                             "so give --guidance > 1 or --slg-layers none")
    try:
        check_skip_layers(rec.slg.layers, config.depth, "--slg-layers")
    except InputError as e:
        hint = "" if args.slg_layers else "; give --slg-layers within them, or --slg-layers none"
        raise PreflightError(f"{e}{hint}") from None
    return rec


def check_schedule(rec, edit: Edit | None) -> None:
    """What the recipe and the edit's strength leave of the schedule: at least one step, and a step for
    skip-layer guidance to act on when it is on (it would otherwise change nothing while recorded)."""
    strength = None if edit is None else edit.strength
    if strength is not None:
        check_strength_leaves_a_step(strength, rec.steps, name="--strength", steps="--steps")
    if rec.slg is not None and rec.cfg:
        check_slg_window(rec.slg.start, rec.slg.stop, rec.steps, strength, off="--slg-layers none",
                         names=("--slg-start", "--slg-stop", "--steps", "--strength"))


def describe(rec) -> str:
    """One line for the console: 'recipe sd3: euler, 28 steps, guidance 7, shift 3'."""
    slg = rec.slg
    extra = f", skip layers {','.join(map(str, slg.layers))} x{slg.scale:g} ({slg.start:g}..{slg.stop:g})" \
        if slg else ""
    return f"recipe {rec.name}: {rec.sampler}, {rec.steps} steps, guidance {rec.guidance:g}, shift {rec.shift:g}{extra}"


@dataclass(frozen=True)
class Edit:
    """The image to edit (PIL RGB), its mask (PIL L, white = repaint) and the strength; paths as given."""

    image: object
    image_path: str
    mask: object | None
    mask_path: str | None
    strength: float


def load_edit(args) -> Edit | None:
    """Read --image and --mask (None without --image); the mask must be one channel, of the image's size."""
    from .images import ImageError, check_mask_matches, load_image, load_mask
    from .pipeline.core import IMG2IMG_STRENGTH, INPAINT_STRENGTH

    if args.image is None:
        if args.mask is not None or args.strength is not None:
            flag = "--mask" if args.mask is not None else "--strength"
            raise PreflightError(f"{flag} needs --image (the image to edit; with --mask, white = repaint)")
        return None
    try:
        image = load_image(args.image)
    except ImageError as e:
        raise PreflightError(f"--image: {e}") from None
    try:
        mask = None if args.mask is None else load_mask(args.mask)
        if mask is not None:
            check_mask_matches(image, mask)
    except ImageError as e:
        raise PreflightError(f"--mask: {e}") from None
    strength = check_strength(args.strength, "--strength") if args.strength is not None else \
        INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH
    return Edit(image, str(args.image), mask, None if args.mask is None else str(args.mask), strength)


@dataclass
class Inputs:
    """A run's checked inputs."""

    loras: list[tuple[str, float]]  # (source, scale)
    prompts: list[str]
    edit: Edit | None  # the image (and mask) to edit; None for text to image
    recipe: object | None  # the effective Recipe; None until a hub model's config is known
    controls: list = field(default_factory=list)  # flashsd3.controlnet.flags.ControlRun, one per --controlnet


def run_size(edit: Edit | None, height: int | None, width: int | None, config: MMDiTConfig | None,
             default: int) -> tuple[int, int]:
    """The output size: the flags', else the image's (`edit_size`), else `default`; checked against the
    model's position table when its config is known."""
    from_image = edit is not None and height is None and width is None
    if edit is not None:
        height, width = edit_size(edit, height, width, config)
    height, width = height or default, width or default
    try:
        check_size(config, height, width, names=SIZE_FLAGS)
    except InputError as e:
        if not from_image:
            raise
        raise PreflightError(f"--image {edit.image_path} is {width}x{height}, the output size without "
                             f"--height/--width: {e}") from None
    return height, width


def edit_size(edit: Edit, height: int | None, width: int | None, config: MMDiTConfig | None) -> tuple[int, int]:
    """(height, width) of an edit (`rules.edit_size`): --height/--width (the image and mask are resized to it,
    Lanczos), else the image's own size, refused unless a multiple of the model's factor."""
    w, h = edit.image.size
    return rules_edit_size((h, w), height, width, size_factor(config), image=f"--image {edit.image_path}",
                           names=SIZE_FLAGS)


def call(pipe, edit: Edit | None, prompts: list[str], **kwargs):
    """The pipeline's images for `prompts`: text to image, img2img or inpainting."""
    if edit is None:
        return pipe(prompts, **kwargs).images
    if edit.mask is None:
        return pipe.img2img(prompts, edit.image, strength=edit.strength, **kwargs).images
    return pipe.inpaint(prompts, edit.image, edit.mask, strength=edit.strength, **kwargs).images


def metadata(rec, edit: Edit | None) -> dict:
    """The effective recipe and edit inputs, as recorded in every image (None: not used)."""
    slg = rec.slg
    return {"recipe": rec.name, "sampler": rec.sampler, "steps": rec.steps, "guidance": rec.guidance,
            "shift": rec.shift, "strength": edit.strength if edit else None, "image": edit.image_path if edit else None,
            "mask": edit.mask_path if edit else None, "slg_layers": list(slg.layers) if slg else None,
            "slg_scale": slg.scale if slg else None, "slg_start": slg.start if slg else None,
            "slg_stop": slg.stop if slg else None}
