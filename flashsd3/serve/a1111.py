"""AUTOMATIC1111's API, the subset scripts and plugins use: txt2img, img2img, progress, sd-models,
samplers, options, loras (field names and response shapes of A1111's modules/api/models.py and api.py), and
the ControlNet extension's units in alwayson_scripts (a1111_controlnet.py).

A field of A1111's that has no meaning here (hires fix, face restore, scripts, ...) is ignored and named
in the response's `info` "notes", as is a field A1111 does not have. An omitted size, steps or CFG scale
takes the recipe's value and the model's default size (A1111's 20 steps / CFG 7 / 512 px are SD1.5's).
A1111's own defaults are kept where they carry over: seed -1 (random), batch_size and n_iter 1,
denoising_strength 0.75, inpainting_mask_invert 0. Errors are 422 in A1111's error shape.
"""
from __future__ import annotations

import base64
import json
import time

from fastapi import FastAPI, Request

from . import a1111_controlnet
from .controls import make_units
from .errors import ApiError
from .fields import Field, parse_fields
from .spec import build_spec
from .uploads import a1111_mask, from_base64, open_image, rgb

STATUS = 422
# A1111 sampler names -> flashsd3 samplers (ours are accepted as they are too)
SAMPLER_NAMES = {"Flash": "flash", "Flash (initial noise)": "flash_initial", "Euler": "euler", "DPM++ 2M": "dpmpp_2m"}
USED = {
    "prompt": Field("str"), "negative_prompt": Field("str"), "seed": Field("int", -1), "steps": Field("int", 1),
    "cfg_scale": Field("float"), "sampler_name": Field("str"), "sampler_index": Field("str"),
    "width": Field("int", 1), "height": Field("int", 1), "batch_size": Field("int", 1), "n_iter": Field("int", 1),
    "force_task_id": Field("str"),
    # flashsd3's own settings (not A1111 fields)
    "recipe": Field("str"), "shift": Field("float"), "slg_layers": Field("layers"), "slg_scale": Field("float"),
    "slg_start": Field("float"), "slg_stop": Field("float"), "loras": Field("loras"),
    "alwayson_scripts": Field("any"),  # the ControlNet extension's units; other scripts are noted as ignored
}
USED_IMG2IMG = {**USED, "init_images": Field("any"), "mask": Field("any"), "denoising_strength": Field("float"),
                "inpainting_mask_invert": Field("int", 0, 1)}
# A1111 fields with no effect here, with A1111's defaults: a different value is named in info's notes
IGNORED = {
    "styles": [], "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "scheduler": "Automatic", "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "eta": None, "s_min_uncond": 0, "s_churn": 0, "s_tmax": None, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "firstpass_image": None, "comments": {},
    "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None,
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
    "hr_additional_modules": None, "script_name": None, "script_args": [], "send_images": True,
    "save_images": False, "infotext": None, "distilled_cfg_scale": None,
    "resize_mode": 0, "image_cfg_scale": None, "mask_blur": 4, "mask_blur_x": 4, "mask_blur_y": 4,
    "mask_round": True, "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
    "initial_noise_multiplier": None, "latent_mask": None, "include_init_images": False,
}
RENAMES = {"guidance": "cfg_scale", "sampler": "sampler_name", "strength": "denoising_strength", "n": "batch_size"}


