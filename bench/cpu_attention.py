#!/usr/bin/env python
"""CPU attention at SD3-medium's 1024x1024 shape (1 x 24 heads x 4250 tokens x 64), the part of the bf16
forward that stays far from the matmul floor (bench/RESULTS.md): SDPA in bf16 and float32, compiled
flex_attention, and attention as plain matmuls over query chunks, each with its error against float64.

    python bench/cpu_attention.py          # about 1 min on 2 idle cores
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

S, H, D = 4250, 24, 64  # 4096 image tokens + 154 text tokens, 24 heads of 64
FLOPS = 4 * S * S * D * H  # QK^T and PV


def best_ms(fn, runs: int = 3) -> tuple[float, torch.Tensor]:
    out = fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3, out


def chunked(q, k, v, chunk: int, score_dtype: torch.dtype) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head and per `chunk` queries; scores from a `score_dtype` matmul, the
    softmax in float32, PV in the inputs' dtype."""
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        kt = (k[0, h].to(score_dtype) * D**-0.5).T.contiguous()
        for i in range(0, S, chunk):
            s = torch.mm(q[0, h, i:i + chunk].to(score_dtype), kt).float()
            s.sub_(s.amax(-1, keepdim=True)).exp_()
            den = s.sum(-1, keepdim=True)
            out[0, h, i:i + chunk] = (torch.mm(s.to(v.dtype), v[0, h]).float() / den).to(out.dtype)
    return out


def main() -> None:
    torch.set_num_threads(os.cpu_count())
    g = torch.Generator().manual_seed(0)
    q64, k64, v64 = (torch.randn(1, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q64, k64, v64)
    print(f"shape (1, {H}, {S}, {D}); load {os.getloadavg()[0]:.1f}")

    def report(name, fn):
        ms, out = best_ms(fn)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(f"  {name:44s} {ms:7.0f} ms {FLOPS / ms / 1e6:5.0f} GFLOP/s  rel. err vs float64 {err:.1e}", flush=True)

    for dt in (torch.bfloat16, torch.float32):
        qkv = tuple(t.to(dt) for t in (q64, k64, v64))
        report(f"SDPA {str(dt)[6:]}", lambda a=qkv: F.scaled_dot_product_attention(*a))
    q, k, v = (t.bfloat16() for t in (q64, k64, v64))
    for chunk, sd in ((256, torch.float32), (1024, torch.float32), (256, torch.bfloat16)):
        report(f"chunks of {chunk} queries, {str(sd)[6:]} scores", lambda c=chunk, s=sd: chunked(q, k, v, c, s))
    from torch.nn.attention.flex_attention import flex_attention

    t = time.perf_counter()
    flex = torch.compile(flex_attention, dynamic=False)
    flex(q, k, v)
    print(f"  flex_attention compile: {time.perf_counter() - t:.1f} s")
    report("flex_attention compiled, bf16", lambda: flex(q, k, v))
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
