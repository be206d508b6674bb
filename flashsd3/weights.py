"""Reading safetensors checkpoints and mapping their keys onto our modules, strictly.

A key table (see `flashsd3/keymaps/`, grammar in `keymaps/rules.py`) says for each key of ours
which source key(s) it is built from and by which transform. The loader:
  1. lists the checkpoint's keys and shapes without reading data (safetensors headers),
  2. finds for every parameter of the (meta-device) model exactly one rule and its sources,
  3. reports missing sources, unconsumed checkpoint keys and shape mismatches in ONE error,
  4. only then reads each tensor (memory-mapped), converts it to the asked dtype, transforms it,
     checks it holds no NaN/inf, and assigns it (`load_state_dict(strict=True, assign=True)`), so
     nothing is half-loaded.
A source is anything with the `Reader` methods: safetensors files (`SafetensorsReader`) or a state
dict in memory (`StateDictReader`), so in-memory conversion goes through the same checks.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from .keymaps.rules import Layout, Rule, plan_keys

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers ModelMixin (transformer/, vae/)
TRANSFORMERS_WEIGHTS = "model.safetensors"  # transformers PreTrainedModel (text_encoder*/)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: names the file and every key at fault."""


def brief(names: Iterable, limit: int = 8) -> str:
    """'a, b, c' for a few names; the first `limit` then '... and N more' for many."""
    names = [str(n) for n in names]
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`: one reduction pass, no temporary as large as `t` (aminmax propagates NaN,
    and inf shows as min or max). Measured on one shared CPU thread: 44 ms per 20M fp16 values, where
    isfinite(t).all() takes 890 ms."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# Reading --------------------------------------------------------------------------------------

class Reader(Protocol):
    """What the loader needs from a source: its keys and shapes (no data read), then tensors by key."""

    name: str  # for messages

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def source_of(self, key: str) -> str: ...  # the file (or object) holding `key`, for messages


class StateDictReader:
    """A state dict in memory as a Reader (e.g. a diffusers model's `state_dict()`). `get` returns
    copies, as reading a file would: a model loaded from it shares no memory with the dict."""

    def __init__(self, state: Mapping[str, torch.Tensor], name: str = "state dict"):
        self.state, self.name = state, name

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.state[key]
        return t.to(dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)

    def source_of(self, key: str) -> str:
        return self.name


class SafetensorsReader:
    """Reads tensors from one or more safetensors files (shards) by key, one tensor at a time.

    The safetensors library checks each file's header (offsets, sizes) and gives keys and shapes; `get` then
    reads one tensor's bytes with a plain file read into a fresh buffer. Not memory-mapped: pages read through
    a map stay in the process's resident memory until the file is closed, so converting a 2 B-parameter fp16
    file to bf16 through the map peaked at 8.0 GiB (file + model); read this way it peaks at the model plus
    one tensor (bench/RESULTS.md, loading)."""

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = [Path(p) for p in paths]
        self._where: dict[str, Path] = {}
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}  # dtype, shape, start, end
        self.metadata = {}
        for path in self.paths:
            refuse_pickle(path)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint file not found: {path}")
            try:
                with safe_open(str(path), framework="pt") as handle:  # validates the header and offsets
                    keys = list(handle.keys())
                    self.metadata.update(handle.metadata() or {})
                entries = _header_entries(path)
            except Exception as e:  # safetensors raises its own error type for bad headers/sizes
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
            for k in keys:
                if k in self._where:
                    raise CheckpointError(f"key {k!r} appears in both {self._where[k]} and {path}")
                self._where[k] = path
                self._entries[k] = entries[k]

    @property
    def name(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def source_of(self, key: str) -> str:
        return str(self._where[key])

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        stored, shape, start, end = self._entries[key]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        try:
            with open(self._where[key], "rb") as f:
                f.seek(start)
                if f.readinto(buffer.numpy()) != end - start:
                    raise OSError("the file ends early")
        except OSError as e:
            raise CheckpointError(f"{self._where[key]}: cannot read tensor {key!r} ({e})") from e
        t = buffer.view(stored).view(shape)  # safetensors stores little-endian, as x86 and ARM
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


# safetensors' dtype names (its format spec) -> torch
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _header_entries(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """key -> (dtype, shape, first byte, end byte) in the file: an 8-byte little-endian header length, the JSON
    header, then the data; a header's data_offsets count from the end of the header (safetensors format)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    base, out = 8 + size, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which flashsd3 does not read")
        first, end = info["data_offsets"]
        out[key] = (SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), base + first, base + end)
    return out


def refuse_pickle(path: Path) -> None:
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run arbitrary code when loaded "
            "and are refused; convert it to .safetensors first"
        )


def find_weights(folder: Path, weights_name: str) -> list[Path]:
    """The safetensors file(s) of a diffusers/transformers model folder: a shard index or one file."""
    index = folder / f"{weights_name}.index.json"
    if index.is_file():
        return sharded_files(index)
    if (folder / weights_name).is_file():
        return [folder / weights_name]
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no {weights_name} here, the folder is missing")
    raise CheckpointError(f"{folder}: no {weights_name} (or its .index.json) in this folder; {listing(folder)}")


def listing(folder: Path) -> str:
    """'found a, b, ... and N more', plus a hint when pickle files are among them."""
    found = sorted(p.name for p in folder.iterdir())
    pickles = [f for f in found if f.endswith(PICKLE_SUFFIXES)]
    hint = f"; pickle files ({brief(pickles, 3)}) are refused (convert them to safetensors)" if pickles else ""
    return f"found {brief(found) if found else 'nothing'}{hint}"


def open_checkpoint(source: str | Path, *, weights_name: str, subfolder: str, what: str
                    ) -> tuple[SafetensorsReader, Path | None]:
    """(reader, config.json path or None) for a safetensors file, a shard index, a model folder, or a
    diffusers pipeline root holding `subfolder`."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    if path.is_file():
        refuse_pickle(path)
        if path.name.endswith(".index.json"):
            return SafetensorsReader(sharded_files(path)), _existing(path.parent / "config.json")
        return SafetensorsReader([path]), None
    if (path / subfolder).is_dir() and not (path / "config.json").exists():
        path = path / subfolder  # a diffusers pipeline root
    return SafetensorsReader(find_weights(path, weights_name)), _existing(path / "config.json")


def read_config(path: Path | None, parse: Callable[[dict], object], what: str):
    """parse(json of `path`), or None without a config; a config that does not parse names the file."""
    if path is None:
        return None
    try:
        return parse(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable {what} config ({e!r})") from e


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def sharded_files(index_json: Path) -> list[Path]:
    """The shard files listed by a `*.safetensors.index.json`."""
    try:
        weight_map = json.loads(index_json.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_json}: not a safetensors index file ({e})") from e
    return [index_json.parent / f for f in sorted(set(weight_map.values()))]


# Loading --------------------------------------------------------------------------------------

def detect_layout(reader: Reader, layouts: Iterable[Layout], what: str) -> Layout:
    """The first of `layouts` (a keymap's LAYOUTS) with a key starting with prefix + a marker."""
    keys = reader.keys()
    for layout in layouts:
        if any(k.startswith(tuple(layout.prefix + m for m in layout.markers)) for k in keys):
            return layout
    looked = ", ".join(f"'{layout.prefix}{m}*'" for layout in layouts for m in layout.markers)
    raise CheckpointError(f"{reader.name}: no {what} keys found (looked for {looked}); "
                          f"first keys: {sorted(keys)[:5]}")


def load_into(
    model: torch.nn.Module,
    reader: Reader,
    table: Iterable[Rule],
    *,
    prefix: str = "",
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Fill a meta-device `model` from `reader` through `table`, strictly (see module docstring).

    `prefix` is prepended to every source key; checkpoint keys outside `prefix` are not ours and
    not checked (a single file holds several models). `ignore`: regexes of keys under `prefix`
    known to carry nothing we need.
    """
    expected = model.state_dict()
    plan = plan_keys(expected.keys(), table)
    _check_keys(model, reader, plan, expected, prefix, [re.compile(p) for p in ignore])
    state, bad = {}, []
    for key, step in plan.items():
        want = dtype if expected[key].is_floating_point() else None
        t = step.transform.apply(*(reader.get(prefix + s, want) for s in step.sources))
        state[key] = t = t.to(device=device) if device is not None else t
        if t.is_floating_point() and not all_finite(t):  # one pass per tensor, on its device
            bad.append(" + ".join(f"{reader.source_of(prefix + s)}: {prefix + s}" for s in step.sources))
    if bad:
        raise CheckpointError(f"{reader.name}: {len(bad)} tensors hold NaN or inf values, so every image would "
                              f"be NaN (a damaged or badly converted file): {brief(bad, 5)}")
    model.load_state_dict(state, strict=True, assign=True)


def _check_keys(model, reader: Reader, plan: dict, expected: dict, prefix: str, ignore: list[re.Pattern]) -> None:
    """Missing sources, unconsumed keys and shape mismatches, all in one CheckpointError."""
    available = {k for k in reader.keys() if k.startswith(prefix)}
    missing, mismatched, consumed = {}, [], set()
    for key, step in plan.items():
        full = [prefix + s for s in step.sources]
        consumed.update(full)  # a fused part that is present is not "unexpected" when a sibling is missing
        absent = [s for s in full if s not in available]
        missing.update(dict.fromkeys(absent))
        if absent:
            continue
        shape = step.transform.shape(*(reader.shape(s) for s in full))
        if shape != tuple(expected[key].shape):
            got = " + ".join(f"{s} {list(reader.shape(s))}" for s in full)
            mismatched.append(f"{key}: expected {list(expected[key].shape)}, checkpoint has {got}")
    unexpected = sorted(k for k in available - consumed if not any(r.search(k[len(prefix):]) for r in ignore))
    if missing or unexpected or mismatched:
        parts = [f"{reader.name}: cannot load {type(model).__name__}"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): " + brief(missing, 20))
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): " + brief(unexpected, 20))
        if mismatched:
            more = f"\n    ... and {len(mismatched) - 20} more" if len(mismatched) > 20 else ""
            parts.append(f"  shape mismatches ({len(mismatched)}):\n    " + "\n    ".join(mismatched[:20]) + more)
        raise CheckpointError("\n".join(parts))