def add_routes(app: FastAPI, server) -> None:
    from .app import generate

    async def run(request: Request, table: dict):
        from .openai_api import json_body

        try:
            body = await json_body(request)
        except ApiError as e:
            raise ApiError(STATUS, e.message, code=e.code) from None
        values, notes = a1111_values(body, table)
        scripts = values.pop("alwayson_scripts", None)
        if table is USED_IMG2IMG:
            edit_values(values, notes, server.limits)
        units = a1111_controlnet.requests(scripts, notes) if scripts else []
        edit = (values["image"], values["image_label"]) if "image" in values else None
        values["controls"] = await make_units(units, server.engine, server.limits, STATUS, edit)
        spec = build_spec(values, server.engine, server.limits, status=STATUS, renames=RENAMES, notes=notes)
        task = await generate(request, server, spec, values.get("force_task_id"))
        return response(body, spec, task, server.engine)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await run(request, USED)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await run(request, USED_IMG2IMG)

    @app.get("/sdapi/v1/progress")
    def progress():
        status = server.worker.status()
        steps, step = status["running_steps"], status["running_step"]
        busy = status["running"] > 0
        return {"progress": step / steps if busy and steps else 0.0, "eta_relative": 0.0,
                "state": {"skipped": False, "interrupted": False, "job": "busy" if busy else "",
                          "job_count": status["queue_length"] + (1 if busy else 0), "job_timestamp": "0",
                          "job_no": 0, "sampling_step": step if busy else 0, "sampling_steps": steps if busy else 0},
                "current_image": None, "textinfo": None}

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        name = server.engine.model_label
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": name, "aliases": [ours], "options": {}} for name, ours in SAMPLER_NAMES.items()]

    @app.get("/sdapi/v1/options")
    def options():
        return {"sd_model_checkpoint": server.engine.model_label, "samples_format": "png",
                "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}

    @app.get("/sdapi/v1/loras")
    def loras():
        return [{"name": name, "alias": name, "metadata": {"scale": scale}} for name, _, scale in server.engine.loras]


def a1111_values(body: dict, table: dict) -> tuple[dict, list[str]]:
    """Converted fields under the common names (build_spec's), and notes on what was ignored."""
    values = parse_fields(body, table, status=STATUS)
    ignored = sorted(k for k, v in body.items() if k in IGNORED and v != IGNORED[k] and v not in (None, "", [], {}))
    unknown = sorted(k for k in body if k not in table and k not in IGNORED)
    notes = [f"ignored (no effect in flashsd3): {', '.join(ignored)}"] if ignored else []
    notes += [f"ignored (not an A1111 field): {', '.join(unknown)}"] if unknown else []
    if values.get("seed") == -1:
        values["seed"] = None
    values["n"] = values.pop("batch_size", 1) * values.pop("n_iter", 1)
    if "cfg_scale" in values:
        values["guidance"] = values.pop("cfg_scale")
    name = values.pop("sampler_name", None) or None
    index = values.pop("sampler_index", None)
    if name is None and index not in (None, "", "Euler"):  # A1111 reads the deprecated index without a name
        name = index
    if name is not None:
        values["sampler"] = sampler(name)
    return values, notes


def sampler(name: str) -> str:
    if name in SAMPLER_NAMES.values():
        return name
    if name not in SAMPLER_NAMES:
        have = ", ".join(f"{a} ({b})" for a, b in SAMPLER_NAMES.items())
        raise ApiError(STATUS, f"sampler {name[:40]!r} is not available; flashsd3 has: {have}", param="sampler_name",
                       code="unknown_sampler")
    return SAMPLER_NAMES[name]


def edit_values(values: dict, notes: list[str], limits) -> None:
    images = values.pop("init_images", None)
    if not isinstance(images, list) or not images:
        raise ApiError(STATUS, "init_images is required: a list with one base64 image", param="init_images",
                       code="missing_image")
    if len(images) > 1:
        notes.append(f"init_images: the first of {len(images)} images is used")
    data = from_base64(images[0], "init_images", STATUS)
    values["image"], values["image_label"] = rgb(open_image(data, "init_images", limits.max_upload_pixels, STATUS)), \
        "upload"
    mask = values.pop("mask", None)
    if mask is not None:
        im = open_image(from_base64(mask, "mask", STATUS), "mask", limits.max_upload_pixels, STATUS)
        values["mask"], values["mask_label"] = a1111_mask(im, bool(values.get("inpainting_mask_invert", 0))), "mask"
    values.pop("inpainting_mask_invert", None)
    values["strength"] = values.pop("denoising_strength", 0.75)


def response(body: dict, spec, task, engine) -> dict:
    names = {ours: a for a, ours in SAMPLER_NAMES.items()}
    rec = spec.recipe
    seeds = [spec.seed + k for k in range(spec.n)]
    size = f"{spec.width}x{spec.height}"
    controls = a1111_controlnet.generation_params(spec.controls)
    infotext = (f"{spec.prompt}\nNegative prompt: {spec.negative or ''}\nSteps: {rec.steps}, Sampler: "
                f"{names[rec.sampler]}, CFG scale: {rec.guidance:g}, Seed: {{seed}}, Size: {size}, "
                f"Model: {engine.model_label}, Recipe: {rec.name}, Shift: {rec.shift:g}"
                + "".join(f', {k}: "{v}"' for k, v in controls.items()))
    info = {"prompt": spec.prompt, "all_prompts": [spec.prompt] * spec.n, "negative_prompt": spec.negative or "",
            "all_negative_prompts": [spec.negative or ""] * spec.n, "seed": spec.seed, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * spec.n, "subseed_strength": 0, "width": spec.width,
            "height": spec.height, "sampler_name": names[rec.sampler], "cfg_scale": rec.guidance, "steps": rec.steps,
            "batch_size": spec.n, "restore_faces": False, "sd_model_name": engine.model_label, "sd_model_hash": None,
            "denoising_strength": spec.edit.strength if spec.edit else None, "styles": [],
            "extra_generation_params": {"recipe": rec.name, "shift": rec.shift,
                                        "loras": {n: s for n, s in spec.loras}, **controls},
            "index_of_first_image": 0, "infotexts": [infotext.format(seed=s) for s in seeds],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "version": "flashsd3",
            "task_id": task.id, "model_batch": task.model_batch, "notes": spec.notes}
    parameters = {**body, "init_images": None, "mask": None} if "init_images" in body else dict(body)
    if "alwayson_scripts" in body:
        parameters["alwayson_scripts"] = a1111_controlnet.scrubbed(body["alwayson_scripts"])
    images = [base64.b64encode(png).decode() for png in task.result] + a1111_controlnet.detected_maps(spec.controls)
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}
