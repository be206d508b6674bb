#!/usr/bin/env python
"""The separate processes of bench/cpu_bf16.py (each one's peak RSS is its own): a random-weights SD3-medium
folder on disk, flashsd3-sample and the model card's recipe run from it, and a bare transformer load.

    python bench/cpu_runs.py make DIR          # DIR/sd3 (diffusers layout, fp16 as published) + DIR/flash (PEFT)
    python bench/cpu_runs.py sample DIR -- --prompt ... [flashsd3-sample flags]   # the CLI, then its peak RSS
    python bench/cpu_runs.py card DIR          # diffusers + peft, float32: the card's recipe as a CPU user runs it
    python bench/cpu_runs.py load DIR --dtype bf16   # flashsd3.load_transformer alone

`make` writes what `from_pretrained` reads from stabilityai/stable-diffusion-3-medium-diffusers (transformer,
VAE, CLIP-L/G, tokenizers, scheduler; no T5, as the Flash recipe) and a Flash-shaped adapter (rank 64, alpha 8,
the published targets, float32 as published), all random (bench/benchmark.py `materialize`: LeCun-scaled). Each
run prints one JSON line: seconds to load, seconds to generate, peak RSS in GiB (VmHWM: this process's own
peak; getrusage's ru_maxrss would also count the parent's memory at the fork). torch is imported inside the
functions, so `sample` runs flashsd3-sample exactly as the console script does (it sets MKL's environment first).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPT = "a raccoon reading a book in a lush forest, golden hour"


def peak_rss_gib() -> float:
    """This process's own peak resident memory (VmHWM of its address space), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # not Linux: the closest there is


def make(folder: Path, depth: int) -> None:
    """DIR/sd3: the diffusers pipeline folder, fp16; DIR/flash: the adapter. One component in memory at a time;
    `depth` < 24 only for quick checks of this script."""
    import benchmark as B
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPTextModelWithProjection

    from flashsd3.config import FLASH_SD3_ADAPTER, SD3_MEDIUM
    from flashsd3.tokenizers import sd3_clip_tokenizers

    root = folder / "sd3"
    for sub, tokenizer in zip(("tokenizer", "tokenizer_2"), sd3_clip_tokenizers(), strict=True):
        tokenizer.save_pretrained(str(root / sub))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(root / "scheduler"))  # SD3's scheduler config
    model_index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_3": [None, None],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                   "tokenizer_3": [None, None], "transformer": ["diffusers", "SD3Transformer2DModel"],
                   "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2))
    for seed, (sub, config) in enumerate(zip(("text_encoder", "text_encoder_2"), B.CLIP_CONFIGS, strict=True)):
        with torch.device("meta"):
            clip = CLIPTextModelWithProjection(config).half()
        ids = {"text_model.embeddings.position_ids": torch.arange(config.max_position_embeddings)[None]}
        B.materialize(clip, "cpu", 3 + seed, ids).save_pretrained(str(root / sub))
        del clip
    with torch.device("meta"):
        vae = AutoencoderKL(**B.SD3_VAE_DIFFUSERS).half()
    B.materialize(vae, "cpu", 2, {}).save_pretrained(str(root / "vae"))
    del vae
    transformer = random_transformer(replace(SD3_MEDIUM, depth=depth))
    transformer.save_pretrained(str(root / "transformer"))
    flash = FLASH_SD3_ADAPTER
    config = LoraConfig(r=flash.rank, lora_alpha=flash.alpha, target_modules=list(flash.target_modules),
                        lora_dropout=0.0)
    peft_model = get_peft_model(transformer, config)  # adapters in float32 (autocast_adapter_dtype), as published
    B.flash_adapter(peft_model, seed=1, folder=str(folder / "flash"))
    print(json.dumps({"made": str(folder), "peak_rss_gib": round(peak_rss_gib(), 2)}))


def random_transformer(cfg):
    """SD3Transformer2DModel at `cfg`, fp16, random (bench/benchmark.py's scheme), built without a float32 copy."""
    import benchmark as B
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg.to_diffusers()).half()
    pe = model.pos_embed
    table = get_2d_sincos_pos_embed(cfg.hidden_size, cfg.pos_embed_max_size, base_size=pe.base_size,
                                    interpolation_scale=pe.interpolation_scale, output_type="pt")
    return B.materialize(model, "cpu", 0, {"pos_embed.pos_embed": table.half().unsqueeze(0)})


def card(folder: Path, size: int, steps: int) -> None:
    """The Flash SD3 model card's code with torch_dtype=torch.float32 on the CPU (a CPU cannot run its fp16):
    SD3Transformer2DModel + PeftModel.from_pretrained (adapter unmerged), StableDiffusion3Pipeline without T5,
    4 steps, guidance 0; the Flash step is diffusers' stochastic Euler (bench/benchmark.py)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import PeftModel

    t0 = time.perf_counter()
    transformer = SD3Transformer2DModel.from_pretrained(str(folder / "sd3"), subfolder="transformer",
                                                        torch_dtype=torch.float32)
    transformer = PeftModel.from_pretrained(transformer, str(folder / "flash"))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder / "sd3"), transformer=transformer,
                                                    torch_dtype=torch.float32, text_encoder_3=None, tokenizer_3=None)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    pipe.set_progress_bar_config(disable=True)
    t1 = time.perf_counter()
    pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, max_sequence_length=77, height=size, width=size,
         generator=torch.Generator().manual_seed(0)).images[0]
    t2 = time.perf_counter()
    print(json.dumps({"load_s": round(t1 - t0, 2), "generate_s": round(t2 - t1, 2),
                      "peak_rss_gib": round(peak_rss_gib(), 2)}))


def load(folder: Path, dtype: str) -> None:
    from flashsd3 import load_transformer

    t0 = time.perf_counter()
    model = load_transformer(folder / "sd3" / "transformer", dtype=dtype)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**30
    print(json.dumps({"load_s": round(time.perf_counter() - t0, 2), "weights_gib": round(weights, 2),
                      "dtype": str(model.dtype), "peak_rss_gib": round(peak_rss_gib(), 2)}))


def sample(cli_args: list[str]) -> None:
    """flashsd3-sample in this process (its main sets MKL's environment and the allocator, then imports torch)."""
    from flashsd3 import cli

    code = cli.main(cli_args)
    print(json.dumps({"code": code, "peak_rss_gib": round(peak_rss_gib(), 2)}))
    sys.exit(code)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sample"]:  # everything after `--` goes to flashsd3-sample
        return sample(argv[argv.index("--") + 1:])
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["make", "card", "load"])
    p.add_argument("folder", type=Path)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--depth", type=int, default=24, help="make: joint blocks (24 = SD3-medium)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        if args.what == "make":
            make(args.folder, args.depth)
        elif args.what == "card":
            card(args.folder, args.size, args.steps)
        else:
            load(args.folder, args.dtype)


if __name__ == "__main__":
    main()
