"""Run configurations: frozen dataclasses, filled from defaults <- a JSON/TOML file <- command-line flags.

`TrainConfig` holds what every objective's run needs; an objective subclasses it (flow.FlowConfig adds the
sigma density and caption dropout). Each field's `help` is its comment and its --flag's help: the CLI makes one
flag per field (`lora_rank` -> `--lora-rank`), so a new field needs no CLI code. The resolved configuration is
saved as `config.json` beside the outputs and is the base of a `--resume`.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

# Fields a resumed run may change: they do not alter the trajectory, only how long it runs and what it writes.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "sample_every", "device")


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """What every training run needs: data, model, trained parameters, optimiser, schedule of outputs."""

    cache: str = opt("", "cache folder made by `flashsd3-train prepare` (required)")
    out: str = opt("", "output folder: config, metrics, checkpoints, samples, final weights (required)")
    model: str = opt("", "transformer weights (folder, file, hub id or 'demo'); default: the cache's model")
    steps: int = opt(1000, "optimiser steps in all")
    batch_size: int = opt(4, "global batch (all ranks together); must divide by the number of ranks")
    lr: float = opt(1e-4, "AdamW learning rate")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    weight_decay: float = opt(1e-4, "AdamW weight decay (diffusers' SD3 LoRA script default)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    seed: int = opt(0, "data order, noise, sigmas, caption dropout and adapter initialisation")
    lora_rank: int = opt(16, "LoRA rank (ignored with --train-modules)")
    lora_alpha: float = opt(0.0, "LoRA alpha; scale = alpha / rank (0: alpha = rank)")
    lora_targets: str = opt("flash-sd3", "'flash-sd3' (the published adapter's modules), 'all-linear', "
                                         "or comma-separated module names")
    train_modules: tuple[str, ...] = opt((), "train these full weights instead of LoRA: comma-separated "
                                             "parameter-name patterns (fnmatch), e.g. 'joint_blocks.*.x_block.*'")
    activation_checkpointing: bool = opt(False, "recompute each joint block in backward (less memory)")
    precision: str = opt("auto", "fp32 or bf16 (bf16 autocast, frozen base weights in bf16); auto: bf16 on CUDA",
                         choices=("auto", "fp32", "bf16"))
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (torchrun: one GPU per local rank)")
    checkpoint_every: int = opt(500, "write a checkpoint every N steps (and at the end and on Ctrl-C)")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints (0: all)")
    sample_every: int = opt(500, "draw the sample grid every N steps and at the end (0: never)")
    sample_steps: int = opt(28, "sampler steps of the sample grid")
    sample_guidance: float = opt(7.0, "classifier-free guidance of the sample grid (SD3's default 7)")
    sample_seed: int = opt(0, "image k of the grid starts from noise seeded sample_seed + k")

    command = "train"  # class attribute: the subcommand (flow, flash); saved in config.json

    def __post_init__(self):
        for name in ("cache", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required (or '{name}' in the config file)")
        positive = ("steps", "batch_size", "lora_rank", "checkpoint_every", "sample_steps")
        nonneg = ("warmup_steps", "keep_checkpoints", "sample_every", "grad_clip", "lr", "weight_decay", "lora_alpha")
        bad = [f"{n} must be > 0, got {getattr(self, n)}" for n in positive if not getattr(self, n) > 0]
        bad += [f"{n} must be >= 0, got {getattr(self, n)}" for n in nonneg if not getattr(self, n) >= 0]
        if bad:
            raise ValueError("; ".join(bad))


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON (.json) or TOML (.toml) table of field names (dashes allowed) to values."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read the config file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings")  # noqa: TRY004 (a usage error, exit 2)
    return {k.replace("-", "_"): v for k, v in data.items() if k != "command"}


def make_config(cls: type[TrainConfig], *layers: dict[str, Any], where: str = "") -> TrainConfig:
    """cls(**defaults updated by each layer in turn); unknown keys and wrong types are errors."""
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in known:
                raise ValueError(f"unknown setting {key!r}{where}; known: {', '.join(known)}")
            values[key] = _coerce(known[key], value, where)
    return cls(**values)


def _coerce(f, value, where: str):
    kind = type(f.default) if f.default is not MISSING else str
    if kind is tuple:
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(v).strip() for v in items if str(v).strip())
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"setting {f.name!r}{where} must be {kind.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"setting {f.name!r}{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


def resumed_config(cls: type[TrainConfig], saved: dict[str, Any], flags: dict[str, Any], out: Path) -> TrainConfig:
    """The saved run's configuration with the few changes a resume may make (RESUMABLE_CHANGES)."""
    base = make_config(cls, {k: v for k, v in saved.items() if k != "command"}, where=f" in {out / 'config.json'}")
    known = {f.name: f for f in fields(cls)}
    changed = [k for k, v in flags.items() if k not in RESUMABLE_CHANGES and _coerce(known[k], v, "") != getattr(base, k)]
    if changed:
        raise ValueError(f"--resume continues the run saved in {out}: it cannot change {', '.join(changed)} "
                         f"(only {', '.join(RESUMABLE_CHANGES)}); start a new run or use --overwrite")
    return make_config(cls, {k: getattr(base, k) for k in known}, {k: v for k, v in flags.items() if k in RESUMABLE_CHANGES})
