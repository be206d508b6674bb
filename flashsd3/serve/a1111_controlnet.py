"""The sd-webui-controlnet extension's API on the A1111 routes: `"alwayson_scripts": {"controlnet": {"args": [unit,
...]}}` in txt2img and img2img, and GET /controlnet/model_list, module_list, version, settings (field names,
defaults and shapes of Mikubill/sd-webui-controlnet internal_controlnet/args.py `ControlNetUnit` and
scripts/api.py).

A unit: `model` (a ControlNet loaded at start, by name), `image` (base64, or {"image", "mask"}; `input_image` is
the old name; in img2img none means the image to edit, as the extension does), `weight`, `guidance_start`,
`guidance_end`, `module` (none, canny, blur_gaussian, tile_resample, and flashsd3's blur and tile; any other is a
422 listing them), `threshold_a`/`threshold_b` (the module's settings; -1 = its default), `resize_mode` ("Crop and
Resize", the extension's default, or "Just Resize"; "Resize and Fill" is a 422), `enabled` (default true, as the
extension's API had it before 1.1.4), `save_detected_map` (default true: the control image used is returned after
the generated ones, as the extension returns its detected maps). The extension's other unit fields do nothing here
and are named in info's notes when set.
"""
from __future__ import annotations

import base64
import io

from fastapi import FastAPI

from .controls import MODULES, UnitRequest
from .errors import ApiError
from .fields import Field, parse_fields

STATUS = 422
API_VERSION = 2  # the extension's external_code.get_api_version()
UNIT = {"enabled": Field("bool"), "image": Field("any"), "input_image": Field("any"), "model": Field("any"),
        "weight": Field("float"), "guidance_start": Field("float", 0, 1), "guidance_end": Field("float", 0, 1),
        "guidance": Field("float", 0, 1), "module": Field("str"), "threshold_a": Field("float"),
        "threshold_b": Field("float"), "resize_mode": Field("any"), "save_detected_map": Field("bool")}
# the extension's unit fields with no effect here -> the values that mean "not used" (anything else is noted)
IGNORED = {"processor_res": (-1, 512), "pixel_perfect": (False,), "control_mode": ("Balanced", 0),
           "low_vram": (False,), "lowvram": (False,), "guess_mode": (False,), "mask": (None,), "mask_image": (None,),
           "hr_option": ("Both", 0), "inpaint_crop_input_image": (True, False), "advanced_weighting": (None,),
           "effective_region_mask": (None,), "pulid_mode": ("Fidelity",), "ipadapter_input": (None,),
           "is_ui": (False,), "input_mode": ("simple", "merge"), "batch_images": (None, ""), "output_dir": ("",),
           "loopback": (False,), "threshold_c": (-1,)}
RESIZE_MODES = {"Just Resize": False, 0: False, "Crop and Resize": True, 1: True,
                "Inner Fit (Scale to Fit)": True, "Scale to Fit (Inner Fit)": True}  # -> crop to the output's aspect
NAMES = {"name": "model", "image": "image", "scale": "weight", "start": "guidance_start", "stop": "guidance_end",
         "module": "module"}


def add_routes(app: FastAPI, server) -> None:
    @app.get("/controlnet/model_list")
    def model_list():
        return {"model_list": [c.name for c in server.engine.controlnets]}

    @app.get("/controlnet/module_list")
    def module_list():
        detail = {name: {"model_free": True, "sliders": [{"name": p.name, "value": p.default, "min": p.low,
                                                           "max": p.high} for p in params]}
                  for name, (_, params) in MODULES.items()}
        return {"module_list": list(MODULES), "module_detail": detail}

    @app.get("/controlnet/version")
    def version():
        return {"version": API_VERSION}

    @app.get("/controlnet/settings")
    def settings():
        return {"control_net_unit_count": server.limits.max_controlnets}


