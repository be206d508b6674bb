"""ControlNets in requests, whatever the API: which loaded ControlNet (by name, never a path), its control image
(an upload: the caps of every upload), its scale and steps window, an optional preprocessor, checked by
flashsd3-sample's rules: without a size the output takes the first control image's, and every control image must
then have it; with a size they are resized to it (A1111's default "Crop and Resize" first crops to its aspect).

A batch of requests shares a model call when their ControlNets, scales and windows are equal (`Unit.key`); the
pipeline takes one control image per output image, so their images may differ (an image that every output of the
call shares is passed once: it is encoded once, with the same result).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from ..controlnet.flags import ControlRun, call_arguments
from ..rules import InputError, edit_size
from .errors import ApiError
from .uploads import from_base64, open_image


@dataclass(frozen=True)
class Param:
    """A preprocessor's setting: its keyword (and flag) in flashsd3.controlnet.preprocess, default and bounds."""

    name: str
    default: float
    low: float
    high: float


# Preprocessors a request may name (sd-webui-controlnet's module names, and flashsd3's with the defaults of
# `python -m flashsd3.controlnet.preprocess`): module -> (preprocess function, its settings in order; A1111's
# threshold_a / threshold_b set them). The extension's blur sigma is PIL's GaussianBlur radius (both the
# standard deviation); its tile_resample rate is tile's factor.
MODULES: dict[str, tuple[str | None, tuple[Param, ...]]] = {
    "none": (None, ()),
    "canny": ("canny", (Param("low", 100, 1, 255), Param("high", 200, 1, 255))),
    "blur_gaussian": ("blur", (Param("radius", 9.0, 0.01, 64),)),
    "tile_resample": ("tile", (Param("factor", 1.0, 1, 8),)),
    "blur": ("blur", (Param("radius", 8, 0, 64),)),
    "tile": ("tile", (Param("factor", 4, 1, 64),)),
}
DEPTH_AND_POSE = "depth and pose estimators need weights of their own: send a ready control image with module none"


@dataclass(frozen=True)
class Unit:
    """One ControlNet of a request, checked."""

    name: str  # the loaded ControlNet's name
    run: ControlRun  # source, scale, image (PIL RGB, after preprocessing), its label, config, start, stop, preprocess
    digest: str  # of the control image's pixels
    field: str  # the request field it came from, for messages
    image_field: str  # its control image's field
    module: str = "none"  # the preprocessor run on the image sent (a MODULES name)
    crop: bool = False  # crop to the output's aspect before the resize (A1111's "Crop and Resize")
    show: bool = False  # A1111: return the control image after the generated ones (save_detected_map)

    @property
    def key(self) -> tuple:
        return self.name, self.run.scale, self.run.start, self.run.stop


@dataclass(frozen=True)
class UnitRequest:
    """A unit as an API gives it, under flashsd3's names (None: not given)."""

    field: str  # e.g. "controlnets[0]"
    names: dict  # flashsd3's name -> the API's, for messages: name, image, scale, start, stop, module
    name: object = None
    image: object = None  # base64 text, or None for the edit's image
    scale: float | None = None
    start: float | None = None
    stop: float | None = None
    module: str | None = None
    settings: tuple = ()  # the preprocessor's settings in order (A1111's threshold_a, threshold_b); None: default
    crop: bool = False
    show: bool = False


async def make_units(requests: list[UnitRequest], engine, limits, status: int, edit=None) -> list[Unit]:
    """Checked units, decoded and preprocessed in a worker thread (a large canny map takes a while).
    edit: (PIL image, label) of an edit, the control image of a unit that sends none."""
    from starlette.concurrency import run_in_threadpool

    if not requests:
        return []
    if len(requests) > limits.max_controlnets:
        where = requests[0].field.rsplit("[", 1)[0]  # the list
        raise ApiError(status, f"{where}: {len(requests)} ControlNets in one request; at most "
                       f"{limits.max_controlnets} (--max-controlnets)", param=where, code="too_many_controlnets")
    return await run_in_threadpool(lambda: [make_unit(r, engine, limits.max_upload_pixels, status, edit)
                                            for r in requests])


def make_unit(req: UnitRequest, engine, max_upload_pixels: int, status: int, edit=None) -> Unit:
    """A checked unit: the ControlNet chosen by name, its control image decoded (or the edit's image) and
    preprocessed. Raises ApiError naming the field."""
    def fail(message: str, what: str, code: str = "invalid_value"):
        where = f"{req.field}.{req.names[what]}"
        return ApiError(status, f"{where}: {message}", param=where, code=code)

    loaded = engine.controlnet(req.name, lambda m: fail(m, "name", "unknown_controlnet"))
    start = 0.0 if req.start is None else req.start
    stop = 1.0 if req.stop is None else req.stop
    if start >= stop:
        raise fail(f"{start:g} must be below {req.names['stop']} {stop:g} (fractions of the steps it acts on)",
                   "start")
    image_field = f"{req.field}.{req.names['image']}"
    if req.image is None:
        if edit is None:
            raise fail("the control image is required (base64)", "image", "missing_image")
        image, label = edit  # as the A1111 extension does in img2img: the image to edit
    else:
        data = from_base64(req.image, image_field, status)
        image, label = _rgb(open_image(data, image_field, max_upload_pixels, status), image_field, status), "upload"
    module = req.module or "none"
    image, recipe = preprocessed(image, module, req.settings, fail)
    run = ControlRun(loaded.source, loaded.scale if req.scale is None else req.scale, image, label,
                     loaded.net.config, start, stop, recipe)
    return Unit(loaded.name, run, _digest(image), req.field, image_field, module, req.crop,
                req.show)


