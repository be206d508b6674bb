"""Run configurations: frozen dataclasses, filled from defaults <- a JSON/TOML file <- command-line flags.

`TrainConfig` holds what every objective's run needs; an objective subclasses it (flow.FlowConfig adds the
sigma density and caption dropout; flash.task.FlashConfig nests a `FlashRecipe`). Every field is a *setting*:
one --flag (`lora_rank` -> --lora-rank), one key of the config file, its `help` the flag's help; the fields of a
nested dataclass are settings of their own (`teacher_steps`, not `recipe.teacher_steps`), so a new field needs no
CLI code. The resolved configuration is saved flat as `config.json` beside the outputs and is the base of a
`--resume`. Values are typed by the fields' annotations; a value of another type is refused naming its flag or
its key and file.
"""
from __future__ import annotations

import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from ..rules import check_seed

# Settings a resumed run may change: they do not alter the trajectory, only how long it runs and what it writes
# (`steps` only without --lr-decay-steps, whose decay is placed by it).
# `out` is where the run is now (a run folder may be moved); `cache` is compared as a resolved path.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "sample_every", "device")

# Settings added after runs were saved, each with the value that a stored configuration without it ran with. A
# preset may set them otherwise today (distill: --chain-starts 1, --renoise initial, --late-guidance 0.8), so an
# older config.json is read as the run it was (a resume, a checkpoint's check), not as today's preset.
ADDED_SETTINGS = {"chain_starts": 0.0, "renoise": "fresh", "chain_steps": "drawn", "late_guidance": 1.0}


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def flag(name: str) -> str:
    """The command-line flag of setting `name`."""
    return "--" + name.replace("_", "-")


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
    lr_decay_steps: int = opt(0, "linear learning-rate decay to 0 over the last N steps (0: constant to the end; "
                                 "the toy's distill runs decay over their last quarter)")
    weight_decay: float = opt(1e-4, "AdamW weight decay (diffusers' SD3 LoRA script default)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    seed: int = opt(0, "data order, noise, sigmas, caption dropout and adapter initialisation (0 .. 2**64 - 1)")
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
                raise ValueError(f"{flag(name)} is required (or '{name}' in the config file)")
        positive = ("steps", "batch_size", "lora_rank", "checkpoint_every", "sample_steps")
        nonneg = ("warmup_steps", "lr_decay_steps", "keep_checkpoints", "sample_every", "grad_clip", "lr",
                  "weight_decay", "lora_alpha", "sample_guidance")
        bad = [f"{flag(n)} must be > 0, got {getattr(self, n)}" for n in positive if not getattr(self, n) > 0]
        bad += [f"{flag(n)} must be finite and >= 0, got {getattr(self, n)}" for n in nonneg
                if not 0 <= getattr(self, n) < math.inf]
        if self.lr_decay_steps > self.steps:
            bad.append(f"--lr-decay-steps {self.lr_decay_steps} must be <= --steps {self.steps}")
        for name in ("seed", "sample_seed"):
            try:
                check_seed(getattr(self, name), 1, flag(name))
            except ValueError as e:
                bad.append(str(e))
        if bad:
            raise ValueError("; ".join(bad))


# Settings: the flat view of a configuration class -------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    name: str
    kind: Any  # the field's annotation, e.g. int, tuple[int, ...]
    default: Any
    help: str
    choices: tuple | None
    parent: str | None  # the field of the nested dataclass holding it (FlashConfig.recipe), or None


def settings(cls) -> dict[str, Setting]:
    """Every setting of a configuration class, nested dataclass fields flattened, in field order."""
    out: dict[str, Setting] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if is_dataclass(hints[f.name]):
            inner = settings(hints[f.name])
            out.update({n: replace(s, parent=f.name, default=getattr(default, n)) for n, s in inner.items()})
        else:
            out[f.name] = Setting(f.name, hints[f.name], default, f.metadata.get("help", ""),
                                  f.metadata.get("choices"), None)
    return out


def flat(cfg) -> dict[str, Any]:
    """{"command": ..., setting: value}: what config.json holds (tuples as lists)."""
    values = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        values.update(asdict(value) if is_dataclass(value) else {f.name: value})
    return {"command": cfg.command, **json.loads(json.dumps(values))}


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON (.json) or TOML (.toml) table of setting names (dashes allowed) to values."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read the config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"the config file {path} is not UTF-8 text") from None
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


def make_config(cls, *layers: tuple[dict[str, Any], str | None]):
    """cls(defaults updated by each layer in turn); a layer is (values, source): source None for flags, else the
    file the values come from (named in errors). Unknown keys and wrong types are errors naming the setting."""
    known = settings(cls)
    values: dict[str, Any] = {}
    for layer, source in layers:
        for key, value in layer.items():
            if key not in known:
                where = f" in {source}" if source else ""
                raise ValueError(f"unknown setting {key!r}{where}; known: {', '.join(known)}")
            values[key] = convert(known[key], value, flag(key) if source is None else f"setting {key!r} in {source}")
    top = {k: v for k, v in values.items() if known[k].parent is None}
    parents = {s.parent for s in known.values() if s.parent}
    for f in (f for f in fields(cls) if f.name in parents):
        inner = {k: v for k, v in values.items() if known[k].parent == f.name}
        # a nested configuration with named presets declares preset(values) -> the base its values override
        # (FlashConfig.recipe: --recipe distill); others start from the field's default
        preset = f.metadata.get("preset")
        top[f.name] = replace(preset(inner) if preset else f.default, **inner)
    return cls(**top)


def convert(setting: Setting, value: Any, name: str):
    """`value` (a flag's text or a file's value) as the setting's type; ValueError naming `name`."""
    kind = setting.kind
    if typing.get_origin(kind) is tuple:
        value = _tuple(typing.get_args(kind)[0], value, name)
    else:
        value = _scalar(kind, value, name, from_text=False)
    if setting.choices and value not in setting.choices:
        raise ValueError(f"{name} must be one of {', '.join(setting.choices)}, got {value!r}")
    return value


_NAMES = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def _scalar(kind, value, name: str, from_text: bool):
    """One value of type `kind`; text is parsed when it comes from a comma-separated flag or list."""
    if from_text and isinstance(value, str) and kind in (int, float):
        try:
            return kind(value.strip())
        except ValueError:
            raise ValueError(f"{name} must hold {_NAMES[kind]}s, got {value.strip()!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be {_NAMES[kind]}, got {value!r}")
    return value


def _tuple(item, value, name: str) -> tuple:
    """A tuple of `item` from a list or from text ("a,b,c"; rows of a nested tuple separated by '/')."""
    nested = typing.get_origin(item) is tuple
    if isinstance(value, str):
        parts = [p for p in value.split("/" if nested else ",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        what = "a list of lists" if nested else "a list (or comma-separated text)"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if nested:
        return tuple(_tuple(typing.get_args(item)[0], p, name) for p in parts)
    if item is str:
        return tuple(str(_scalar(str, p, name, True)).strip() for p in parts if str(p).strip())
    return tuple(_scalar(item, p, name, True) for p in parts)


def stored_values(cls, stored: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration's settings (not its command or folder), with ADDED_SETTINGS where it predates them."""
    known = settings(cls)
    added = {k: v for k, v in ADDED_SETTINGS.items() if k in known and k not in stored}
    return {**added, **{k: v for k, v in stored.items() if k not in ("command", "out")}}


def config_differences(cls, cfg, stored: dict[str, Any]) -> list[str]:
    """What a stored configuration (a checkpoint's) sets otherwise than `cfg`, beyond what a resume may change."""
    try:
        other = make_config(cls, (stored_values(cls, stored), "the checkpoint"), ({"out": cfg.out}, None))
    except ValueError as e:
        return [f"a configuration this run cannot read ({e})"]
    known = settings(cls)
    return [f"{flag(k)} {getattr(_holder(other, s), k)!r} (this run: {getattr(_holder(cfg, s), k)!r})"
            for k, s in known.items() if k not in (*RESUMABLE_CHANGES, "out")
            and not _same(k, getattr(_holder(other, s), k), getattr(_holder(cfg, s), k))]


def resumed_config(cls, saved: dict[str, Any], changes: dict[str, Any], out: Path):
    """The saved run's configuration with the few changes a resume may make (RESUMABLE_CHANGES); `out` is where
    the run is now (its folder may have been moved). `changes`: the command's flags over its config file."""
    saved_file = out / "config.json"
    base = make_config(cls, (stored_values(cls, saved), str(saved_file)), ({"out": str(out)}, None))
    known = settings(cls)
    changed = [k for k, v in changes.items() if k not in (*RESUMABLE_CHANGES, "out")
               and not _same(k, convert(known[k], v, flag(k)), getattr(_holder(base, known[k]), k))]
    if changed:
        raise ValueError(f"--resume continues the run saved in {out}: it cannot change {', '.join(map(flag, changed))} "
                         f"(only {', '.join(map(flag, RESUMABLE_CHANGES))}); start a new run in another --out")
    new_steps = convert(known["steps"], changes["steps"], "--steps") if "steps" in changes else base.steps
    if base.lr_decay_steps and new_steps != base.steps:
        raise ValueError(f"--resume continues the run saved in {out}: its learning rate decays over the last "
                         f"{base.lr_decay_steps} of its {base.steps} steps (--lr-decay-steps), so --steps cannot "
                         "change; start a new run in another --out")
    kept = {k: v for k, v in flat(base).items() if k != "command"}
    return make_config(cls, (kept, None), ({k: v for k, v in changes.items() if k in RESUMABLE_CHANGES}, None))


def _holder(cfg, setting: Setting):
    return getattr(cfg, setting.parent) if setting.parent else cfg


def _same(key: str, a, b) -> bool:
    """Equal settings; paths compare resolved (the same folder however spelled)."""
    if key == "cache":
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    if key == "model" and a and b:
        from .models import model_id

        return model_id(a) == model_id(b)
    return a == b
