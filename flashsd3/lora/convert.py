"""Rewrite a LoRA file in another layout: `python -m flashsd3.lora.convert SRC DST --format kohya`.

SRC: anything `load_lora` reads (peft folder, diffusers / kohya / OneTrainer .safetensors, Hub repo id).
DST: a folder (peft) or a .safetensors file / folder (diffusers, kohya); see save.py for the layouts.
The LoRA is planned onto a meta-device MMDiT (no weights, no memory) of the `--model-config` preset;
`auto` (default) takes the first preset every key and shape of the file fits, in the order listed.
A and B keep the file's dtype unless `--dtype` says otherwise; the scale (alpha / r) is carried over.
An existing destination file is replaced only with `--overwrite`; every error is one line, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..cli import one_line
from ..config import MMDIT_PRESETS, TINY, MMDiTConfig
from ..mmdit import MMDiT
from ..weights import CheckpointError
from .formats import LoRAError, LoRASource, open_lora, plan_lora
from .save import OUT_FORMATS, destination, save_lora
from .train import load_trainable_lora

PROG = "flashsd3-lora-convert"

PRESETS: dict[str, MMDiTConfig] = {**MMDIT_PRESETS, "tiny": TINY}  # tiny: tests and the offline demo
DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def convert(source: str | Path, dest: str | Path, *, format: str, model_config: str = "auto",
            dtype: torch.dtype | None = None, overwrite: bool = False) -> tuple[Path, str]:
    """Convert; returns (weights file written, preset used). The destination is checked first, the source
    opened once (a Hub id is resolved once, whatever the number of presets tried), and nothing is written
    unless every tensor is read, planned and finite."""
    destination(dest, format, overwrite)
    model, preset = _planned(open_lora(source), model_config)
    return save_lora(model, dest, name="lora", format=format, dtype=dtype, overwrite=overwrite), preset


def _planned(source: LoRASource, model_config: str) -> tuple[nn.Module, str]:
    """A meta-device MMDiT holding the file's adapter (A and B on the CPU) as adapter 'lora'."""
    if model_config != "auto" and model_config not in PRESETS:
        raise LoRAError(f"--model-config must be 'auto' or one of {sorted(PRESETS)}, got {model_config!r}")
    errors: dict[str, list[str]] = {}  # message (on one line) -> presets that gave it
    for preset in PRESETS if model_config == "auto" else [model_config]:
        with torch.device("meta"):
            model = MMDiT(PRESETS[preset])
        try:
            plan_lora(model, source)  # keys and shapes only: whether the file fits this model
        except LoRAError as e:
            errors.setdefault(one_line(e), []).append(preset)
            continue
        load_trainable_lora(model, source, name="lora", dtype=None, device="cpu")  # reads: NaN/inf refused here
        return model, preset
    if len(errors) == 1:  # the same for every model tried: a problem of the file, or the one preset asked for
        raise LoRAError(next(iter(errors)))
    reasons = [f"{', '.join(presets)}: {one_line(message, 240)}" for message, presets in errors.items()]
    raise LoRAError(f"{source.reader.name}: the LoRA fits no model config: " + "; ".join(reasons))


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0],
                     epilog="Exit codes: 0 written, 2 bad input or existing destination (nothing written), "
                            "130 interrupted.")
    parser.add_argument("source", help="LoRA folder, .safetensors file or Hub repo id")
    parser.add_argument("dest", help="output folder (peft) or .safetensors file / folder (diffusers, kohya)")
    parser.add_argument("--format", required=True, choices=OUT_FORMATS)
    parser.add_argument("--model-config", default="auto", choices=["auto", *PRESETS],
                        help="transformer the LoRA is for (default: the first preset it fits)")
    parser.add_argument("--dtype", default="keep", choices=list(DTYPES), help="dtype of A and B in the output")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination file")
    args = parser.parse_args(argv)
    try:
        written, preset = convert(args.source, args.dest, format=args.format, model_config=args.model_config,
                                  dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    except (CheckpointError, OSError) as e:  # LoRAError is a CheckpointError; OSError: permissions, disk full
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (nothing written unless reported)", file=sys.stderr)
        return 130
    print(f"wrote {written} ({args.format} layout, {preset} transformer)")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


if __name__ == "__main__":
    sys.exit(main())
