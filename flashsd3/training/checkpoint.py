"""Training checkpoints: the format, writing, and choosing the one a `--resume` continues from.

A checkpoint is one folder `checkpoints/step-NNNNNNN/`: `trainable.safetensors` (the trained tensors by
parameter name, fp32 as trained) and `state.pt` (read with `torch.load(weights_only=True)`): `step`, the AdamW
`optimizer` state, the run's `config` (flat, as config.json) and `param_names` (the trained parameters in the
optimiser's order). A resume reads and checks all four before it changes anything: the tensors and the names
must be this run's, the config must differ from the run's only in what a resume may change.

No RNG state is saved: every random draw of a step comes from a generator keyed by (seed, step, ...)
(flashsd3/rng.py) and nothing draws from a global generator, so a resumed step draws what the uninterrupted
run drew. (Checkpoints written before keyed generators also hold `rng` and `data_position`; they are ignored.)

The folder is written under a temporary name and renamed, so a folder under its final name is always complete:
a run killed while writing leaves the previous checkpoint intact. (torchtitan's distributed checkpoints are
the model at scale; one rank-0 folder suffices for adapters.)
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..outputs import atomic_dir

STEP_DIR = re.compile(r"step-(\d{7})")
TENSORS, STATE = "trainable.safetensors", "state.pt"


class CheckpointUnusable(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, or another run's); the message names it."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict  # AdamW state_dict


def save_checkpoint(folder: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    config: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNNN atomically, then drop all but the newest `keep` (0 keeps all)."""
    path = folder / f"step-{step:07d}"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
    state = {"step": step, "optimizer": optimizer.state_dict(), "config": config, "param_names": list(trainable)}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS))
        torch.save(state, tmp / STATE)

    folder.mkdir(exist_ok=True)
    atomic_dir(path, write)
    if keep > 0:
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders start with '.' and are not listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name))


def read_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]],
                    differences: Callable[[dict], list[str]]) -> Checkpoint:
    """Read one checkpoint folder and check it is this run's: `shapes` are the run's trained parameters in
    optimiser order, `differences(config)` what the checkpoint's config changes that a resume may not."""
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as e:  # SafetensorError (truncated, not safetensors), OSError
        raise CheckpointUnusable(f"{path / TENSORS} is unreadable ({_first_line(e)})") from None
    try:
        state = torch.load(path / STATE, weights_only=True)
        step, optimizer, config, names = (state[k] for k in ("step", "optimizer", "config", "param_names"))
    except Exception as e:  # RuntimeError / EOFError / UnpicklingError (truncated, foreign), KeyError
        raise CheckpointUnusable(f"{path / STATE} is unreadable ({_first_line(e)})") from None
    ours = {k: tuple(v) for k, v in shapes.items()}
    theirs = {k: tuple(v.shape) for k, v in tensors.items()}
    wrong = [f"{k} {theirs.get(k)} (this run: {ours.get(k)})" for k in sorted(ours.keys() | theirs.keys())
             if ours.get(k) != theirs.get(k)]
    if names != list(ours):
        wrong.append("another order of trained parameters")
    groups = optimizer.get("param_groups", []) if isinstance(optimizer, dict) else []
    if sum(len(g.get("params", ())) for g in groups) != len(ours):
        wrong.append("an optimiser state of other parameters")
    wrong += differences(config) if isinstance(config, dict) else ["no run configuration"]
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise CheckpointUnusable(f"{path} does not match this run: {shown}")
    if step != int(STEP_DIR.fullmatch(path.name).group(1)):
        raise CheckpointUnusable(f"{path / STATE} says step {step}, not the folder's")
    return Checkpoint(path, step, tensors, optimizer)


def resume_point(folder: Path, shapes: dict[str, tuple[int, ...]], differences: Callable[[dict], list[str]],
                 warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint this run can continue from, newer unusable ones skipped with a warning; None if
    there is none at all; CheckpointUnusable (naming the newest's problem) if none is usable."""
    problems = []
    for path in reversed(list_checkpoints(folder)):
        try:
            ckpt = read_checkpoint(path, shapes, differences)
        except CheckpointUnusable as e:
            problems.append(str(e))
            continue
        for problem in problems:
            warn(f"{problem}: resuming from the older {path.name}")
        return ckpt
    if problems:
        older = f" (and the {len(problems) - 1} older checkpoint(s) too)" if len(problems) > 1 else ""
        raise CheckpointUnusable(f"cannot resume: {problems[0]}{older}")
    return None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text.split('. ')[0][:160]}"
