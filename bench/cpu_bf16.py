#!/usr/bin/env python
"""flashsd3 on a CPU in bf16 (`--dtype auto` on AMX-BF16 / AVX512-BF16) vs diffusers bf16, vs the bf16 matmul
floor, and vs the Flash SD3 model card's recipe as a CPU user runs it today (diffusers + peft, float32).

    python bench/cpu_bf16.py --out bench/cpu_bf16.md                  # every part (about 22 min on 2 idle cores)
    python bench/cpu_bf16.py --parts transformer,vae --depth 1 --size 512 --vae-size 256 --runs 2   # a quick look

Parts, run in this order whatever `--parts` lists (e2e first: its processes need the memory):
  transformer  one forward at SD3-medium width, `--depth` blocks, `--size` px: ours bf16 and diffusers bf16 (the
               Flash LoRA merged in both, same weights), the card (diffusers + peft unmerged, float32), and SDPA
               alone at the forward's shape x depth; interleaved run by run. Floor = FLOPs / best bf16 2048^3
               matmul rate of this run.
  full         the same at depth 24 and 1024 px: the card alone first, once (8.7 GB), then its weights are cast
               to bf16 in place and ours converted from them; ours, diffusers and SDPA interleaved, two runs each.
  vae          decode at `--vae-size`: ours bf16 vs diffusers bf16 vs the conv floor (FLOPs / best bf16 3x3 conv
               rate); then bf16 vs float32 decode of the same latents, in image terms (the dtype decision).
  compile      ours bf16 under torch.compile at `--depth`, `--size`: compile time, steady-state gain, break-even.
  e2e          1024 px, 4 Flash steps, CLIP-L/G + transformer + VAE loaded from a random-weights SD3-medium folder
               (bench/cpu_runs.py make, fp16 as published, kept in `--cache`): `flashsd3-sample` (dtype auto), the
               same with `--dtype fp32`, and the card's code in float32, one process each (wall time, peak RSS of
               the process itself, VmHWM); then `load_transformer` alone in bf16 and float32 (peak RSS of loading).
               A run is skipped (and says so) when the machine has less memory available than it needs.
Every timed run records the 1-minute load average before and after it; the report prints each variant's range.
The targets checked at the end say PASS, or MISS and by how much.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import benchmark as B  # noqa: E402  (random weights, the Flash-shaped adapter, diffusers calls)
import flops as F  # noqa: E402

from flashsd3 import MMDiT, load_lora, merge_lora  # noqa: E402
from flashsd3.config import FLASH_SD3_ADAPTER, SD3_MEDIUM, SD3_VAE  # noqa: E402
from flashsd3.cpu_memory import keep_freed_memory, release_freed_memory  # noqa: E402
from flashsd3.precision import cpu_bf16_units  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32
# e2e first: its child processes need ~17.5 GiB, which this process's heap, grown by the in-process parts and
# kept for reuse (keep_freed_memory), does not all give back (a run with e2e last found 11.9 GiB available)
PARTS = ("e2e", "transformer", "full", "vae", "compile")
# the targets on this machine, as "measured / baseline <= limit"
TARGETS = {"floor": 1.2, "diffusers": 0.95, "e2e": 1 / 3, "rss": 0.6}


# Timing with the machine's load ------------------------------------------------------------------

def load1() -> float:
    return os.getloadavg()[0]


@dataclass
class Timed:
    name: str
    fn: object
    ms: list = field(default_factory=list)
    loads: list = field(default_factory=list)  # 1-min load average before and after each run
    out: object = None  # the last run's result

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    def load_range(self) -> str:
        return f"{min(self.loads):.1f}-{max(self.loads):.1f}"

    def run(self) -> None:
        before, t0 = load1(), time.perf_counter()
        self.out = self.fn()
        self.ms.append((time.perf_counter() - t0) * 1e3)
        self.loads += [before, load1()]


def interleave(variants: list[Timed], runs: int, warmup: int) -> None:
    """Warm each, then `runs` rounds of every variant once, each round starting one variant later."""
    for v in variants:
        for _ in range(warmup):
            v.fn()
    for r in range(runs):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            v.run()
    for v in variants:
        print(f"  {v.name:44s} median {v.median:10.1f} ms (min {min(v.ms):.1f}, max {max(v.ms):.1f}; "
              f"load {v.load_range()})", flush=True)


def best_rate(fn, flop: int, tries: int) -> float:
    fn()
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flop / best


def matmul_rate(dtype) -> float:
    """Best FLOP/s of a 2048^3 matmul (5 tries): the floor's rate."""
    a, b = (torch.randn(2048, 2048, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(2))
    return best_rate(lambda: a @ b, 2 * 2048**3, 5)


def conv_rate(dtype) -> float:
    """Best FLOP/s of a 3x3 conv at the decoder's 512^2 level (256 channels), channels-last (3 tries)."""
    x = torch.randn(1, 256, 512, 512).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(dtype)
    return best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), F.conv(512, 512, 256, 256, 3), 3)


