"""Test helpers for flashsd3-serve: the real command in a subprocess on a free loopback port (--port 0; the
URL is read from its first line), plain HTTP with the standard library (a connection can be left open and
then dropped, as a client that goes away), flashsd3-sample runs for reference bytes, PNG text metadata.

Both the server and flashsd3-sample run with OMP_NUM_THREADS=1: the same thread count on both sides, and
frugal on a shared machine."""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "FLASHSD3_API_KEY")}
    e.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")])))
    e.update(extra)
    return e


class ServerProcess:
    """`python -m flashsd3.serve.cli --demo --dtype fp32 --port 0 FLAGS`; .url once it serves."""

    def __init__(self, *flags, key: str | None = None):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="flashsd3-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "flashsd3.serve.cli", "--demo", "--dtype", "fp32", "--port", "0", *map(str, flags)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.key, self.url, self.port = key, None, None

    def wait_ready(self) -> ServerProcess:
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.url, self.port = found.group(0), int(found.group(1))
                return self
        self.stop()
        raise RuntimeError(f"flashsd3-serve did not start: {line!r}; log: {self.stderr()[-2000:]}")

    def stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        os.unlink(self.log.name)
        return self.proc.returncode

    # HTTP -------------------------------------------------------------------------------------------

    def headers(self, extra: dict | None = None) -> dict:
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return {**h, **(extra or {})}

    def request(self, method: str, path: str, body=None, *, headers: dict | None = None, raw: bytes | None = None,
                timeout: float = 120):
        """(status, headers, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=self.headers(headers))
            response = conn.getresponse()
            text = response.read().decode()
            kind = response.getheader("Content-Type", "")
            return response.status, dict(response.getheaders()), json.loads(text) if "json" in kind else text
        finally:
            conn.close()

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def open_request(self, path: str, body: dict, headers: dict | None = None) -> http.client.HTTPConnection:
        """Send a request and leave the answer unread: .close() it to act as a client that went away."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", path, body=json.dumps(body).encode(), headers=self.headers(headers))
        return conn

    def progress(self, task_id: str) -> dict | None:
        status, _, body = self.get(f"/api/progress/{task_id}")
        return body if status == 200 else None

    def wait_state(self, task_id: str, states, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.progress(task_id)
            if p is not None and p["state"] in states:
                return p
            time.sleep(0.05)
        raise AssertionError(f"task {task_id} never reached {states}: {self.progress(task_id)}")

    def metrics(self) -> dict[str, float]:
        _, _, text = self.get("/metrics")
        return {line.split()[0].removeprefix("flashsd3_"): float(line.split()[1])
                for line in text.splitlines() if line and not line.startswith("#")}


class Hold:
    """A long request that occupies the worker until released (its client then goes away and the server
    stops the batch at its next step). Euler: a stochastic sampler would draw noise for every step up front."""

    def __init__(self, server: ServerProcess, task_id: str = "hold", steps: int = 4000, size: int = 256):
        self.conn = server.open_request("/sdapi/v1/txt2img", {"prompt": "hold", "steps": steps, "width": size,
                                                               "height": size, "sampler_name": "Euler",
                                                               "force_task_id": task_id})
        server.wait_state(task_id, ("running",))

    def release(self) -> None:
        self.conn.close()


def in_threads(fn, args: list) -> list:
    """fn(arg) for every arg at once, one thread each; the results in order."""
    results = [None] * len(args)

    def run(i):
        results[i] = fn(args[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def sample_runs(runs: list[list], cwd: Path) -> subprocess.Popen:
    """flashsd3-sample's main() for each argument list, in one fresh process (one interpreter start)."""
    code = "import sys\nfrom flashsd3.cli import main\nsys.exit(max(main(a) for a in %r))" % [list(map(str, r))
                                                                                            for r in runs]
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


def png_text(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as im:
        return dict(im.text)


def pixels(data: bytes):
    import numpy as np

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)
