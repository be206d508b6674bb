#!/usr/bin/env python
"""flashsd3-serve's throughput with and without batching: images/minute and p50/p95 request latency.

    python bench/bench_serve.py                                    # demo model on CPU, --max-batch 1 vs 4
    python bench/bench_serve.py --shapes sd3 --device cuda --dtype bf16 --size 1024 --batches 1,2,4 \\
        --clients 8 --requests 64                                  # SD3-medium shapes on a GPU (random weights)

One process: the pipeline is built once; for each --max-batch a real server (the app of flashsd3-serve under
uvicorn, on a free loopback port) serves `--requests` txt2img requests (A1111 route, one image each, distinct
seeds, the Flash recipe) from `--clients` concurrent clients, each sending its next request when the last is
answered. `--shapes sd3` builds SD3-medium's transformer and VAE with random weights (timing does not depend on
values; the toy text encoders of the demo stand in for CLIP, a small share of the time). Prints one JSON line
per --max-batch (median images/minute of --repeat interleaved runs, latency percentiles over all their requests),
then a markdown table with the throughput ratio to the first --max-batch.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as flashsd3-serve, before torch is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
import torch
import uvicorn

from flashsd3.serve.app import Server, create_app
from flashsd3.serve.engine import Engine
from flashsd3.serve.limits import Limits
from flashsd3.serve.worker import Worker

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_engine(shapes: str, device: str, dtype: str, size: int) -> Engine:
    from flashsd3.config import SD3_MEDIUM, SD3_VAE
    from flashsd3.demo import demo_text_encoders
    from flashsd3.mmdit import MMDiT
    from flashsd3.pipeline import FlashSD3Pipeline
    from flashsd3.vae import VAE

    torch_dtype = DTYPES[dtype]
    if shapes == "demo":
        pipe = FlashSD3Pipeline.demo(seed=0, dtype=torch_dtype, device=device)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            transformer = MMDiT(SD3_MEDIUM).to(torch_dtype).eval()
            transformer.init_weights()  # DiT init: finite activations in half precision
            vae = VAE(SD3_VAE).to(torch_dtype).eval()
        pipe = FlashSD3Pipeline(transformer, vae, demo_text_encoders(SD3_MEDIUM).to(device, torch_dtype))
    args = SimpleNamespace(demo=shapes == "demo", model=f"random weights, {shapes} shapes", t5=False)
    return Engine(pipe, args, dtype, size, [])


def serve(engine: Engine, limits: Limits):
    worker = Worker(engine, limits)
    worker.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    server = uvicorn.Server(uvicorn.Config(create_app(Server(engine, worker, limits, None)), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, worker, sock.getsockname()[1]


def one(port: int, body: dict) -> float:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", "/sdapi/v1/txt2img", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - t0


def run(engine: Engine, max_batch: int, a) -> dict:
    limits = Limits(max_batch=max_batch, max_queue=max(a.clients, 16), max_pixels=a.size * a.size,
                    max_images=1, timeout=3600.0)
    server, thread, worker, port = serve(engine, limits)
    body = {"prompt": "a raccoon reading a book", "width": a.size, "height": a.size, "recipe": "flash-sd3"}
    for s in range(2):  # warm-up (allocator, kernels)
        one(port, {**body, "seed": s})
    latencies, lock, counter = [], threading.Lock(), iter(range(a.requests))

    def client():
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            seconds = one(port, {**body, "seed": 100 + k})
            with lock:
                latencies.append(seconds)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    batches = worker.metrics.batches
    server.should_exit = True
    thread.join(30)
    worker.shutdown()
    return {"max_batch": max_batch, "images_per_minute": 60 * a.requests / wall, "latencies": latencies,
            "wall_s": wall, "mean_batch": (a.requests + 2) / batches}


def summary(runs: list[dict], a) -> dict:
    """Median throughput over the repeats; latency percentiles over every request of them."""
    latencies = sorted(t for r in runs for t in r["latencies"])
    per_minute = statistics.median(r["images_per_minute"] for r in runs)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    return {"max_batch": runs[0]["max_batch"], "clients": a.clients, "requests": a.requests, "size": a.size,
            "repeats": len(runs), "images_per_minute": round(per_minute, 1),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(p95, 3),
            "mean_batch": round(statistics.mean(r["mean_batch"] for r in runs), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", choices=("demo", "sd3"), default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", default="1,4", help="--max-batch values, comma-separated (first: the baseline)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=96, help="per run")
    p.add_argument("--repeat", type=int, default=3, help="runs of each --max-batch, interleaved")
    a = p.parse_args()
    t0 = time.perf_counter()
    engine = build_engine(a.shapes, a.device, a.dtype, a.size)
    batches = [int(b) for b in a.batches.split(",")]
    runs: dict[int, list[dict]] = {b: [] for b in batches}
    for rep in range(a.repeat):  # interleaved, so that a change of machine load hits every setting alike
        for b in batches if rep % 2 == 0 else batches[::-1]:
            runs[b].append(run(engine, b, a))
    rows = [summary(runs[b], a) for b in batches]
    for r in rows:
        print(json.dumps(r), flush=True)
    machine = torch.cuda.get_device_name() if a.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"\n{a.shapes} shapes, {a.dtype} on {a.device} ({machine}), {a.size}x{a.size}, flash-sd3 (4 steps), "
          f"torch {torch.__version__}; total wall {time.perf_counter() - t0:.0f} s\n")
    print("| --max-batch | clients | requests | images/min | p50 latency (s) | p95 latency (s) | mean batch | "
          "throughput vs 1 |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['max_batch']} | {r['clients']} | {r['requests']} | {r['images_per_minute']} | {r['p50_s']} | "
              f"{r['p95_s']} | {r['mean_batch']} | {r['images_per_minute'] / rows[0]['images_per_minute']:.2f}x |")


if __name__ == "__main__":
    main()