def measure_rates(args) -> None:
    """The rates again (before each part and at the end); the floors use the best of the run."""
    now = (matmul_rate(BF16), matmul_rate(FP32), conv_rate(BF16), load1())
    args.rates = getattr(args, "rates", []) + [now]
    args.rate, args.rate32, args.conv_rate = (max(getattr(args, k), v) for k, v in
                                              zip(("rate", "rate32", "conv_rate"), now[:3], strict=True))


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# Report ------------------------------------------------------------------------------------------

class Report:
    def __init__(self):
        self.lines, self.targets, self.rows = [], [], []

    def add(self, *lines: str) -> None:
        self.lines += lines
        print("\n".join(lines), flush=True)

    def table(self, head: tuple[str, ...], rows: list[tuple]) -> None:
        self.add("| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows))

    def timed_table(self, variants: list[Timed], extra: dict[str, dict[str, str]]) -> None:
        head = ("variant", "median ms", "min", "max", "load (1 min)", *next(iter(extra.values())))
        self.table(head, [(v.name, f"{v.median:.0f}", f"{min(v.ms):.0f}", f"{max(v.ms):.0f}", v.load_range(),
                           *extra[v.name].values()) for v in variants])
        self.rows += [dict(variant=v.name, ms=[round(m, 1) for m in v.ms], load=v.loads) for v in variants]

    def later(self, render) -> None:
        """A section rendered by `finish`, once every rate of the run is known."""
        self.lines.append(render)

    def finish(self) -> None:
        lines, self.lines = self.lines, []
        for item in lines:
            if callable(item):
                item(self)
            else:
                self.lines.append(item)

    def target(self, label: str, value: float, limit: float) -> None:
        verdict = "PASS" if value <= limit else f"MISS by {value / limit:.2f}x"
        self.targets.append(f"- {verdict}: {label} = {value:.3f} (target <= {limit:.3f})")


# Transformer -------------------------------------------------------------------------------------

def card_model(depth: int, folder: str):
    """(config, the card's model: a random SD3-width diffusers transformer in float32 with a random Flash-shaped
    adapter loaded by PeftModel.from_pretrained, unmerged and float32, as the card runs it)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = replace(SD3_MEDIUM, depth=depth)
    flash = FLASH_SD3_ADAPTER
    lora_cfg = LoraConfig(r=flash.rank, lora_alpha=flash.alpha, target_modules=list(flash.target_modules),
                          lora_dropout=0.0)
    trained = get_peft_model(B.diffusers_transformer(cfg, torch.device("cpu"), seed=0), lora_cfg)
    B.flash_adapter(trained, seed=1, folder=folder)
    return cfg, PeftModel.from_pretrained(trained.unload(), folder).eval()


def bf16_models(card, cfg, folder: str):
    """(diffusers bf16, ours bf16), both with the adapter merged, from the card's base weights (consumed: they are
    cast to bf16 in place, so the float32 model and two bf16 copies are never alive together)."""
    from peft import PeftModel

    from flashsd3.mmdit import from_diffusers_state_dict

    base = card.unload().to(BF16)
    ours = from_diffusers_state_dict(base.state_dict(), cfg, dtype=BF16).eval()
    load_lora(ours, folder, name="flash")
    merge_lora(ours, discard=True)  # as flashsd3-sample
    return PeftModel.from_pretrained(base, folder).merge_and_unload().eval(), ours


def transformer_inputs(cfg, size: int, dtype):
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, cfg.in_channels, size // 8, size // 8, generator=g)
    ctx = torch.randn(1, B.CTX_TOKENS, cfg.context_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_dim, generator=g)
    t = torch.full((1,), B.TIMESTEP)
    return tuple(x.to(dtype) for x in (lat, ctx, pooled)), t


def call_ours(model, inp):
    (lat, ctx, pooled), t = inp
    return model(lat, t, ctx, pooled)


def call_diffusers(model, inp):
    (lat, ctx, pooled), t = inp
    return B.call_diffusers(model, (lat, t, ctx, pooled))


def sdpa_alone(cfg, size: int, depth: int):
    """The forward's attention alone: SDPA on (1, heads, tokens, 64) bf16, `depth` times."""
    g = torch.Generator().manual_seed(2)
    s = (size // 16) ** 2 + B.CTX_TOKENS
    q, k, v = (torch.randn(1, cfg.num_heads, s, cfg.head_dim, generator=g).to(BF16) for _ in range(3))
    return lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, v) for _ in range(depth)]


