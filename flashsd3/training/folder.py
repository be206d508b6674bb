"""A run's output folder: how a run is recognised, what it wrote, and what `--overwrite` may delete.

A run starts only in a new or empty folder and first writes its marker, `flashsd3-run.json`; every other file
of the folder is then the run's own (RUN_FILES, and in RUN_DIRS the names their writers use). A folder without
the marker is never written into nor cleared, whatever its files are called; `--overwrite` deletes exactly the
run's files (a file the user added, in the folder or in a run's sub-folder, stays).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..outputs import atomic_json, atomic_write

MARKER = "flashsd3-run.json"
RUN_FILES = ("config.json", "metrics.jsonl", "done.json", MARKER)
# sub-folder -> names its writer gives entries (atomic writes' temporary names start with "." and end in .tmp)
RUN_DIRS = {
    "checkpoints": re.compile(r"(\.)?step-\d{7}(\..*\.tmp)?"),
    "samples": re.compile(r"(\.)?step-\d{7}\.png(\..*\.tmp)?"),
    "lora": re.compile(r"(\.)?adapter_(model\.safetensors|config\.json)(\..*\.tmp)?"),
}
RUN_FOLDERS = ("transformer",)  # written whole by one atomic rename (trainable.save_trained)
TMP = re.compile(r"\.(config\.json|metrics\.jsonl|done\.json|flashsd3-run\.json|lora|transformer)\..*\.tmp")


class RunError(ValueError):
    """The run cannot start as asked (output folder, batch size, resume); one line for the user."""


def is_run(out: Path) -> bool:
    return (out / MARKER).is_file()


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder a run may not use: a file, a non-empty folder holding no run (even with --overwrite), a
    run without --resume or --overwrite, a --resume with nothing to resume."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    if out.is_dir() and not is_run(out) and any(out.iterdir()):
        raise RunError(f"--out {out} is not empty and holds no flashsd3-train run (no {MARKER}): nothing in it is "
                       "written or deleted; choose an empty or new folder")
    if resume and not (out / "config.json").is_file():
        raise RunError(f"nothing to resume: {out / 'config.json'} does not exist (start the run without --resume)")
    if resume or overwrite or not out.is_dir() or not (out / "config.json").is_file():
        return
    done = out / "done.json"
    if done.is_file():
        raise RunError(f"{out} holds a finished run ({finished_step(out)} steps): --resume (with more --steps) to "
                       "continue it, --overwrite to replace it, or another --out")
    raise RunError(f"{out} holds a run in progress: --resume to continue it, --overwrite to replace it, or another "
                   "--out")


def finished_step(out: Path) -> int | None:
    try:
        return json.loads((out / "done.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_run(out: Path) -> None:
    """Delete what a run wrote in `out` (a marked run folder), nothing else."""
    if not is_run(out):
        return
    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    for name, pattern in RUN_DIRS.items():
        folder = out / name
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if pattern.fullmatch(entry.name):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    for entry in out.iterdir():
        if TMP.fullmatch(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for name in RUN_FILES:  # the marker last: a clear interrupted half-way still leaves a marked run folder
        if name != MARKER:
            (out / name).unlink(missing_ok=True)


def start(out: Path, command: str, config: dict, overwrite: bool, resumed_step: int | None) -> None:
    """Make `out` the run's folder (rank 0, after every check): clear it for --overwrite, mark it, drop the
    finished marker and metric lines past the resumed step, save the configuration."""
    if overwrite:
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_json(out / MARKER, {"command": command, "format": 1})
    (out / "done.json").unlink(missing_ok=True)
    trim_metrics(out / "metrics.jsonl", resumed_step or 0)
    atomic_json(out / "config.json", config)


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step (a killed run may have logged beyond its last checkpoint)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in lines), encoding="utf-8"))


def log_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
