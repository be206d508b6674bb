"""Output files: the package's one atomic writer (files and folders, used by sampling, training, LoRA saving
and the toy), and flashsd3-sample's job names, plan of a run and PNG / JSON writes.

Image k of a run (prompts in order, `per_prompt` images each) is named f"{k:05d}-{seed + k}-{slug}.png"
and drawn from seed + k alone (`flashsd3.pipeline.image_seeds`). Jobs are computed from their index on
demand, so a run of a billion images plans in constant memory. Files are written under a temporary name
and renamed, so a file under its final name is always complete; they get the mode a plain `open` would
give them (0o666 minus the umask), and a replaced file keeps its own mode.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"^(\d{5,})-\d+-.+\.(png|json)$")  # what Job.filename (and its sidecar) look like


class OutputError(Exception):
    """An output folder or file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Job:
    index: int  # global image index: the same whatever the number of ranks or the batch size
    prompt: str
    seed: int  # base seed + index (pipeline.image_seeds)

    @property
    def filename(self) -> str:
        return f"{self.index:05d}-{self.seed}-{slugify(self.prompt)}.png"


def slugify(text: str, max_len: int = 40) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > max_len:  # cut at a word boundary when there is one
        cut = slug[: max_len + 1].rfind("-")
        slug = slug[:cut] if cut > 0 else slug[:max_len]
    return slug or "untitled"


@dataclass(frozen=True)
class Plan:
    """All jobs of a run in prompt-major order, as the pipeline batches [p0, p0, p1, p1]."""

    prompts: tuple[str, ...]
    per_prompt: int
    seed: int

    @property
    def total(self) -> int:  # a property, not __len__: len() stops at sys.maxsize
        return len(self.prompts) * self.per_prompt

    def job(self, index: int) -> Job:
        return Job(index, self.prompts[index // self.per_prompt], self.seed + index)

    def batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[list[Job]]:
        """This rank's batches: the run is cut into batches of `batch_size` as one process would cut
        it, and batch b goes to rank b % world. Every image is then computed in the same batch as in
        a one-process run with the same --batch-size, so the files are the same."""
        for start in range(rank * batch_size, self.total, world * batch_size):
            yield [self.job(j) for j in range(start, min(start + batch_size, self.total))]

    def count(self, batch_size: int, rank: int = 0, world: int = 1) -> int:
        """Images in this rank's batches (without listing them)."""
        full, rest = divmod(self.total, batch_size)
        mine = max(0, full - rank + world - 1) // world  # full batches b < full with b % world == rank
        return batch_size * mine + (rest if full % world == rank else 0)


def check_out_dir(out: Path, plan: Plan, overwrite: bool, sidecar: bool) -> None:
    """Create `out` and probe that it is writable; unless `overwrite`, refuse if any file of the plan
    exists. One pass over the folder's names: no list of the planned names is built."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".flashsd3-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"cannot write to --out {out}: {e.strerror or e}") from None
    if overwrite:
        return
    existing = []
    with os.scandir(out) as entries:
        for entry in entries:
            m = NAME.match(entry.name)
            if not m or int(m.group(1)) >= plan.total or (m.group(2) == "json" and not sidecar):
                continue
            if entry.name == str(Path(plan.job(int(m.group(1))).filename).with_suffix("." + m.group(2))):
                existing.append(entry.name)
    if existing:
        raise OutputError(f"{len(existing)} output file(s) already exist in {out}, e.g. {min(existing)}; "
                          f"pass --overwrite to replace them or choose another --out/--seed")


def umask() -> int:
    """The process umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """0o666 minus the process umask: the mode `open(path, "w")` would give a new file."""
    return 0o666 & ~umask()


def atomic_write(path: Path, write: Callable[[str], None], overwrite: bool = True, mode: int | None = None) -> None:
    """write(tmp) beside `path`, then rename it there: readers see the old file or the new one, never half.

    Without overwrite a hard link refuses a name taken since the caller's check (another process); plain
    check + rename where the file system has no hard links. The file gets `mode` (default: what `open` would
    give it under the umask), or the mode of the file it replaces (mkstemp itself creates 0o600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    taken = OutputError(f"{path} appeared while generating; not overwriting it (use --overwrite)")
    try:
        write(tmp)
        mode = new_file_mode() if mode is None else mode
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode) if overwrite else mode
        except FileNotFoundError:
            pass
        os.chmod(tmp, mode)
        if overwrite:
            return os.replace(tmp, path)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise taken from None
        except OSError:
            if path.exists():
                raise taken from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_json(path: Path, data) -> None:
    """`data` as indented JSON, written atomically (replacing the file)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def atomic_dir(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp_dir) beside `path`, then rename the folder there (replacing an older folder of that name).
    The folder and what `write` put in it get the modes `mkdir` and `open` would give them under the umask
    (mkdtemp creates 0o700; some writers, safetensors' among them, create 0o600 files)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        mask = umask()
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_image(image, out: Path, job: Job, meta: dict, *, overwrite: bool, sidecar: bool, mode: int) -> None:
    """`out/job.filename` with `meta` (+ prompt, index, seed) as PNG iTXt chunks, and optionally the same
    as a .json sidecar, written first so that a complete PNG always has its sidecar."""
    meta = image_metadata(job, meta)
    path = out / job.filename
    if sidecar:
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        atomic_write(path.with_suffix(".json"), lambda p: Path(p).write_text(text, encoding="utf-8"), overwrite, mode)
    info = png_info(meta)
    atomic_write(path, lambda p: image.save(p, format="PNG", pnginfo=info), overwrite, mode)


def image_metadata(job: Job, meta: dict) -> dict:
    """The text recorded with image `job`: prompt, index, seed, then the run's settings."""
    return {"prompt": job.prompt, "index": job.index, "seed": job.seed, **meta}


def png_info(meta: dict):
    """`meta` as PNG iTXt chunks (UTF-8 prompts); non-strings as JSON. flashsd3-serve encodes with it too."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in meta.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
    return info
