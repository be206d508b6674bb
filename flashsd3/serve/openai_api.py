"""OpenAI Images API: POST /v1/images/generations (JSON) and /v1/images/edits (multipart).

Shapes as platform.openai.com/docs/api-reference/images: {"created", "data": [{"b64_json"}]}, errors
{"error": {...}}; unknown fields are refused as OpenAI refuses them ("Unrecognized request argument
supplied"). flashsd3's settings ride along as extra fields (the `openai` client's extra_body): seed,
negative_prompt, recipe, steps, guidance, sampler, shift, slg_*, loras, controlnets, and strength for edits.
`model`, `quality`, `style`, `user` and the like are accepted and have no effect: the model is fixed at start.

controlnets: [{"name", "image" (base64 PNG/JPEG/WebP/BMP), "scale", "start", "end", "preprocess"}], name one
of those loaded at start; scale defaults to its --controlnet scale, start/end (fractions of the steps) to 0/1,
preprocess (none, canny, blur, tile, blur_gaussian, tile_resample) to none; an edit's unit without image uses
the image to edit. In the multipart form of /edits it is one field of JSON text.
"""
from __future__ import annotations

import base64
import json
import re
import time

from fastapi import FastAPI, Request

from .controls import UnitRequest, make_units
from .errors import ApiError
from .fields import Field, parse_fields
from .spec import build_spec
from .uploads import open_image, openai_mask, rgb

COMMON = {
    "prompt": Field("str"), "n": Field("int"), "size": Field("str"), "response_format": Field("str"),
    "model": Field("str"), "quality": Field("str"), "style": Field("str"), "user": Field("str"),
    "background": Field("str"), "moderation": Field("str"), "output_format": Field("str"),
    "output_compression": Field("int", 0, 100), "stream": Field("bool"), "partial_images": Field("int", 0, 3),
    # flashsd3's extra fields
    "seed": Field("int", 0), "negative_prompt": Field("str"), "recipe": Field("str"), "steps": Field("int", 1),
    "guidance": Field("float"), "sampler": Field("str"), "shift": Field("float"), "slg_layers": Field("layers"),
    "slg_scale": Field("float"), "slg_start": Field("float"), "slg_stop": Field("float"), "loras": Field("loras"),
    "controlnets": Field("objects"),
}
UNIT = {"name": Field("any"), "image": Field("any"), "scale": Field("float"), "start": Field("float", 0, 1),
        "end": Field("float", 0, 1), "preprocess": Field("str")}
UNIT_NAMES = {"name": "name", "image": "image", "scale": "scale", "start": "start", "stop": "end",
              "module": "preprocess"}
EDIT = {**COMMON, "strength": Field("float"), "input_fidelity": Field("str"), "image": Field("any"),
        "image[]": Field("any"), "mask": Field("any")}
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
LABEL = re.compile(r"[^A-Za-z0-9._-]")


def add_routes(app: FastAPI, server) -> None:
    from .app import generate

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        body = await json_body(request)
        values = check_fields(body, COMMON, form=False)
        values["controls"] = await make_units(units(values.pop("controlnets", [])), server.engine, server.limits, 400)
        spec = build_spec(values, server.engine, server.limits, status=400)
        task = await generate(request, server, spec, request.headers.get("x-task-id"))
        return answer(task)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "images/edits takes multipart/form-data (image, prompt, optional mask, ...)",
                           code="invalid_content_type")
        form = await request.form(max_files=3, max_fields=60)
        try:
            values = check_fields(dict(form), EDIT, form=True)
            await _read_images(form, values, server.limits)
        finally:
            await form.close()
        values["controls"] = await make_units(units(values.pop("controlnets", [])), server.engine, server.limits,
                                              400, (values["image"], values["image_label"]))
        spec = build_spec(values, server.engine, server.limits, status=400)
        task = await generate(request, server, spec, request.headers.get("x-task-id"))
        return answer(task)


async def json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def check_fields(body: dict, table: dict, *, form: bool) -> dict:
    unknown = [name for name in body if name not in table]
    if any(name.startswith("controlnets[") for name in unknown):
        raise ApiError(400, "controlnets in a form is one field of JSON text: "
                       "extra_body={'controlnets': json.dumps([{'name': ..., 'image': ...}])}", param="controlnets",
                       code="invalid_value")
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    values = parse_fields(body, table, form=form)
    if values.get("response_format", "b64_json") != "b64_json":
        raise ApiError(400, "response_format must be b64_json: this server keeps no files to link to",
                       param="response_format", code="unsupported_value")
    if values.get("output_format", "png") != "png":
        raise ApiError(400, "output_format must be png (the PNG carries the settings)", param="output_format",
                       code="unsupported_value")
    if values.get("stream"):
        raise ApiError(400, "stream is not supported: the answer comes when the images are done", param="stream",
                       code="unsupported_value")
    size = values.pop("size", "auto")
    if size != "auto":
        m = SIZE.match(size)
        if not m:
            raise ApiError(400, f"size must be WIDTHxHEIGHT (e.g. 1024x1024) or auto, got {size[:40]!r}",
                           param="size", code="invalid_value")
        values["width"], values["height"] = int(m.group(1)), int(m.group(2))
    return values


def units(raw: list[dict]) -> list[UnitRequest]:
    """The controlnets field's units, their fields checked (the images and names are checked by make_units)."""
    out = []
    for k, unit in enumerate(raw):
        where = f"controlnets[{k}]"
        unknown = [name for name in unit if name not in UNIT]
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {where}.{unknown[0]}",
                           param=f"{where}.{unknown[0]}", code="unknown_parameter")
        v = parse_fields(unit, UNIT, prefix=where + ".")
        if "name" not in v:
            raise ApiError(400, f"{where}.name is required: one of the ControlNets loaded at start",
                           param=f"{where}.name", code="missing_controlnet")
        out.append(UnitRequest(where, UNIT_NAMES, v["name"], v.get("image"), v.get("scale"), v.get("start"),
                           v.get("end"), v.get("preprocess")))
    return out


async def _read_images(form, values: dict, limits) -> None:
    files = [form.get(name) for name in ("image", "image[]")]
    image = next((f for f in files if f is not None), None)
    if image is None or isinstance(image, str):
        raise ApiError(400, "image is required: a file field of the form", param="image", code="missing_image")
    values["image"] = rgb(open_image(await image.read(), "image", limits.max_upload_pixels, 400))
    values["image_label"] = label(image.filename)
    mask = form.get("mask")
    if mask is not None:
        if isinstance(mask, str):
            raise ApiError(400, "mask must be a file field (a PNG with transparency)", param="mask",
                           code="invalid_mask")
        values["mask"] = openai_mask(open_image(await mask.read(), "mask", limits.max_upload_pixels, 400))
        values["mask_label"] = label(mask.filename)
    values.pop("image[]", None)


def label(filename: str | None) -> str:
    """An upload's name as recorded in the metadata: its last part, plain characters only (never opened)."""
    name = LABEL.sub("_", (filename or "").replace("\\", "/").rsplit("/", 1)[-1])[:80].lstrip(".")
    return name or "upload"


def answer(task) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode()}
                                                   for png in task.result]}
