"""flashsd3-serve with ControlNets (the demo's toy ControlNet and a random inpainting one loaded from a diffusers
folder), driven over HTTP: the A1111 extension's units and the OpenAI `controlnets` field give flashsd3-sample's
bytes for the same --controlnet / --control-image (a base64 control image is recorded as "upload": the reference
runs read a file of that name); preprocessing, A1111's crop, a steps window; requests with other control images
share a model call, other scales do not; bad input is a 4xx JSON error in each API's shape."""
from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install -e '.[test]'")

from helpers_serve import Hold, ServerProcess, finish, pixels, png_text, sample_runs  # noqa: E402

ROUNDING = 3  # levels a batched image may differ from its solo computation (tests/test_serve_api.py)
FLAGS = ("--controlnet", "demo:0.7", "--max-upload-pixels", 65536, "--max-pixels", 65536, "--max-steps", 5000,
         "--max-controlnets", 2)
DEMO = ("--dtype", "fp32", "--demo")


class Refs:
    """Control images, the inpainting ControlNet's folder, and flashsd3-sample's files (one process)."""

    def __init__(self, root):
        from flashsd3.controlnet import DEMO_CONTROLNET, ControlNet
        from flashsd3.controlnet.preprocess import canny
        from helpers_controlnet import randomize, save_diffusers_folder

        self.root = root
        rng = np.random.default_rng(0)
        edges = np.zeros((48, 80), np.uint8)
        edges[8:40, 30] = edges[8, 30:70] = edges[20:40, 60] = 255
        Image.fromarray(edges).convert("RGB").save(root / "upload", format="PNG")  # 80x48
        Image.fromarray(edges).convert("RGB").crop((16, 0, 64, 48)).save(root / "cropped.png")  # its centre square
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(root / "other.png")
        photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        photo.save(root / "in.png")
        canny(photo).save(root / "canny.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 8:40] = 255
        Image.fromarray(mask).save(root / "mask.png")
        (root / "openai").mkdir()  # OpenAI's form of mask.png (transparent = repaint), recorded as mask.png
        Image.fromarray(np.dstack([np.full((64, 64, 3), 200, np.uint8), 255 - mask]), "RGBA").save(
            root / "openai" / "mask.png")
        net = ControlNet(replace(DEMO_CONTROLNET, extra_channels=1))
        randomize(net, seed=5, std=0.05)  # its zero-initialised projections would change nothing
        self.inpaint_cn = str(root / "inpaint-cn")
        save_diffusers_folder(net, root / "inpaint-cn")
        self.proc = sample_runs([
            ["--prompt", "a fox", "--seed", 3, "--controlnet", "demo:0.7", "--control-image", "upload", *DEMO,
             "--out", "a1111"],
            ["--prompt", "a fox", "--seed", 4, "--num-images", 2, "--batch-size", 2, "--width", 64, "--height", 64,
             "--controlnet", "demo:0.5", "--control-image", "upload", *DEMO, "--out", "gen"],
            ["--prompt", "a hat", "--image", "in.png", "--mask", "mask.png", "--seed", 11, "--controlnet",
             self.inpaint_cn, "--control-image", "in.png", *DEMO, "--out", "inpaint_cn"],
            ["--prompt", "a hat", "--image", "in.png", "--mask", "mask.png", "--seed", 11, *DEMO, "--out", "inpaint"],
            ["--prompt", "edges", "--seed", 5, "--controlnet", "demo", "--control-image", "canny.png", *DEMO,
             "--out", "canny"],
            ["--prompt", "crop", "--seed", 6, "--width", 64, "--height", 64, "--controlnet", "demo:0.7",
             "--control-image", "cropped.png", *DEMO, "--out", "crop"],
            ["--prompt", "batch", "--seed", 20, "--controlnet", "demo:0.7", "--control-image", "upload", *DEMO,
             "--out", "b1"],
            ["--prompt", "batch", "--seed", 20, "--controlnet", "demo:0.7", "--control-image", "other.png", *DEMO,
             "--out", "b2"]], root)
        self.done = False

    def files(self, folder: str) -> list[bytes]:
        if not self.done:
            finish(self.proc)
            self.done = True
        return [png.read_bytes() for png in sorted((self.root / folder).glob("*.png"))]

    def file(self, folder: str) -> bytes:
        [png] = self.files(folder)
        return png

    def b64(self, name: str) -> str:
        return base64.b64encode((self.root / name).read_bytes()).decode()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    refs = Refs(tmp_path_factory.mktemp("serve_cn_refs"))
    yield refs
    if refs.proc.poll() is None:
        refs.proc.kill()


@pytest.fixture(scope="module")
def server(refs):
    server = ServerProcess(*FLAGS, "--controlnet", refs.inpaint_cn).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key="not-checked-on-loopback", max_retries=0, timeout=120)


