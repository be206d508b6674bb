"""flashsd3-sample's ControlNet flags: `--controlnet PATH[:SCALE] --control-image FILE`, repeatable, in pairs;
`--control-start F` / `--control-end F` (diffusers' control_guidance_start/end), once for all or once each.

Checked before any model is loaded (`check_controls`): one image per ControlNet, each image readable, each
ControlNet's config (config.json or safetensors header) of the model's width, patch and latent channels, the
inpainting ControlNet only with --image and --mask. Without --height/--width (and without --image) the output
takes the first control image's size; every control image must then have the output's size.
flashsd3-serve shares `add_controlnet_flag`, `check_source`, `load`, `call_arguments` and `metadata` (its
requests set each ControlNet's steps window and preprocessing too: recorded only when set).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..preflight import PreflightError
from ..rules import VAE_DOWNSCALE, InputError, check_number, check_size, control_active, edit_start

DEMO = "demo"  # --controlnet demo: the demo model's toy ControlNet (flashsd3.demo.demo_controlnet)


@dataclass(frozen=True)
class ControlRun:
    """One --controlnet with its --control-image."""

    source: str
    scale: float
    image: object  # PIL RGB
    image_path: str
    config: object | None  # ControlNetConfig; None for a hub id (known once downloaded)
    start: float = 0.0  # control_guidance_start: fraction of the steps before which it is off
    stop: float = 1.0  # control_guidance_end
    preprocess: str | None = None  # how the control image was made from the one given, as preprocess.py's flags


def add_controlnet_flag(group, scale_help: str = "conditioning scale (default 1)") -> None:
    group.add_argument("--controlnet", action="append", metavar="PATH[:SCALE]",
                       help="diffusers folder or file (InstantX SD3 canny/pose/tile, alimama inpainting), Stability's "
                            f"SD3.5 single file, or a hub id; 'demo' with --demo. SCALE: {scale_help}")


def add_arguments(parser, path_type) -> None:
    g = parser.add_argument_group("ControlNet (repeatable: the k-th --control-image goes with the k-th --controlnet)")
    add_controlnet_flag(g)
    g.add_argument("--control-image", action="append", type=path_type, metavar="FILE",
                   help="its control image (edges, depth, pose, blur...) of the output's size; python -m "
                        "flashsd3.controlnet.preprocess makes canny / blur / tile ones")
    for flag, default, ref in (("--control-start", 0, "control_guidance_start"), ("--control-end", 1,
                                                                                   "control_guidance_end")):
        g.add_argument(flag, action="append", type=float, metavar="F",
                       help=f"fraction of the steps {'before' if default == 0 else 'after'} which the ControlNet is "
                            f"off (diffusers' {ref}; default {default}): once for all, or once per --controlnet")


def _windows(args, count: int) -> list[tuple[float, float]]:
    """(start, stop) per ControlNet from --control-start / --control-end (absent, once, or once each)."""
    def per_net(flag: str, values, default: float) -> list[float]:
        if values is None:
            return [default] * count
        if not count or len(values) not in (1, count):
            raise PreflightError(f"{flag} given {len(values)} times for {count} --controlnet: give it once (for "
                                 "all) or once per --controlnet")
        try:
            values = [check_number(v, flag, low=0, high=1) for v in values]
        except InputError as e:
            raise PreflightError(str(e)) from None
        return values * count if len(values) == 1 else values
    starts = per_net("--control-start", getattr(args, "control_start", None), 0.0)
    stops = per_net("--control-end", getattr(args, "control_end", None), 1.0)
    for start, stop in zip(starts, stops, strict=True):
        if start >= stop:
            raise PreflightError(f"--control-start {start:g} must be below --control-end {stop:g}")
    return list(zip(starts, stops, strict=True))


def check_controls(args, pairs: list[tuple[str, float]], config, edit) -> list[ControlRun]:
    """pairs: the parsed --controlnet values (source, scale). Reads every control image and ControlNet config."""
    from ..images import ImageError, load_image

    images = args.control_image or []
    if len(images) != len(pairs):
        raise PreflightError(f"{len(pairs)} --controlnet and {len(images)} --control-image: give them in pairs")
    runs = []
    windows = _windows(args, len(pairs))
    for (source, scale), image_path, (start, stop) in zip(pairs, images, windows, strict=True):
        try:
            image = load_image(image_path)
        except ImageError as e:
            raise PreflightError(f"--control-image: {e}") from None
        cn_config = check_source(source, args.demo, config)
        if cn_config is not None and cn_config.extra_channels and (edit is None or edit.mask is None):
            raise PreflightError(f"--controlnet {source} is an inpainting ControlNet (mask channel): it needs "
                                 "--image and --mask (white = repaint)")
        runs.append(ControlRun(source, scale, image, str(image_path), cn_config, start, stop))
    return runs


def check_windows(runs: list[ControlRun], num_steps: int, strength: float | None) -> None:
    """Each ControlNet must act on a step of the run (an edit runs the last steps of `num_steps`): a window
    between two steps would change nothing while the metadata records the ControlNet as used."""
    n = num_steps if strength is None else num_steps - edit_start(num_steps, strength)
    for run in runs:
        if not any(control_active(i, n, run.start, run.stop) for i in range(n)):
            raise PreflightError(f"--controlnet {run.source}: --control-start {run.start:g} .. --control-end "
                                 f"{run.stop:g} leaves it on for no step of {n} (step i is on when i / {n} >= start "
                                 f"and (i + 1) / {n} <= end): widen the window or give more --steps")


def check_source(source: str, demo: bool, model_config):
    """A --controlnet source's config, checked against the model's (None for a hub id not downloaded yet)."""
    from .. import hub
    from ..weights import CheckpointError
    from .config import DEMO_CONTROLNET
    from .loading import controlnet_config
    from .model import check_compatible

    if source == DEMO:
        if not demo:
            raise PreflightError("--controlnet demo is the demo model's toy ControlNet: it needs --demo")
        return DEMO_CONTROLNET
    if not Path(source).exists():
        if not hub.looks_like_repo_id(source):
            raise PreflightError(f"--controlnet {source}: no such file or folder, and not a hub repo id (owner/name)")
        return None
    try:
        cn_config = controlnet_config(source)
    except (CheckpointError, OSError) as e:
        raise PreflightError(f"--controlnet {source}: {e}") from None
    if model_config is not None:
        try:
            check_compatible(cn_config, model_config)
        except ValueError as e:
            raise PreflightError(f"--controlnet {source}: {e}") from None
    return cn_config


def output_size(runs: list[ControlRun], edit, height, width, config) -> tuple[int | None, int | None]:
    """--height/--width as given, or the first control image's size for a text-to-image run."""
    if not runs or edit is not None or height is not None or width is not None:
        return height, width
    w, h = runs[0].image.size
    if config is not None:
        try:
            check_size(config, h, w)
        except InputError as e:
            raise PreflightError(f"--control-image {runs[0].image_path} is {w}x{h}, the output size without "
                                 f"--height/--width: {e}") from None
    elif h % (VAE_DOWNSCALE * 2) or w % (VAE_DOWNSCALE * 2):
        raise PreflightError(f"--control-image {runs[0].image_path} is {w}x{h}: not a multiple of 16")
    return h, w


