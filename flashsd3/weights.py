"""Reading safetensors checkpoints and mapping their keys onto our modules, strictly.

A key table (see `flashsd3/keymaps/`) is a tuple of `Rule`s: our key, the source key(s) it is built
from, and the name of a transform. `{i}` stands for a block index. The loader:
  1. lists the checkpoint's keys and shapes without reading data (safetensors headers),
  2. finds for every parameter of the (meta-device) model exactly one rule and its sources,
  3. reports missing sources, unconsumed checkpoint keys and shape mismatches in ONE error,
  4. only then reads each tensor (memory-mapped), converts it to the asked dtype, transforms it,
     and assigns it (`load_state_dict(strict=True, assign=True)`), so nothing is half-loaded.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: names the file and every key at fault."""


# Transforms: named, small, shape-aware. Each takes the source tensors (in rule order) and
# returns one tensor; `shape` does the same on shapes so problems show before data is read.
@dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[..., torch.Tensor]
    shape: Callable[..., tuple]


def _cat0_shape(*shapes):
    if any(s[1:] != shapes[0][1:] for s in shapes):
        return None  # incompatible parts
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


TRANSFORMS: dict[str | None, Transform] = {
    None: Transform("copy", lambda t: t, lambda s: tuple(s)),
    # q, k, v (or any parts) stacked along the output dimension
    "cat0": Transform("cat0", lambda *ts: torch.cat(ts, dim=0), _cat0_shape),
    # (scale, shift) <-> (shift, scale): diffusers' AdaLayerNormContinuous order vs the official one
    "swap_halves": Transform("swap_halves", _swap_halves, lambda s: tuple(s) if s[0] % 2 == 0 else None),
    # 1x1 conv [o, i, 1, 1] -> linear [o, i] (LDM VAE attention)
    "conv1x1_to_linear": Transform(
        "conv1x1_to_linear", lambda t: t.reshape(t.shape[0], t.shape[1]), lambda s: tuple(s[:2]) if tuple(s[2:]) == (1, 1) else None
    ),
}


@dataclass(frozen=True)
class Rule:
    """Our key <- transform(*source keys). `{i}` in both is the block (or other) index."""

    ours: str
    sources: tuple[str, ...]
    transform: str | None = None

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} in rule for {self.ours}")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def resolve(our_keys: Iterable[str], table: Iterable[Rule]) -> dict[str, tuple[tuple[str, ...], str | None]]:
    """For every key of ours: (source keys, transform name). Raises if a key has no rule or two.

    A literal rule (no `{i}`) takes precedence over a templated one that matches the same key.
    """
    compiled = [(_pattern(r.ours), r) for r in table]
    plan, unmapped, ambiguous = {}, [], []
    for key in our_keys:
        hits = [(m, r) for p, r in compiled if (m := p.match(key))]
        if not hits:
            unmapped.append(key)
            continue
        if len(hits) > 1:  # a literal row (no `{i}`) overrides the templated rows it also matches
            hits = [(m, r) for m, r in hits if "{i}" not in r.ours]
        if len(hits) != 1:
            ambiguous.append(key)
            continue
        m, rule = hits[0]
        idx = m.groupdict().get("i")
        plan[key] = (tuple(s.replace("{i}", idx) if idx is not None else s for s in rule.sources), rule.transform)
    if unmapped or ambiguous:
        raise ValueError(f"key table does not cover our model: no rule for {unmapped}, several rules for {ambiguous}")
    return plan


# Reading --------------------------------------------------------------------------------------

class SafetensorsReader:
    """Lazily reads tensors from one or more safetensors files (shards) by key, memory-mapped."""

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = [Path(p) for p in paths]
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._handles = {}
        for path in self.paths:
            refuse_pickle(path)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint file not found: {path}")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
                shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
            except Exception as e:  # safetensors raises its own error type for bad headers/sizes
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
            for k in keys:
                if k in self._where:
                    raise CheckpointError(f"key {k!r} appears in both {self._where[k]} and {path}")
                self._where[k] = path
            self._shapes.update(shapes)
            self._handles[path] = handle
        self.metadata = {}
        for h in self._handles.values():
            self.metadata.update(h.metadata() or {})

    @property
    def name(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        try:
            t = self._handles[self._where[key]].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self._where[key]}: cannot read tensor {key!r} ({e})") from e
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


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
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "folder missing"
    pickles = [f for f in found if f.endswith(PICKLE_SUFFIXES)] if isinstance(found, list) else []
    hint = f"; pickle files {pickles} are refused (convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder}: no {weights_name} (or its .index.json) in this folder; found {found}{hint}")


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

def load_into(
    model: torch.nn.Module,
    reader: SafetensorsReader,
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
    plan = resolve(expected.keys(), table)
    ignore_re = [re.compile(p) for p in ignore]
    available = {k for k in reader.keys() if k.startswith(prefix)}
    missing, mismatched, consumed = [], [], set()
    for key, (sources, tname) in plan.items():
        full = [prefix + s for s in sources]
        absent = [s for s in full if s not in available]
        if absent:
            missing.extend(absent)
            continue
        consumed.update(full)
        shape = TRANSFORMS[tname].shape(*(reader.shape(s) for s in full))
        if shape != tuple(expected[key].shape):
            got = " + ".join(f"{s} {list(reader.shape(s))}" for s in full)
            mismatched.append(f"{key}: expected {list(expected[key].shape)}, checkpoint has {got}")
    unexpected = sorted(k for k in available - consumed if not any(r.search(k[len(prefix):]) for r in ignore_re))
    if missing or unexpected or mismatched:
        parts = [f"{reader.name}: cannot load {type(model).__name__}"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}):\n    " + "\n    ".join(mismatched))
        raise CheckpointError("\n".join(parts))

    state = {}
    for key, (sources, tname) in plan.items():
        ref = expected[key]
        want = dtype if ref.is_floating_point() else None
        tensors = [reader.get(prefix + s, want) for s in sources]
        t = TRANSFORMS[tname].apply(*tensors)
        state[key] = t.to(device=device) if device is not None else t
    model.load_state_dict(state, strict=True, assign=True)

