"""flashsd3-serve over HTTP: the real server (uvicorn on a free loopback port, demo model) driven by the
official `openai` client and by raw JSON on AUTOMATIC1111's routes; same bytes as flashsd3-sample; error
shapes, caps, 429 under a full queue, cancellation of a queued request whose client goes away; a bounded
load test (32 concurrent clients, batching on); a second Ctrl-C (last: it stops the module's server)."""
from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
import time
from argparse import Namespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install -e '.[test]'")

from helpers_serve import Hold, ServerProcess, finish, in_threads, pixels, png_text, sample_runs  # noqa: E402

CLIENTS, SEED, QUEUE, BATCH = 32, 1000, 12, 4
FLAGS = ("--max-batch", BATCH, "--max-queue", QUEUE, "--max-images", 4, "--max-steps", 5000, "--max-pixels", 65536,
         "--max-body-mb", 1, "--max-upload-pixels", 65536, "--max-prompt-chars", 300)
SIZE = ("--width", 64, "--height", 64, "--dtype", "fp32", "--demo")


class Refs:
    """flashsd3-sample's files for the requests below, made in one process while the server starts."""

    def __init__(self, root):
        self.root = root
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "in.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 8:40] = 255  # white = repaint (flashsd3-sample); OpenAI's form: alpha 0 there
        Image.fromarray(mask).save(root / "mask.png")
        (root / "openai").mkdir()
        rgba = np.dstack([np.full((64, 64, 3), 200, np.uint8), 255 - mask])
        Image.fromarray(rgba, "RGBA").save(root / "openai" / "mask.png")
        self.proc = sample_runs([
            ["--prompt", "a red fox", "--seed", 7, "--num-images", 2, "--batch-size", 2, *SIZE, "--out", "txt"],
            ["--prompt", "a hat", "--image", "in.png", "--mask", "mask.png", "--seed", 11, "--dtype", "fp32",
             "--demo", "--out", "inpaint"],
            ["--prompt", "oil painting", "--image", "in.png", "--strength", 0.5, "--seed", 5, "--dtype", "fp32",
             "--demo", "--out", "img2img"],
            ["--prompt", "load", "--seed", SEED, "--num-images", CLIENTS, *SIZE, "--out", "load"],
            ["--prompt", "a red fox", "--seed", 7, "--sampler", "flash_initial", *SIZE, "--out", "initial"]], root)
        self.done = False

    def file(self, folder: str, name: str) -> bytes:
        if not self.done:
            finish(self.proc)
            self.done = True
        return (self.root / folder / name).read_bytes()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    refs = Refs(tmp_path_factory.mktemp("serve_refs"))
    yield refs
    if refs.proc.poll() is None:
        refs.proc.kill()


@pytest.fixture(scope="module")
def server(refs):
    server = ServerProcess(*FLAGS).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key="not-checked-on-loopback", max_retries=0, timeout=120)


def b64_png(data: bytes) -> str:
    return base64.b64encode(data).decode()


# The OpenAI Images API with the official client -----------------------------------------------------------

def test_openai_generations_give_flashsd3_sample_bytes(client, refs):
    result = client.images.generate(model="flashsd3", prompt="a red fox", n=2, size="64x64",
                                    response_format="b64_json", extra_body={"seed": 7})
    assert isinstance(result.created, int) and len(result.data) == 2
    got = [base64.b64decode(d.b64_json) for d in result.data]
    assert got[0] == refs.file("txt", "00000-7-a-red-fox.png")
    assert got[1] == refs.file("txt", "00001-8-a-red-fox.png")
    meta = png_text(got[1])
    assert (meta["prompt"], meta["seed"], meta["index"], meta["recipe"]) == ("a red fox", "8", "1", "flash-sd3")


def test_openai_edit_with_a_mask_is_inpainting(client, refs):
    with open(refs.root / "in.png", "rb") as image, open(refs.root / "openai" / "mask.png", "rb") as mask:
        result = client.images.edit(image=image, mask=mask, prompt="a hat", extra_body={"seed": 11})
    got = base64.b64decode(result.data[0].b64_json)
    assert got == refs.file("inpaint", "00000-11-a-hat.png")
    meta = png_text(got)
    assert (meta["image"], meta["mask"], meta["strength"]) == ("in.png", "mask.png", "1.0")