def check_sizes(runs: list[ControlRun], height: int, width: int, resized: bool) -> None:
    """Control images must have the output's size unless --height/--width ask for a resize."""
    for run in runs:
        w, h = run.image.size
        if not resized and (h, w) != (height, width):
            raise PreflightError(f"--control-image {run.image_path} is {w}x{h}, the output {width}x{height}: give it "
                                 "the output's size, or pass --height and --width to resize it")


def load(pipe, runs: list[ControlRun], dtype, device) -> None:
    """pipe.controlnets, each on the pipeline's transformer (its width checked again)."""
    from ..demo import demo_controlnet
    from .loading import load_controlnet

    pipe.controlnets = [demo_controlnet(pipe.transformer) if r.source == DEMO else
                        load_controlnet(r.source, dtype=dtype, device=device, transformer=pipe.transformer)
                        for r in runs]


def call_arguments(runs: list[ControlRun]) -> dict:
    """The pipeline call's ControlNet arguments (none without --controlnet). A run's image may be a list, one
    per output image."""
    if not runs:
        return {}

    def each(attr: str):
        return getattr(runs[0], attr) if len(runs) == 1 else [getattr(r, attr) for r in runs]
    return {"control_image": each("image"), "controlnet_conditioning_scale": each("scale"),
            "control_guidance_start": each("start"), "control_guidance_end": each("stop")}


def metadata(runs: list[ControlRun]) -> dict:
    """Each ControlNet with its scale and control image; its steps window and preprocessing when set."""
    def entry(r: ControlRun) -> dict:
        extra = {"start": r.start, "stop": r.stop} if (r.start, r.stop) != (0.0, 1.0) else {}
        return {"source": r.source, "scale": r.scale, "control_image": r.image_path, **extra,
                **({"preprocess": r.preprocess} if r.preprocess else {})}
    return {"controlnet": [entry(r) for r in runs]}