def part_transformer(args, rep: Report, full: bool) -> None:
    depth, size = (24, 1024) if full else (args.depth, args.size)
    runs, warmup = (2, 0) if full else (args.runs, args.warmup)
    label = f"depth {depth}, {size}x{size}"
    rep.add("", f"## Transformer forward at SD3-medium width, {label}", "")
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        cfg, card = card_model(depth, folder)
        inp32, inp16 = transformer_inputs(cfg, size, FP32), transformer_inputs(cfg, size, BF16)
        card_v = Timed("card: diffusers + peft unmerged, float32", lambda: call_diffusers(card, inp32))
        if full:  # alone, once, then its memory becomes the bf16 models
            print(f"  built; {available_gib():.1f} GiB available", flush=True)
            interleave([card_v], 1, 0)
            ref = card_v.out
        else:
            ref = call_diffusers(card, inp32)
        diffusers16, ours = bf16_models(card if full else copy.deepcopy(card), cfg, folder)
        ours_v = Timed("ours bf16", lambda: call_ours(ours, inp16))
        diff_v = Timed("diffusers bf16", lambda: call_diffusers(diffusers16, inp16))
        sdpa_v = Timed(f"SDPA alone (bf16) x {depth}", sdpa_alone(cfg, size, depth))
        interleave([ours_v, diff_v, sdpa_v] + ([] if full else [card_v]), runs, warmup)
        errs = [B.rel_err(v.out, ref) for v in (ours_v, diff_v)]
    def render(rep: Report) -> None:  # after the last part: the floors use the run's best rates
        flop = F.mmdit_flops(B.mmdit_shape(cfg), 1, size // 8, size // 8, B.CTX_TOKENS)
        attn = depth * F.attention(1, (size // 16) ** 2 + B.CTX_TOKENS, cfg.hidden_size)
        floor = flop / args.rate * 1e3

        def extra(v: Timed, f: int) -> dict[str, str]:
            return {"/ ours bf16": f"{v.median / ours_v.median:.2f}", "floor ms": f"{f / args.rate * 1e3:.0f}",
                    "/ floor": f"{v.median / (f / args.rate * 1e3):.2f}", "GFLOP/s": f"{f / v.median / 1e6:.0f}"}

        variants = [ours_v, diff_v, card_v, sdpa_v]
        rep.timed_table(variants, {v.name: extra(v, attn if v is sdpa_v else flop) for v in variants})
        rest = ours_v.median - sdpa_v.median
        rep.add("", f"{flop / 1e9:.0f} GFLOP per forward, attention's QK^T and PV {attn / 1e9:.0f} of them "
                    f"({100 * attn / flop:.0f}%); bf16 matmul rate {args.rate / 1e12:.3f} TFLOP/s, so the floor is "
                    f"{floor:.0f} ms. Ours = SDPA {sdpa_v.median:.0f} ms "
                    f"({100 * sdpa_v.median / ours_v.median:.0f}%, at "
                    f"{attn / sdpa_v.median / 1e6:.0f} GFLOP/s) + everything else {rest:.0f} ms (the other FLOPs at "
                    f"{(flop - attn) / rest / 1e6:.0f} GFLOP/s, {100 * (flop - attn) / rest / args.rate * 1e3:.0f}% "
                    "of the matmul rate).",
                f"Card float32 / ours bf16: {card_v.median / ours_v.median:.2f}x. Agreement with the card's float32 "
                f"output (relative L2): ours bf16 {errs[0]:.2e}, diffusers bf16 {errs[1]:.2e}.")
        rep.target(f"transformer {label}: ours bf16 / bf16 matmul floor", ours_v.median / floor, TARGETS["floor"])
        rep.target(f"transformer {label}: ours bf16 / diffusers bf16", ours_v.median / diff_v.median,
                   TARGETS["diffusers"])

    rep.later(render)


# VAE ---------------------------------------------------------------------------------------------

def image_levels(a: torch.Tensor, ref: torch.Tensor) -> str:
    """bf16 vs float32 decode in uint8 image terms (the pipeline's [0, 1] clamp and rounding)."""
    pix = [((x.float() / 2 + 0.5).clamp(0, 1) * 255).round() for x in (a, ref)]
    d = (pix[0] - pix[1]).abs()
    psnr = 10 * torch.log10(255**2 / ((pix[0] - pix[1]) ** 2).mean())
    return (f"relative L2 {B.rel_err(a, ref):.2e}; uint8 levels: mean {d.mean():.2f}, max {d.max():.0f}, "
            f"{100 * (d > 2).float().mean():.2f}% of values off by more than 2; PSNR {psnr:.1f} dB")


def part_vae(args, rep: Report) -> None:
    h, w = args.vae_size, args.vae_size
    rep.add("", f"## VAE decode, {h}x{w}", "")
    with torch.no_grad():
        ref_vae, ours = B.vae_pair(torch.device("cpu"), FP32, seed=2)
        g = torch.Generator().manual_seed(3)
        z = ours.latents_to_vae(torch.randn(1, 16, h // 8, w // 8, generator=g))  # model latents ~ N(0, 1)
        fp32_v = Timed("ours float32 (once, the reference)", lambda: ours.decode(z))
        fp32_v.run()
        ref_vae, ours = ref_vae.to(BF16), ours.to(BF16)
        z16 = z.to(BF16)
        ours_v = Timed("ours bf16", lambda: ours.decode(z16))
        diff_v = Timed("diffusers bf16", lambda: ref_vae.decode(z16).sample)
        interleave([ours_v, diff_v], args.runs, args.warmup)
    def render(rep: Report) -> None:  # after the last part: the floors use the run's best rates
        flop = F.vae_decode_flops(SD3_VAE.block_out_channels, SD3_VAE.layers_per_block, SD3_VAE.latent_channels,
                                  SD3_VAE.out_channels, 1, h // 8, w // 8)
        floor = flop / args.conv_rate * 1e3

        def extra(v: Timed) -> dict[str, str]:
            return {"/ ours bf16": f"{v.median / ours_v.median:.2f}", "/ conv floor": f"{v.median / floor:.2f}",
                    "GFLOP/s": f"{flop / v.median / 1e6:.0f}"}

        variants = [ours_v, diff_v, fp32_v]
        rep.timed_table(variants, {v.name: extra(v) for v in variants})
        rep.add("", f"{flop / 1e9:.0f} GFLOP per decode; best bf16 3x3 conv rate {args.conv_rate / 1e12:.3f} TFLOP/s "
                    f"(256 channels at 512^2, channels-last) -> conv floor {floor:.0f} ms.",
                f"bf16 vs float32 decode of the same latents (ours): {image_levels(ours_v.out, fp32_v.out)}.",
                f"diffusers bf16 vs ours float32: {image_levels(diff_v.out, fp32_v.out)}.")

    rep.later(render)


# Compile -----------------------------------------------------------------------------------------

def part_compile(args, rep: Report) -> None:
    cfg = replace(SD3_MEDIUM, depth=args.depth)
    rep.add("", f"## torch.compile of ours bf16, depth {cfg.depth}, {args.size}x{args.size}", "")
    with torch.no_grad():
        torch.manual_seed(0)
        eager = MMDiT(cfg).to(BF16).eval()
        compiled = copy.deepcopy(eager)
        inp = transformer_inputs(cfg, args.size, BF16)
        with tempfile.TemporaryDirectory() as cache:  # a cold compile: no kernels cached by an earlier run
            os.environ["TORCHINDUCTOR_CACHE_DIR"], saved = cache, os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            torch._dynamo.reset()
            start, before = time.perf_counter(), load1()
            compiled.compile()  # as `flashsd3-sample --compile`
            first = call_ours(compiled, inp)
            compile_s = time.perf_counter() - start
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR") if saved is None else os.environ.update(
                TORCHINDUCTOR_CACHE_DIR=saved)
        eager_v = Timed("ours bf16 eager", lambda: call_ours(eager, inp))
        comp_v = Timed("ours bf16 compiled", lambda: call_ours(compiled, inp))
        interleave([eager_v, comp_v], args.runs, args.warmup)
        err = B.rel_err(first, call_ours(eager, inp))
    gain = (eager_v.median - comp_v.median) / 1e3  # seconds per forward
    per_image = 4 * gain * 24 / cfg.depth  # 4 Flash steps at full depth, gain taken as proportional to depth
    rep.timed_table([eager_v, comp_v], {v.name: {"/ eager": f"{v.median / eager_v.median:.3f}"}
                                        for v in (eager_v, comp_v)})
    pays = f"pays for itself after {compile_s * 24 / cfg.depth / per_image:.1f} images" if per_image > 0 else \
        "never pays (no steady-state gain)"
    rep.add("", f"Compile (first call, load {before:.1f}-{load1():.1f}): {compile_s:.1f} s at depth {cfg.depth}; "
                f"compiled vs eager output, relative L2 {err:.1e}. Scaled to depth 24 (compile time and gain both "
                f"taken as proportional to the depth): {compile_s * 24 / cfg.depth:.0f} s to compile, "
                f"{per_image:.1f} s saved per 4-step image, so it {pays}.")


# End to end (one process each) -------------------------------------------------------------------

def child(cmd: list[str], need_gib: float, cwd: Path) -> dict:
    """Run `cmd` (a bench/cpu_runs.py command, which prints its own peak RSS); wall time, load before / after,
    and its last JSON line. Refused below `need_gib` available, this process's freed memory given back first."""
    release_freed_memory()
    free = available_gib()
    if free < need_gib:
        return {"skipped": f"{free:.1f} GiB available, {need_gib} needed"}
    before, t0 = load1(), time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return {"wall_s": time.perf_counter() - t0, "load": (before, load1()), "free_gib_before": free,
            "output": proc.stdout, **json.loads(lines[-1])}


def cli_times(output: str) -> dict:
    """`flashsd3-sample`'s summary line -> generate_s, load_s."""
    m = re.search(r"in ([\d.]+) s \(.*model load ([\d.]+) s\)", output)
    return {"generate_s": float(m.group(1)), "load_s": float(m.group(2))}


def part_e2e(args, rep: Report) -> None:
    size = args.e2e_size
    rep.add("", f"## End to end: {size}x{size}, 4 Flash steps, CLIP-L/G + transformer + VAE (one process each)", "")
    cache = Path(args.cache).expanduser()
    runs_py = str(ROOT / "bench" / "cpu_runs.py")
    if not (cache / "flash" / "adapter_config.json").exists():
        print(f"  writing the random-weights SD3-medium folder to {cache}", flush=True)
        child([sys.executable, runs_py, "make", str(cache)], 8, ROOT)
    with tempfile.TemporaryDirectory() as out:
        sample = [sys.executable, runs_py, "sample", str(cache), "--", "--model", str(cache / "sd3"), "--lora",
                  str(cache / "flash"), "--prompt", B.PROMPT, "--seed", "0", "--height", str(size), "--width",
                  str(size), "--out", out, "--overwrite"]
        card = [sys.executable, runs_py, "card", str(cache), "--size", str(size)]
        runs = {"ours, flashsd3-sample (dtype auto)": (sample, 10),
                "ours, flashsd3-sample --dtype fp32": (sample + ["--dtype", "fp32"], 17.5),
                "card: diffusers + peft, float32": (card, 17.5)}
        results = {}
        for name, (cmd, need) in runs.items():
            print(f"  {name} ...", flush=True)
            r = child(cmd, need, Path(out))
            if "skipped" not in r and "generate_s" not in r:
                r.update(cli_times(r["output"]))
            results[name] = r
            print(f"  {name}: {json.dumps({k: v for k, v in r.items() if k != 'output'})}", flush=True)
    loads = {dtype: child([sys.executable, runs_py, "load", str(cache), "--dtype", dtype], 10, ROOT)
             for dtype in ("bf16", "fp32")}
    ours, fp32, card = results.values()
    rows = []
    for name, r in results.items():
        if "skipped" in r:
            rows.append((name, *["-"] * 6, r["skipped"]))
            continue
        ratio = "-" if "skipped" in card else f"{card['generate_s'] / r['generate_s']:.2f}x"
        rows.append((name, f"{r['generate_s']:.1f}", ratio,
                     f"{r['load_s']:.1f}", f"{r['wall_s']:.1f}", f"{r['peak_rss_gib']:.2f}",
                     f"{r['load'][0]:.1f} / {r['load'][1]:.1f}", f"{r['free_gib_before']:.1f}"))
    rep.table(("run", "generate s", "card / this", "model load s", "process wall s", "peak RSS GiB",
               "load before / after", "GiB free before"), rows)
    lines = [f"load_transformer alone ({dtype}): peak RSS {r['peak_rss_gib']:.2f} GiB for {r['weights_gib']:.2f} GiB "
             f"of weights, {r['load_s']:.1f} s" for dtype, r in loads.items()]
    rep.add("", "Loading the fp16 transformer file (as published):", *[f"- {ln}" for ln in lines])
    rep.rows.append({"e2e": {k: {kk: vv for kk, vv in v.items() if kk != "output"} for k, v in results.items()}})
    if "skipped" not in ours and "skipped" not in card:
        rep.target("end to end: ours auto / card float32 (generate time)", ours["generate_s"] / card["generate_s"],
                   TARGETS["e2e"])
    if "skipped" not in ours and "skipped" not in card:
        rep.target("end to end: peak RSS ours bf16 / card float32", ours["peak_rss_gib"] / card["peak_rss_gib"],
                   TARGETS["rss"])
    if "skipped" not in ours and "skipped" not in fp32:
        rep.target("end to end: peak RSS ours bf16 / ours float32", ours["peak_rss_gib"] / fp32["peak_rss_gib"],
                   TARGETS["rss"])


# Command line ------------------------------------------------------------------------------------

def header(args) -> list[str]:
    import diffusers
    import peft

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return [f"# flashsd3 bf16 on a CPU: {cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores",
            "", f"`python bench/cpu_bf16.py {' '.join(sys.argv[1:])}`", "",
            f"bf16 matrix units: {cpu_bf16_units() or 'none'}; torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, peft {peft.__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}; "
            f"{available_gib():.1f} GiB available at start; load average at start {os.getloadavg()}.",
            "", "Rates (bf16 2048^3 matmul, float32 matmul, bf16 3x3 conv): measured before each part and at the end, "
            "listed under Targets.", "",
            f"glibc keeps freed memory for reuse in this process (`flashsd3.cpu_memory.keep_freed_memory`, as "
            f"flashsd3-sample does; both sides of the in-process parts run with it): {args.kept}."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="flashsd3 bf16 on a CPU vs diffusers and the card recipe; see the "
                                            "module docstring")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}")
    p.add_argument("--depth", type=int, default=2, help="joint blocks of the repeated transformer runs")
    p.add_argument("--size", type=int, default=1024, help="image px of the repeated transformer runs")
    p.add_argument("--vae-size", type=int, default=1024)
    p.add_argument("--e2e-size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", default="~/.cache/flashsd3-bench/sd3-random",
                   help="where `e2e` keeps the random-weights SD3-medium folder (6.3 GB)")
    p.add_argument("--out", help="also write the markdown report here")
    args = p.parse_args(argv)
    asked = args.parts.split(",")
    if bad := set(asked) - set(PARTS):
        p.error(f"unknown parts {sorted(bad)}")
    args.parts = [part for part in PARTS if part in asked]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.kept = keep_freed_memory()  # as flashsd3-sample: both sides of the in-process parts run with it
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    args.rate = args.rate32 = args.conv_rate = 0.0
    measure_rates(args)
    rep = Report()
    rep.add(*header(args))
    start = time.perf_counter()
    for part in args.parts:
        release_freed_memory()  # the last part's models: back to the OS
        measure_rates(args)
        t0 = time.perf_counter()
        if part in ("transformer", "full"):
            part_transformer(args, rep, full=part == "full")
        else:
            {"vae": part_vae, "compile": part_compile, "e2e": part_e2e}[part](args, rep)
        print(f"  ({part}: {time.perf_counter() - t0:.0f} s)", flush=True)
    release_freed_memory()
    measure_rates(args)
    rep.finish()
    rep.add("", "## Targets", "", *rep.targets, "",
            "Rates measured before each part (TFLOP/s, bf16 matmul / float32 matmul / bf16 conv, 1-min load): "
            + "; ".join(f"{a / 1e12:.3f} / {b / 1e12:.3f} / {c / 1e12:.3f} ({ld:.1f})" for a, b, c, ld in args.rates)
            + ", and once more at the end. The floors use the best of them (a busy machine depresses any single "
            "measurement; a floor must not be slower than what the hardware showed in this run).", "",
            f"Wall time of this command: {(time.perf_counter() - start) / 60:.1f} min; load average at the end "
            f"{os.getloadavg()}.")
    if args.out:
        Path(args.out).write_text("\n".join(rep.lines) + "\n")
    print(json.dumps({"rows": rep.rows}))


if __name__ == "__main__":
    main()