def test_openai_edit_without_a_mask_is_img2img_with_strength(client, refs):
    with open(refs.root / "in.png", "rb") as image:
        result = client.images.edit(image=image, prompt="oil painting", extra_body={"seed": 5, "strength": 0.5})
    got = base64.b64decode(result.data[0].b64_json)
    assert got == refs.file("img2img", "00000-5-oil-painting.png")
    assert json.loads(png_text(got)["mask"]) is None


def test_openai_errors_reach_the_client_in_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="64x64", extra_body={"sead": 1})
    assert e.value.status_code == 400
    assert e.value.body == {"message": "Unrecognized request argument supplied: sead", "type": "invalid_request_error",
                            "param": "sead", "code": "unknown_parameter"}
    with pytest.raises(openai.BadRequestError, match="response_format must be b64_json"):
        client.images.generate(prompt="x", size="64x64", response_format="url")
    with open(__file__, "rb") as not_an_image, pytest.raises(openai.BadRequestError, match="not a readable image"):
        client.images.edit(image=not_an_image, prompt="x")


# AUTOMATIC1111's API with raw JSON --------------------------------------------------------------------

def test_a1111_txt2img_shape_seeds_and_ignored_fields(server):
    body = {"prompt": "a boat", "seed": -1, "batch_size": 2, "width": 64, "height": 64, "sampler_name": "Flash",
            "enable_hr": True, "restore_faces": True, "hr_scale": 2.0, "styles": [], "my_plugin_field": 1}
    status, _, r = server.post("/sdapi/v1/txt2img", body)
    assert status == 200, r
    assert set(r) == {"images", "parameters", "info"} and r["parameters"] == body
    info = json.loads(r["info"])
    seed = info["seed"]
    assert isinstance(seed, int) and info["all_seeds"] == [seed, seed + 1]
    assert (info["width"], info["height"], info["steps"], info["sampler_name"]) == (64, 64, 4, "Flash")
    assert info["notes"] == ["ignored (no effect in flashsd3): enable_hr, restore_faces",
                             "ignored (not an A1111 field): my_plugin_field"]
    assert [png_text(base64.b64decode(im))["seed"] for im in r["images"]] == [str(seed), str(seed + 1)]
    assert info["infotexts"][1].startswith("a boat\nNegative prompt: \nSteps: 4, Sampler: Flash")


def test_a1111_flash_initial_sampler_gives_flashsd3_sample_pixels(server, refs):
    body = {"prompt": "a red fox", "seed": 7, "width": 64, "height": 64, "sampler_name": "Flash (initial noise)"}
    status, _, r = server.post("/sdapi/v1/txt2img", body)
    assert status == 200, r
    assert json.loads(r["info"])["sampler_name"] == "Flash (initial noise)"
    png = base64.b64decode(r["images"][0])
    assert (pixels(png) == pixels(refs.file("initial", "00000-7-a-red-fox.png"))).all()
    flash = server.post("/sdapi/v1/txt2img", {**body, "sampler_name": "Flash"})[2]
    assert not (pixels(base64.b64decode(flash["images"][0])) == pixels(png)).all()  # another sampler, another image


def test_a1111_img2img_with_mask_invert_and_strength(server, refs):
    image = "data:image/png;base64," + b64_png((refs.root / "in.png").read_bytes())
    mask = b64_png((refs.root / "mask.png").read_bytes())
    body = {"prompt": "a hat", "init_images": [image], "mask": mask, "inpainting_mask_invert": 1,
            "denoising_strength": 0.5, "seed": 3, "mask_blur": 4, "inpainting_fill": 1}
    status, _, r = server.post("/sdapi/v1/img2img", body)
    assert status == 200, r
    info = json.loads(r["info"])
    assert info["denoising_strength"] == 0.5 and info["notes"] == ["ignored (no effect in flashsd3): inpainting_fill"]
    assert r["parameters"]["init_images"] is None and r["parameters"]["mask"] is None
    meta = png_text(base64.b64decode(r["images"][0]))
    assert (meta["image"], meta["mask"], meta["width"]) == ("upload", "mask", "64")
    small = b64_png(_png(Image.new("L", (32, 32))))
    status, _, r = server.post("/sdapi/v1/img2img", {**body, "mask": small})
    assert status == 422 and r["detail"] == "mask is 32x32 but the image is 64x64: they must be the same size"
    status, _, r = server.post("/sdapi/v1/img2img", {**body, "init_images": ["not base64!"]})
    assert (status, r["detail"]) == (422, "init_images: not valid base64")