def preprocessed(image, module: str, settings: tuple, fail):
    """(control image, how it was made as `python -m flashsd3.controlnet.preprocess` flags, or None)."""
    from ..controlnet import preprocess

    if module not in MODULES:
        raise fail(f"preprocessor {module[:40]!r} is not available; flashsd3 has: {', '.join(MODULES)} "
                   f"({DEPTH_AND_POSE})", "module", "unknown_module")
    kind, params = MODULES[module]
    if len(settings) > len(params) and any(s is not None for s in settings[len(params):]):
        raise fail(f"{module} takes {len(params)} setting(s): {', '.join(p.name for p in params) or 'none'}",
                   "module")
    values = {}
    for k, p in enumerate(params):
        value = settings[k] if k < len(settings) and settings[k] is not None else p.default
        if not p.low <= value <= p.high:
            raise fail(f"{module}'s {p.name} must be in [{p.low:g}, {p.high:g}], got {value:g}", "module")
        values[p.name] = int(value) if kind == "canny" else value
    if kind is None:
        return image, None
    out = getattr(preprocess, kind)(image, **values)
    return out, " ".join([kind, *(f"--{name} {value:g}" for name, value in values.items())])


def output_size(units: list[Unit], height, width, factor: int, status: int) -> tuple[int | None, int | None]:
    """Text to image: the request's size (both or neither), else the first control image's (a multiple of the
    factor, else refused as flashsd3-sample refuses it)."""
    if not units:
        return height, width
    first = units[0]
    w, h = first.run.image.size
    try:
        return edit_size((h, w), height, width, factor, image=f"{first.image_field} (a control image)")
    except InputError as e:
        raise ApiError(status, str(e), param=first.image_field, code="image_size") from None


def fit(units: list[Unit], height: int, width: int, explicit: bool, status: int) -> list[Unit]:
    """Control images against the output: without a size given they must have it (no silent resize); with one,
    the pipeline resizes them, after a crop to the output's aspect where the unit asks for it."""
    out = []
    for u in units:
        w, h = u.run.image.size
        if not explicit and (w, h) != (width, height):
            raise ApiError(status, f"{u.image_field}: the control image is {w}x{h}, the output {width}x{height}: "
                           "give it the output's size, or give width and height to resize it", param=u.image_field,
                           code="image_size")
        image = _crop(u.run.image, width, height) if u.crop else u.run.image
        out.append(u if image is u.run.image else replace(u, run=replace(u.run, image=image), digest=_digest(image)))
    return out


def check_masks(units: list[Unit], edit, status: int) -> None:
    """The inpainting ControlNet (a mask channel) needs the mask of an inpainting request."""
    for u in units:
        if u.run.config.extra_channels and (edit is None or edit.mask is None):
            raise ApiError(status, f"{u.field}: ControlNet {u.name!r} is an inpainting ControlNet (mask channel): "
                           "use it in an inpainting request (an image and a mask)", param=u.field,
                           code="needs_mask")


def pipeline_arguments(specs: list) -> dict:
    """The ControlNet arguments of one call of the outputs of `specs` (one spec per output image, equal keys)."""
    first = specs[0].controls
    runs = []
    for j, unit in enumerate(first):
        units = [s.controls[j] for s in specs]
        shared = all(u.digest == unit.digest for u in units)
        runs.append(replace(unit.run, image=unit.run.image if shared else [u.run.image for u in units]))
    return call_arguments(runs)


def _crop(image, width: int, height: int):
    """The centre of `image` with the aspect of width x height (unchanged if it has it)."""
    w, h = image.size
    if w * height == h * width:
        return image
    if w * height > h * width:  # wider: keep the full height
        keep = max(1, round(h * width / height))
        left = (w - keep) // 2
        return image.crop((left, 0, left + keep, h))
    keep = max(1, round(w * height / width))
    top = (h - keep) // 2
    return image.crop((0, top, w, top + keep))


def _rgb(image, where: str, status: int):
    """8-bit RGB as flashsd3-sample reads a control image (16-bit depth maps scaled by their range)."""
    from ..images import ImageError, to_rgb

    try:
        return to_rgb(image, where)
    except ImageError as e:
        raise ApiError(status, str(e), param=where, code="invalid_image") from None


def _digest(image) -> str:
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
