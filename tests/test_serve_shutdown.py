"""flashsd3-serve's API key, time cap and SIGTERM on one server: a request over --timeout is answered 408
and its batch stopped; SIGTERM (last: it stops the server) answers queued requests 503, lets the running
one finish and exits 0. The second Ctrl-C (exit 130) is the last test of test_serve_api.py."""
from __future__ import annotations

import base64
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="flashsd3-serve's extra is not installed: pip install -e '.[test]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install -e '.[test]'")

from helpers_serve import ServerProcess  # noqa: E402

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--api-key", KEY, "--timeout", 2, "--max-steps", 100000, key=KEY).wait_ready()
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


def test_a_request_over_the_time_cap_is_408_and_its_batch_stops(server):
    before = server.metrics()
    t0 = time.monotonic()
    status, _, r = server.post("/v1/images/generations", {"prompt": "slow", "size": "256x256", "steps": 100000,
                                                                "sampler": "euler"})
    assert status == 408 and r["error"]["code"] == "timeout" and "(--timeout)" in r["error"]["message"]
    assert 2 <= time.monotonic() - t0 < 30
    deadline = time.monotonic() + 30
    while server.metrics()["running_requests"]:  # the batch stops at its next step: no one waits for it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.metrics()["requests_cancelled_total"] == before["requests_cancelled_total"] + 1


def test_sigterm_answers_queued_503_finishes_the_running_one_and_exits_0(server):
    answers = {}

    def ask(name, body):
        answers[name] = server.post("/sdapi/v1/txt2img", {**body, "force_task_id": name})

    running = threading.Thread(target=ask, args=("running", {"prompt": "r", "steps": 150, "width": 256,
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