def test_a1111_sampler_it_lacks_is_422_listing_its_own(server):
    status, _, r = server.post("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Euler a", "width": 64,
                                                     "height": 64})
    assert status == 422
    assert r == {"error": "unknown_sampler", "body": "", "detail": r["errors"],
                 "errors": "sampler 'Euler a' is not available; flashsd3 has: Flash (flash), Flash (initial noise) "
                           "(flash_initial), Euler (euler), DPM++ 2M (dpmpp_2m)"}


def test_a1111_info_routes(server):
    assert server.get("/sdapi/v1/sd-models")[2][0]["model_name"] == "demo"
    assert [s["name"] for s in server.get("/sdapi/v1/samplers")[2]] == ["Flash", "Flash (initial noise)", "Euler",
                                                                         "DPM++ 2M"]
    assert server.get("/sdapi/v1/options")[2]["sd_model_checkpoint"] == "demo"
    assert server.get("/sdapi/v1/loras")[2] == []
    progress = server.get("/sdapi/v1/progress")[2]
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image"}


# Bad input: 4xx JSON, never a traceback ---------------------------------------------------------------

@pytest.mark.parametrize(("path", "raw", "status", "message"), [
    ("/v1/images/generations", b"{bad", 400, "the body is not valid JSON"),
    ("/sdapi/v1/txt2img", b"{bad", 422, "the body is not valid JSON"),
    ("/v1/images/generations", b"[1]", 400, "the body must be a JSON object, got list"),
    ("/v1/images/generations", b'{"prompt": "x", "n": "two"}', 400, 'n: expected an integer, got "two"'),
    ("/v1/images/generations", b'{"prompt": "x", "steps": NaN}', 400, "steps: must be a finite number, got nan"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": Infinity}', 422, "cfg_scale: must be a finite number"),
    ("/v1/images/generations", b'{"prompt": 3}', 400, "prompt: expected a string, got 3"),
    ("/v1/images/generations", b'{"n": 1}', 400, "prompt is required"),
    ("/v1/images/generations", b'{"prompt": "x", "size": "big"}', 400, "size must be WIDTHxHEIGHT"),
    ("/v1/images/generations", b'{"prompt": "x", "size": "60x64"}', 400, "width must be a positive multiple of 16"),
    ("/v1/images/generations", b'{"prompt": "x", "recipe": "sdxl"}', 400, "recipe 'sdxl' is not one of"),
    ("/v1/images/generations", b'{"prompt": "x", "loras": ["style"]}', 400, "no LoRA named 'style'"),
    ("/v1/images/generations", b'{"prompt": "x", "slg_scale": 2}', 400, "slg_scale adjusts skip-layer guidance"),
    ("/v1/images/edits", b'{"prompt": "x"}', 400, "images/edits takes multipart/form-data"),
    ("/v1/nothing", b"{}", 404, "no route /v1/nothing"),
])
def test_bad_input_is_a_4xx_json_error_in_the_apis_shape(server, path, raw, status, message):
    got, headers, body = server.post(path, raw=raw)
    assert got == status and headers["content-type"] == "application/json"
    text = body["detail"] if path.startswith("/sdapi") else body["error"]["message"]
    if "--width" in message:  # the CLI's message with the flag as the field: '--width 60' -> 'width 60'
        message = message.replace("--", "")
    assert text.startswith(message) or message in text, text
    assert "Traceback" not in json.dumps(body)


def test_caps_are_4xx_naming_their_flag(server):
    cases = [({"prompt": "x", "n": 5, "size": "64x64"}, 400, "(--max-images)"),
             ({"prompt": "x", "steps": 5001, "size": "64x64"}, 400, "(--max-steps)"),
             ({"prompt": "x", "size": "512x512"}, 400, "(--max-pixels)"),
             ({"prompt": "x" * 301, "size": "64x64"}, 400, "(--max-prompt-chars)")]
    for body, status, flag in cases:
        got, _, r = server.post("/v1/images/generations", body)
        assert got == status and r["error"]["message"].endswith(flag), r
    head = b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    answer = raw_exchange(server.port, head + b"Content-Length: 2000000\r\n\r\n")  # refused before reading
    assert answer.startswith(b"HTTP/1.1 413 ") and b"(--max-body-mb)" in answer
    chunk = b"%x\r\n%s\r\n" % (2**16, b" " * 2**16)  # no length given: counted while reading
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n" + chunk * 17 + b"0\r\n\r\n"
    answer = raw_exchange(server.port, chunked)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"(--max-body-mb)" in answer
    bomb = b64_png(_png(Image.new("RGB", (300, 300))))  # 90,000 pixels by its header, a few hundred bytes
    got, _, r = server.post("/sdapi/v1/img2img", {"prompt": "x", "init_images": [bomb]})
    assert got == 422 and r["detail"].endswith("(--max-upload-pixels)"), r
    truncated = b64_png(_png(Image.new("RGB", (64, 64), "red"))[:60])
    got, _, r = server.post("/sdapi/v1/img2img", {"prompt": "x", "init_images": [truncated]})
    assert got == 422 and ("corrupt" in r["detail"] or "not a readable image" in r["detail"]), r


def test_a_nan_generation_is_a_500_naming_the_cause_and_the_server_goes_on(server):
    got, _, r = server.post("/v1/images/generations", {"prompt": "x", "size": "64x64", "guidance": 1e30, "seed": 1})
    assert got == 500
    assert r["error"]["code"] == "generation_failed" and "NaN or inf in the latents" in r["error"]["message"]
    got, _, r = server.post("/v1/images/generations", {"prompt": "x", "size": "64x64", "seed": 1})
    assert got == 200 and len(r["data"]) == 1


# The queue: 429 when full, cancellation when the client goes away -----------------------------------------

def test_full_queue_is_429_and_a_queued_request_whose_client_leaves_is_dropped(server):
    before = server.metrics()
    hold = Hold(server, "hold-q")
    body = {"prompt": "q", "width": 64, "height": 64, "seed": 1}
    waiting = []
    try:
        for i in range(QUEUE):  # one at a time: requests sent together may reach the queue in another order
            waiting.append(server.open_request("/sdapi/v1/txt2img", {**body, "force_task_id": f"q{i}"}))
            assert server.wait_state(f"q{i}", ("queued",))["queue_position"] == i
        got, headers, r = server.post("/sdapi/v1/txt2img", body)
        assert got == 429 and int(headers["retry-after"]) >= 1 and "--max-queue" in r["detail"]
        got, _, r = server.post("/v1/images/generations", {"prompt": "q", "size": "64x64"})
        assert got == 429 and r["error"]["type"] == "requests" and r["error"]["code"] == "queue_full"
        waiting[1].close()  # the client goes away before its request started
        assert server.wait_state("q1", ("failed",), timeout=10)["queue_position"] is None
        assert server.progress("q2")["queue_position"] == 1
        assert server.metrics()["requests_cancelled_total"] == before["requests_cancelled_total"] + 1
    finally:
        for conn in waiting:
            conn.close()
        deadline = time.monotonic() + 30
        while server.metrics()["queue_length"] and time.monotonic() < deadline:  # all dropped before the worker
            time.sleep(0.05)                                                      # is free to start one
        hold.release()
    deadline = time.monotonic() + 30
    while server.metrics()["queue_length"] or server.metrics()["running_requests"]:
        assert time.monotonic() < deadline, server.metrics()
        time.sleep(0.05)
    after = server.metrics()
    assert after["images_served_total"] == before["images_served_total"]  # nothing ran for a client that left
    assert after["requests_rejected_total"] == before["requests_rejected_total"] + 2


def test_health_metrics_and_progress_of_a_finished_task(server):
    assert server.get("/health")[2]["status"] == "ok"
    got, _, r = server.post("/sdapi/v1/txt2img", {"prompt": "p", "width": 64, "height": 64, "force_task_id": "done1"})
    assert got == 200
    p = server.progress("done1")
    assert (p["state"], p["step"], p["steps"], p["model_batch"]) == ("done", 4, 4, 1)
    m = server.metrics()
    assert m["images_served_total"] >= 1 and m["step_seconds_mean"] > 0 and m["queue_length"] == 0
    assert server.get("/api/progress/nope")[0] == 404


def test_a_non_loopback_host_needs_a_key_or_no_auth():
    from flashsd3.cli import UsageError
    from flashsd3.serve.cli import check_security, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    args = Namespace(host="0.0.0.0", api_key=None, no_auth=False)
    with pytest.raises(UsageError, match="--host 0.0.0.0 serves other machines: give --api-key"):
        check_security(args)
    assert check_security(Namespace(host="0.0.0.0", api_key="k" * 16, no_auth=False)) == "k" * 16
    assert check_security(Namespace(host="0.0.0.0", api_key=None, no_auth=True)) is None
    assert check_security(Namespace(host="127.0.0.1", api_key=None, no_auth=False)) is None


# Load: 32 concurrent clients, batching on ------------------------------------------------------------------
# Levels (of 255) a batched image may differ from the same image computed alone: MKL's products are not
# batch-invariant (rows of another batch size take other code paths). Measured: at most 1 level, in 23
# of 64 demo images computed in batches of 4 (seeds 1000-1063, 64x64).
ROUNDING = 3


def load_client(server, seed: int, tag: str):
    status, headers, body = server.post("/sdapi/v1/txt2img", {"prompt": "load", "seed": seed, "width": 64,
                                                              "height": 64, "force_task_id": f"{tag}-{seed}"})
    return seed, status, headers, body


def check_own_image(seed: int, body: dict, refs: Refs) -> int:
    """The answer holds seed's image: settings text equal (but the index), pixels nearest to seed's own."""
    info = json.loads(body["info"])
    assert info["all_seeds"] == [seed] and len(body["images"]) == 1
    png = base64.b64decode(body["images"][0])
    files = {s: refs.file("load", f"{s - SEED:05d}-{s}-load.png") for s in range(SEED, SEED + CLIENTS)}
    assert {**png_text(png), "index": None} == {**png_text(files[seed]), "index": None}  # index: k of a run
    diff = {s: np.abs(pixels(png) - pixels(f)).max() for s, f in files.items()}
    assert diff[seed] <= ROUNDING, (seed, diff[seed])
    assert min(d for s, d in diff.items() if s != seed) > 10 * ROUNDING  # another seed's image is far off
    if info["model_batch"] == 1:
        assert (pixels(png) == pixels(files[seed])).all()  # alone: flashsd3-sample's pixels exactly
    return info["model_batch"]


def test_load_a_full_queue_takes_12_of_32_clients_and_batches_them(server, refs):
    before = server.metrics()
    hold = Hold(server, "hold-load")
    results = []
    try:
        runner = threading.Thread(target=lambda: results.extend(
            in_threads(lambda s: load_client(server, s, "w1"), list(range(SEED, SEED + CLIENTS)))))
        runner.start()
        deadline = time.monotonic() + 60
        while server.metrics()["requests_rejected_total"] < before["requests_rejected_total"] + CLIENTS - QUEUE:
            assert time.monotonic() < deadline, server.metrics()
            time.sleep(0.05)
        assert server.metrics()["queue_length"] == QUEUE
    finally:
        hold.release()
    runner.join(120)
    accepted = [(seed, body) for seed, status, _, body in results if status == 200]
    rejected = [headers for _, status, headers, _ in results if status == 429]
    assert len(accepted) == QUEUE and len(rejected) == CLIENTS - QUEUE
    assert all(int(headers["retry-after"]) >= 1 for headers in rejected)
    assert [check_own_image(seed, body, refs) for seed, body in accepted] == [BATCH] * QUEUE  # 3 calls of 4
    after = server.metrics()
    assert after["images_served_total"] - before["images_served_total"] == QUEUE
    assert after["batches_total"] - before["batches_total"] == QUEUE // BATCH


def test_load_32_clients_at_once_each_get_their_own_image_or_429(server, refs):
    before = server.metrics()
    results = in_threads(lambda s: load_client(server, s, "w2"), list(range(SEED, SEED + CLIENTS)))
    assert {status for _, status, _, _ in results} <= {200, 429}
    accepted = [(seed, body) for seed, status, _, body in results if status == 200]
    for seed, body in accepted:
        check_own_image(seed, body, refs)
    after = server.metrics()
    assert after["images_served_total"] - before["images_served_total"] == len(accepted)
    assert after["requests_rejected_total"] - before["requests_rejected_total"] == CLIENTS - len(accepted)
    assert after["requests_failed_total"] == before["requests_failed_total"]
    assert server.get("/health")[2]["status"] == "ok" and server.metrics()["queue_length"] == 0


def test_last_a_second_ctrl_c_exits_130_at_once(server):
    """Keep this test last: it stops the module's server."""
    hold = Hold(server, "long")
    server.signal(signal.SIGINT)
    time.sleep(0.3)
    assert server.proc.poll() is None  # draining: the running batch would be let finish
    server.signal(signal.SIGINT)
    assert server.wait(20) == 130
    assert "stopped at once (second Ctrl-C)" in server.stderr()
    hold.release()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes (as much as the server takes) and return its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the body was all sent
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