def requests(scripts, notes: list[str]) -> list[UnitRequest]:
    """The enabled units of alwayson_scripts' controlnet entry (the script's name in any case, as A1111 matches
    it); other scripts are named in the notes."""
    if not isinstance(scripts, dict):
        raise ApiError(STATUS, "alwayson_scripts: expected an object of script name: {\"args\": [...]}",
                       param="alwayson_scripts", code="invalid_value")
    out = []
    for name, entry in scripts.items():
        if name.lower() != "controlnet":
            notes.append(f"ignored (no such script in flashsd3): alwayson_scripts.{name}")
            continue
        args = entry.get("args") if isinstance(entry, dict) else None
        if not isinstance(args, list):
            raise ApiError(STATUS, f"alwayson_scripts.{name}: expected {{\"args\": [unit, ...]}}",
                           param=f"alwayson_scripts.{name}", code="invalid_value")
        units = (request(unit, f"alwayson_scripts.{name}.args[{k}]", notes) for k, unit in enumerate(args))
        out += [u for u in units if u is not None]
    return out


def request(unit, field: str, notes: list[str]) -> UnitRequest | None:
    """One unit as a Request (None when disabled)."""
    if not isinstance(unit, dict):
        raise ApiError(STATUS, f"{field}: expected an object (a ControlNet unit)", param=field, code="invalid_value")
    v = parse_fields(unit, UNIT, status=STATUS, prefix=field + ".")
    if not v.get("enabled", True):
        return None
    ignored = sorted(k for k, value in unit.items() if k in IGNORED and value not in IGNORED[k])
    unknown = sorted(k for k in unit if k not in UNIT and k not in IGNORED)
    image = v.get("image", v.get("input_image"))
    if isinstance(image, dict):  # {"image": ..., "mask": ...}: the mask is for the extension's inpaint modules
        ignored += ["image.mask"] if image.get("mask") is not None else []
        image = image.get("image")
    if "model" not in v:
        raise ApiError(STATUS, f"{field}.model is required: one of the ControlNets loaded at start (GET "
                       "/controlnet/model_list)", param=f"{field}.model", code="missing_controlnet")
    module = v.get("module") or "none"
    settings = tuple(None if t is None or t == -1 else t for t in (v.get("threshold_a"), v.get("threshold_b")))
    takes = len(MODULES[module][1]) if module in MODULES else len(settings)
    ignored += [f"threshold_{'ab'[k]}" for k in range(takes, 2) if settings[k] is not None]
    notes += [f"ignored (no effect in flashsd3): {field}.{', '.join(ignored)}"] if ignored else []
    notes += [f"ignored (not a ControlNet unit field): {field}.{', '.join(unknown)}"] if unknown else []
    return UnitRequest(field, NAMES, v["model"], image, v.get("weight"), v.get("guidance_start"),
                   v.get("guidance_end", v.get("guidance")), module, settings[:takes],
                   crop=_crop(v.get("resize_mode", "Crop and Resize"), field), show=v.get("save_detected_map", True))


def _crop(mode, field: str) -> bool:
    if isinstance(mode, (str, int)) and not isinstance(mode, bool) and mode in RESIZE_MODES:
        return RESIZE_MODES[mode]
    raise ApiError(STATUS, f"{field}.resize_mode {str(mode)[:40]!r} is not available; flashsd3 has: Just Resize (0), "
                   "Crop and Resize (1)", param=f"{field}.resize_mode", code="unknown_resize_mode")


def generation_params(units) -> dict[str, str]:
    """info's extra_generation_params entries, as the extension writes them ("ControlNet 0": "Module: ...")."""
    return {f"ControlNet {k}": f"Module: {u.module}, Model: {u.name}, Weight: {u.run.scale:g}, Resize Mode: "
            f"{'Crop and Resize' if u.crop else 'Just Resize'}, Guidance Start: {u.run.start:g}, Guidance End: "
            f"{u.run.stop:g}" for k, u in enumerate(units)}


def detected_maps(units) -> list[str]:
    """The control images used (after preprocessing and crop), base64 PNG, for the units that ask for them."""
    out = []
    for u in units:
        if u.show:
            buffer = io.BytesIO()
            u.run.image.save(buffer, format="PNG")
            out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def scrubbed(scripts):
    """alwayson_scripts as echoed in `parameters`: the units' images left out (as A1111 leaves out init_images)."""
    if not isinstance(scripts, dict):
        return scripts
    out = {}
    for name, entry in scripts.items():
        args = entry.get("args") if isinstance(entry, dict) else None
        if name.lower() == "controlnet" and isinstance(args, list):
            entry = {**entry, "args": [{**u, **{k: None for k in ("image", "input_image", "mask") if k in u}}
                                       if isinstance(u, dict) else u for u in args]}
        out[name] = entry
    return out
