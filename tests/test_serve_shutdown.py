"""flashsd3-serve's API key, LoRAs chosen by name, time cap and SIGTERM on one server (a random LoRA on the
demo model): any set of the loaded adapters gives flashsd3-sample's bytes with those --lora flags, however
often the server switched; a request over --timeout is answered 408 and its batch stopped; SIGTERM (last: it
stops the server) answers queued requests 503, lets the running one finish and exits 0. The second Ctrl-C
(exit 130) is the last test of test_serve_api.py."""
from __future__ import annotations

import base64
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install -e '.[test]'")

from helpers_serve import ServerProcess, finish, png_text, sample_runs  # noqa: E402

KEY = "test-key-0123456789"
TIMEOUT = 3  # seconds (--timeout): the SIGTERM test's running request is sized to take about a third of it


def random_lora(path) -> str:
    """A rank-4 adapter on the demo MMDiT with random A and B, saved in the PEFT layout (a folder)."""
    import torch

    from flashsd3.config import DEMO
    from flashsd3.lora import add_lora, lora_parameters, save_lora
    from flashsd3.mmdit import MMDiT

    torch.manual_seed(0)
    model = MMDiT(DEMO)
    add_lora(model, rank=4, alpha=4, targets="all-linear")
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.3)
    save_lora(model, path)
    return str(path)


@pytest.fixture(scope="module")
def lora_refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_lora")
    lora = random_lora(root / "style")
    common = ["--prompt", "a cat", "--seed", 3, "--width", 64, "--height", 64, "--dtype", "fp32", "--demo"]
    proc = sample_runs([[*common, "--lora", f"{lora}:0.5", "--out", "half"],
                        [*common, "--lora", f"{lora}:1.5", "--out", "more"], [*common, "--out", "none"]], root)
    yield root, lora, proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def server(lora_refs):
    lora = lora_refs[1]
    server = ServerProcess("--api-key", KEY, "--timeout", TIMEOUT, "--max-steps", 10000, "--lora", f"{lora}:0.5",
                           key=KEY).wait_ready()
    yield server
    server.stop()


def test_the_api_key_is_required_except_on_the_page_and_health(server):
    body = {"prompt": "x", "size": "64x64"}
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-key-0123456789"},
                    {"Authorization": f"Basic {base64.b64encode(KEY.encode()).decode()}"}):
        status, got, r = server.post("/v1/images/generations", body, headers=headers)
        assert status == 401 and got["www-authenticate"] == "Bearer"
        assert r["error"]["code"] == "invalid_api_key" and "Authorization: Bearer" in r["error"]["message"]
        status, _, r = server.post("/sdapi/v1/txt2img", body, headers=headers)
        assert status == 401 and r["error"] == "invalid_api_key"
    assert server.get("/health", headers={"Authorization": ""})[0] == 200
    assert server.get("/", headers={"Authorization": ""})[0] == 200
    assert server.get("/metrics", headers={"Authorization": ""})[0] == 401
    client = openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0)
    assert len(client.images.generate(prompt="x", size="64x64").data) == 1


def test_loras_are_chosen_by_name_and_give_flashsd3_sample_bytes(server, lora_refs):
    root, lora, proc = lora_refs
    body = {"prompt": "a cat", "seed": 3, "size": "64x64"}

    def image(**extra):
        status, _, r = server.post("/v1/images/generations", {**body, **extra})
        assert status == 200, r
        return base64.b64decode(r["data"][0]["b64_json"])
    default, none, more, default_again = image(), image(loras={}), image(loras={"style": 1.5}), image()
    finish(proc)
    assert default == (root / "half" / "00000-3-a-cat.png").read_bytes()  # --lora style:0.5, as started
    assert none == (root / "none" / "00000-3-a-cat.png").read_bytes()
    assert more == (root / "more" / "00000-3-a-cat.png").read_bytes()
    assert default_again == default  # switching back restores the merged weights exactly
    assert png_text(more)["lora"] == f'[{{"source": "{lora}", "scale": 1.5}}]'
    status, _, r = server.post("/v1/images/generations", {**body, "loras": ["flash"]})
    assert status == 400 and r["error"]["message"] == (
        "no LoRA named 'flash': LoRAs are chosen among those loaded at start: style")
    assert server.get("/sdapi/v1/loras")[2] == [{"name": "style", "alias": "style", "metadata": {"scale": 0.5}}]


def test_a_request_over_the_time_cap_is_408_and_its_batch_stops(server):
    before = server.metrics()
    t0 = time.monotonic()
    status, _, r = server.post("/v1/images/generations", {"prompt": "slow", "size": "256x256", "steps": 10000,
                                                                "sampler": "euler"})
    assert status == 408 and r["error"]["code"] == "timeout" and "(--timeout)" in r["error"]["message"]
    assert TIMEOUT <= time.monotonic() - t0 < 30
    deadline = time.monotonic() + 30
    while server.metrics()["running_requests"]:  # the batch stops at its next step: no one waits for it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.metrics()["requests_cancelled_total"] == before["requests_cancelled_total"] + 1


def test_sigterm_answers_queued_503_finishes_the_running_one_and_exits_0(server):
    answers = {}

    def ask(name, body):
        answers[name] = server.post("/sdapi/v1/txt2img", {**body, "force_task_id": name})

    t0 = time.monotonic()  # the step time now (the machine's load) sizes the running request: ~1 s
    assert server.post("/sdapi/v1/txt2img", {"prompt": "r", "steps": 50, "sampler_name": "Euler"})[0] == 200
    steps = max(50, int(50 * TIMEOUT / 3 / (time.monotonic() - t0)))
    running = threading.Thread(target=ask, args=("running", {"prompt": "r", "steps": steps, "width": 256,
                                                               "height": 256, "sampler_name": "Euler"}))
    running.start()
    server.wait_state("running", ("running",))
    queued = [threading.Thread(target=ask, args=(f"queued{i}", {"prompt": "q", "width": 64, "height": 64}))
              for i in range(2)]
    for t in queued:
        t.start()
    for i in range(2):
        server.wait_state(f"queued{i}", ("queued",))
    assert server.progress("running")["state"] == "running"  # still running when the signal comes
    server.signal(signal.SIGTERM)
    for t in [*queued, running]:
        t.join(120)
    for i in range(2):
        status, _, r = answers[f"queued{i}"]
        assert status == 503 and r["detail"] == "the server is shutting down; this request was not started"
    status, _, r = answers["running"]
    assert status == 200 and len(r["images"]) == 1
    assert server.wait(60) == 0
    assert "stopping: no new requests" in server.stderr() and "stopped" in server.stderr()
