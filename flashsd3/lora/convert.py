"""Rewrite a LoRA file in another layout: `python -m flashsd3.lora.convert SRC DST --format kohya`.

SRC: anything `load_lora` reads (peft folder, diffusers / kohya / OneTrainer .safetensors, Hub repo id).
DST: a folder (peft) or a .safetensors file / folder (diffusers, kohya); see save.py for the layouts.
The LoRA is planned onto a meta-device MMDiT (no weights, no memory) of the `--model-config` preset;
`auto` (default) takes the first preset every key and shape of the file fits, in the order listed.
A and B keep the file's dtype unless `--dtype` says otherwise; the scale (alpha / r) is carried over.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..config import MMDIT_PRESETS, TINY, MMDiTConfig
from ..mmdit import MMDiT
from .formats import LoRAError
from .save import OUT_FORMATS, save_lora
from .train import load_trainable_lora

PRESETS: dict[str, MMDiTConfig] = {**MMDIT_PRESETS, "tiny": TINY}  # tiny: tests and the offline demo
DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def convert(source: str | Path, dest: str | Path, *, format: str, model_config: str = "auto",
            dtype: torch.dtype | None = None) -> tuple[Path, str]:
    """Convert; returns (weights file written, preset used)."""
    model, preset = _planned(source, model_config)
    return save_lora(model, dest, name="lora", format=format, dtype=dtype), preset


def _planned(source: str | Path, model_config: str) -> tuple[nn.Module, str]:
    """A meta-device MMDiT holding the file's adapter (A and B on the CPU) as adapter 'lora'."""
    if model_config != "auto" and model_config not in PRESETS:
        raise LoRAError(f"--model-config must be 'auto' or one of {sorted(PRESETS)}, got {model_config!r}")
    errors = []
    for preset in PRESETS if model_config == "auto" else [model_config]:
        with torch.device("meta"):
            model = MMDiT(PRESETS[preset])
        try:
            load_trainable_lora(model, source, name="lora", dtype=None, device="cpu")
            return model, preset
        except LoRAError as e:
            errors.append(f"{preset}: {str(e).splitlines()[0][:300]}")
    raise LoRAError(f"{source}: the LoRA fits no model config:\n  " + "\n  ".join(errors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashsd3-lora-convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="LoRA folder, .safetensors file or Hub repo id")
    parser.add_argument("dest", help="output folder (peft) or .safetensors file / folder (diffusers, kohya)")
    parser.add_argument("--format", required=True, choices=OUT_FORMATS)
    parser.add_argument("--model-config", default="auto", choices=["auto", *PRESETS],
                        help="transformer the LoRA is for (default: the first preset it fits)")
    parser.add_argument("--dtype", default="keep", choices=list(DTYPES), help="dtype of A and B in the output")
    args = parser.parse_args(argv)
    try:
        written, preset = convert(args.source, args.dest, format=args.format, model_config=args.model_config,
                                  dtype=DTYPES[args.dtype])
    except (LoRAError, FileNotFoundError) as e:
        print(f"flashsd3-lora-convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written} ({args.format} layout, {preset} transformer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