def txt2img(server, units: list[dict], **fields):
    body = {"prompt": "x", "seed": 1, **fields, "alwayson_scripts": {"controlnet": {"args": units}}}
    return server.post("/sdapi/v1/txt2img", body)


def test_controlnet_flags_are_checked_as_flashsd3_samples_before_loading(tmp_path):
    import torch

    from flashsd3.cli import UsageError
    from flashsd3.controlnet import DEMO_CONTROLNET, ControlNet
    from flashsd3.serve.cli import build_parser
    from flashsd3.serve.engine import load_engine
    from helpers_controlnet import save_diffusers_folder

    save_diffusers_folder(ControlNet(replace(DEMO_CONTROLNET, num_heads=4)), tmp_path / "wide")
    for flags, message in [(["--controlnet", str(tmp_path / "nowhere")], "no such file or folder"),
                           (["--controlnet", "demo:strong"], "the scale 'strong' is not a number"),
                           (["--controlnet", str(tmp_path / "wide")], "width (heads x head_dim) 32 does not match "
                                                                       "the transformer's 16")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            load_engine(build_parser().parse_args(["--demo", *flags]), torch.device("cpu"), "fp32")


def test_controlnets_are_listed_by_name(server):
    assert server.get("/controlnet/model_list")[2] == {"model_list": ["demo", "inpaint-cn"]}
    modules = server.get("/controlnet/module_list")[2]
    assert modules["module_list"] == ["none", "canny", "blur_gaussian", "tile_resample", "blur", "tile"]
    assert modules["module_detail"]["canny"]["sliders"][0] == {"name": "low", "value": 100, "min": 1, "max": 255}
    assert server.get("/controlnet/version")[2] == {"version": 2}
    config = server.get("/api/config")[2]
    assert config["controlnets"] == [{"name": "demo", "scale": 0.7, "control_type": None, "inpainting": False},
                                     {"name": "inpaint-cn", "scale": 1.0, "control_type": None, "inpainting": True}]


def test_a1111_extension_unit_gives_flashsd3_sample_bytes(server, refs):
    status, _, r = txt2img(server, [{"model": "demo", "image": refs.b64("upload"), "weight": 0.7}], prompt="a fox",
                           seed=3)  # no size: the control image's, 80x48; no "enabled": on, as the extension's API
    assert status == 200, r
    got = base64.b64decode(r["images"][0])
    assert got == refs.file("a1111")
    assert json.loads(png_text(got)["controlnet"]) == [{"source": "demo", "scale": 0.7, "control_image": "upload"}]
    assert len(r["images"]) == 2  # the extension's detected map comes after the images: here the control image
    assert (pixels(base64.b64decode(r["images"][1])) == pixels((refs.root / "upload").read_bytes())).all()
    info = json.loads(r["info"])
    assert info["extra_generation_params"]["ControlNet 0"] == ("Module: none, Model: demo, Weight: 0.7, Resize Mode: "
                                                               "Crop and Resize, Guidance Start: 0, Guidance End: 1")
    assert info["infotexts"][0].endswith(', ControlNet 0: "Module: none, Model: demo, Weight: 0.7, Resize Mode: '
                                         'Crop and Resize, Guidance Start: 0, Guidance End: 1"')
    assert r["parameters"]["alwayson_scripts"]["controlnet"]["args"][0]["image"] is None  # not echoed back


def test_openai_controlnets_field_gives_flashsd3_sample_bytes(client, refs):
    result = client.images.generate(prompt="a fox", n=2, size="64x64", extra_body={  # resized to the size given
        "seed": 4, "controlnets": [{"name": "demo", "image": refs.b64("upload"), "scale": 0.5}]})
    assert [base64.b64decode(d.b64_json) for d in result.data] == refs.files("gen")


def test_openai_edit_with_the_inpainting_controlnet_on_the_image_to_edit(client, refs):
    with open(refs.root / "in.png", "rb") as image, open(refs.root / "openai" / "mask.png", "rb") as mask:
        result = client.images.edit(image=image, mask=mask, prompt="a hat", extra_body={  # in a form: JSON text
            "seed": 11, "controlnets": json.dumps([{"name": "inpaint-cn"}])})  # no image: the image to edit
    got = base64.b64decode(result.data[0].b64_json)
    assert got == refs.file("inpaint_cn")
    assert json.loads(png_text(got)["controlnet"]) == [{"source": refs.inpaint_cn, "scale": 1.0,
                                                        "control_image": "in.png"}]
    assert np.abs(pixels(got) - pixels(refs.file("inpaint"))).max() > 10 * ROUNDING  # the ControlNet acts
    with open(refs.root / "in.png", "rb") as image, pytest.raises(openai.BadRequestError,
                                                                  match="controlnets in a form is one field of JSON"):
        client.images.edit(image=image, prompt="x", extra_body={"controlnets": [{"name": "demo"}]})  # flattened


def test_a1111_canny_preprocessor_and_crop_and_resize(server, refs):
    status, _, r = txt2img(server, [{"model": "demo", "image": refs.b64("in.png"), "module": "canny", "weight": 1}],
                           prompt="edges", seed=5)
    assert status == 200, r
    got = base64.b64decode(r["images"][0])
    assert (pixels(got) == pixels(refs.file("canny"))).all()  # flashsd3-sample on preprocess.canny's map
    assert json.loads(png_text(got)["controlnet"]) == [{"source": "demo", "scale": 1.0, "control_image": "upload",
                                                        "preprocess": "canny --low 100 --high 200"}]
    assert (pixels(base64.b64decode(r["images"][1])) == pixels((refs.root / "canny.png").read_bytes())).all()
    # the extension's default resize mode: the 80x48 control image cropped to the 64x64 output's aspect, resized
    status, _, r = txt2img(server, [{"model": "demo", "image": refs.b64("upload"), "save_detected_map": False}],
                           prompt="crop", seed=6, width=64, height=64)
    assert status == 200 and len(r["images"]) == 1, r
    assert (pixels(base64.b64decode(r["images"][0])) == pixels(refs.file("crop"))).all()


def test_a1111_guidance_window_is_the_pipelines_control_guidance_start(server, refs):
    from flashsd3.demo import demo_controlnet
    from flashsd3.pipeline import FlashSD3Pipeline

    status, _, r = txt2img(server, [{"model": "demo", "image": refs.b64("upload"), "guidance_start": 0.5}],
                           prompt="late", seed=8)
    assert status == 200, r
    got = base64.b64decode(r["images"][0])
    assert json.loads(png_text(got)["controlnet"]) == [{"source": "demo", "scale": 0.7, "control_image": "upload",
                                                        "start": 0.5, "stop": 1.0}]
    pipe = FlashSD3Pipeline.demo(seed=0)  # the server's weights, called as flashsd3-sample calls it
    pipe.controlnets = [demo_controlnet(pipe.transformer)]
    edges = Image.open(refs.root / "upload").convert("RGB")
    out = pipe(["late"], seed=[8], height=48, width=80, control_image=edges, controlnet_conditioning_scale=0.7,
               control_guidance_start=0.5)
    assert (pixels(got) == np.asarray(out.images[0], dtype=np.int16)).all()


def test_other_control_images_share_a_model_call_other_scales_do_not(server, refs):
    """a and b: one seed, two control images, one call; c: another scale, a call of its own."""
    hold = Hold(server, "hold-cn")
    conns = {}
    try:
        for tag, image, weight in (("a", "upload", 0.7), ("b", "other.png", 0.7), ("c", "upload", 0.5)):
            unit = {"model": "demo", "image": refs.b64(image), "weight": weight, "save_detected_map": False}
            body = {"prompt": "batch", "seed": 20, "force_task_id": f"cn-{tag}",
                    "alwayson_scripts": {"controlnet": {"args": [unit]}}}
            conns[tag] = server.open_request("/sdapi/v1/txt2img", body)
            server.wait_state(f"cn-{tag}", ("queued",))
    finally:
        hold.release()
    answers = {}
    for tag, conn in conns.items():
        answers[tag] = json.loads(conn.getresponse().read())
        conn.close()
    assert {tag: json.loads(a["info"])["model_batch"] for tag, a in answers.items()} == {"a": 2, "b": 2, "c": 1}
    a, b = (pixels(base64.b64decode(answers[tag]["images"][0])) for tag in "ab")
    ref_a, ref_b = pixels(refs.file("b1")), pixels(refs.file("b2"))
    assert np.abs(a - ref_a).max() <= ROUNDING and np.abs(b - ref_b).max() <= ROUNDING  # each its own image
    assert np.abs(ref_a - ref_b).max() > 10 * ROUNDING


class Bad:
    """The pieces of a bad request: base64 images, good units of each API, request builders."""

    def __init__(self, refs):
        self.upload, self.small = refs.b64("upload"), refs.b64("in.png")  # 80x48, 64x64
        self.big = base64.b64encode(_png(Image.new("RGB", (300, 300)))).decode()  # 90,000 pixels by its header
        self.corrupt = base64.b64encode(_png(Image.new("RGB", (80, 48), "red"))[:60]).decode()
        self.odd = base64.b64encode(_png(Image.new("RGB", (80, 40)))).decode()
        self.path = refs.inpaint_cn  # the path of a loaded ControlNet
        self.a, self.o = {"model": "demo", "image": self.upload}, {"name": "demo", "image": self.upload}

    @staticmethod
    def a1111(*units):
        return "/sdapi/v1/txt2img", {"prompt": "x", "alwayson_scripts": {"controlnet": {"args": list(units)}}}

    @staticmethod
    def oai(*units):
        return "/v1/images/generations", {"prompt": "x", "controlnets": list(units)}


AP, OP = "alwayson_scripts.controlnet.args[0].", "controlnets[0]."
BAD = {  # case -> Bad -> (path, body, a fragment of the message, the field it names)
    "unknown name": lambda b: (*b.a1111({**b.a, "model": "canny-sd3"}), "no ControlNet named 'canny-sd3': "
                               "ControlNets are chosen by name, among those loaded at start: demo, inpaint-cn",
                               AP + "model"),
    "a path as a name": lambda b: (*b.oai({**b.o, "name": b.path}), "ControlNets are chosen by name, never by path",
                                   OP + "name"),
    "corrupt image": lambda b: (*b.a1111({**b.a, "image": b.corrupt}), "image is corrupt or truncated", AP + "image"),
    "oversized image": lambda b: (*b.oai({**b.o, "image": b.big}), "(--max-upload-pixels)", OP + "image"),
    "not base64": lambda b: (*b.oai({**b.o, "image": "%%%"}), "image: not valid base64", OP + "image"),
    "size mismatch": lambda b: (*b.a1111(b.a, {**b.a, "image": b.small}), "args[1].image: the control image is "
                                "64x64, the output 80x48: give it the output's size, or give width and height to "
                                "resize it", "alwayson_scripts.controlnet.args[1].image"),
    "size not a multiple": lambda b: (*b.oai({**b.o, "image": b.odd}), "not a multiple of 16", OP + "image"),
    "NaN weight": lambda b: (*b.a1111({**b.a, "weight": float("nan")}), "weight: must be a finite number, got nan",
                             AP + "weight"),
    "NaN scale": lambda b: (*b.oai({**b.o, "scale": float("nan")}), "scale: must be a finite number, got nan",
                            OP + "scale"),
    "start after end": lambda b: (*b.oai({**b.o, "start": 0.8, "end": 0.5}), "start: 0.8 must be below end 0.5",
                                  OP + "start"),
    "start after end, A1111": lambda b: (*b.a1111({**b.a, "guidance_start": 0.8, "guidance_end": 0.5}),
                                         "guidance_start: 0.8 must be below guidance_end 0.5", AP + "guidance_start"),
    "preprocessor it lacks": lambda b: (*b.a1111({**b.a, "module": "depth_midas"}), "preprocessor 'depth_midas' is "
                                        "not available; flashsd3 has: none, canny, blur_gaussian, tile_resample, "
                                        "blur, tile", AP + "module"),
    "resize and fill": lambda b: (*b.a1111({**b.a, "resize_mode": "Resize and Fill"}), "is not available; flashsd3 "
                                  "has: Just Resize (0), Crop and Resize (1)", AP + "resize_mode"),
    "inpainting ControlNet, no mask": lambda b: (*b.oai({**b.o, "name": "inpaint-cn"}), "is an inpainting "
                                                 "ControlNet (mask channel)", "controlnets[0]"),
    "too many": lambda b: (*b.oai(b.o, b.o, b.o), "3 ControlNets in one request; at most 2 (--max-controlnets)",
                           "controlnets"),
    "unknown unit field": lambda b: (*b.oai({**b.o, "weight": 1}), "Unrecognized request argument supplied: "
                                     "controlnets[0].weight", OP + "weight"),
    "no model": lambda b: (*b.a1111({"image": b.upload}), "model is required", AP + "model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_controlnet_input_is_a_4xx_json_error_in_each_apis_shape(server, refs, case):
    path, body, fragment, field = BAD[case](Bad(refs))
    status, headers, r = server.post(path, body)
    assert headers["content-type"] == "application/json" and "Traceback" not in json.dumps(r)
    if path.startswith("/sdapi"):
        assert status == 422 and set(r) == {"error", "detail", "body", "errors"}, r
        message = r["detail"]
    else:
        assert status == 400 and r["error"]["param"] == field, r
        message = r["error"]["message"]
    assert fragment in message and field in message, message


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
