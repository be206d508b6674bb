"""Atomic files and training checkpoints.

A checkpoint is one folder `checkpoints/step-NNNNNNN/`: `trainable.safetensors` (the trained tensors by
parameter name, fp32 as trained) and `state.pt` (optimiser state, step, RNG states, the run's config), read
back with `torch.load(weights_only=True)`. It is written under a temporary name and renamed, so a folder under
its final name is always complete: a run killed while writing leaves the previous checkpoint intact.
(torchtitan's distributed checkpoints are the model at scale; one rank-0 folder suffices for adapters.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"step-(\d{7})")


def atomic_file(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp) beside `path`, then rename over it: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_json(path: Path, data) -> None:
    atomic_file(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def atomic_dir(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp_dir) then rename it to `path` (replacing an older folder of that name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNNN atomically, then drop all but the newest `keep` (0 keeps all)."""
    path = folder / f"step-{step:07d}"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), **extra}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")

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


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable tensors, state dict) of one checkpoint folder."""
    return load_file(str(path / "trainable.safetensors")), torch.load(path / "state.pt", weights_only=True)
