"""Test helpers for `flashsd3-train` runs: subprocess commands (the real entry point, torchrun, signals) with
OMP_NUM_THREADS=1, so a run's float operations do not depend on the machine's load; a tiny demo-model cache;
reading a run's checkpoints and metrics."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from flashsd3.training import cli

ROOT = Path(__file__).resolve().parents[1]
ERR = "flashsd3-train: error:"
CAPTIONS = ["a red circle", "a blue square", "a green star", ""]


def error_line(capsys) -> str:
    """The one line an in-process `cli.main` printed on stderr (it must be exactly one, an error)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERR), lines
    return lines[0]


def tree_state(root: Path) -> dict | None:
    """Every entry under `root` -> (kind, mode, SHA-256 of a file's bytes); None if `root` does not exist."""
    if not root.exists():
        return None
    state = {}
    for p in sorted([root, *root.rglob("*")]):
        data = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        state[str(p.relative_to(root))] = ("dir" if p.is_dir() else "file", p.stat().st_mode, data)
    return state


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    path = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    e.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    return e


def train_cmd(objective: str, cache: Path, out: Path, args: list, ranks: int = 1) -> list:
    """`python -m flashsd3.training.cli OBJECTIVE ...`, under torchrun (--standalone) when ranks > 1."""
    head = [sys.executable, "-m", "flashsd3.training.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
        "-m", "flashsd3.training.cli"]
    return [*head, objective, "--cache", str(cache), "--out", str(out), *map(str, args)]


def run(cmd: list) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, env=env(), capture_output=True, text=True, timeout=600)


def run_here(cmd: list) -> subprocess.CompletedProcess:
    """A one-process `train_cmd` run in this process (`cli.main`, one thread as conftest.py sets): the same
    result as the subprocess, without starting Python and importing torch again."""
    assert cmd[1:3] == ["-m", "flashsd3.training.cli"], cmd
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(cmd[3:])
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


def demo_cache(root: Path, captions: list[str]) -> Path:
    """`prepare --demo` over 8 random 32x32 images captioned in turn by `captions`; returns the cache folder."""
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(captions[i % len(captions)])
    assert cli.main(["prepare", "--demo", "--data", str(data), "--resolution", "32", "--out", str(root / "cache")]) == 0
    return root / "cache"


def checkpoint_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The trained tensors of a run's checkpoint at `step`."""
    return load_file(str(out / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
