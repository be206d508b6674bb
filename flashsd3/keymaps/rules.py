"""The grammar of the key tables: a `Rule` builds one tensor of ours from source tensors by a `Transform`.

A table (see `keymaps/mmdit.py`, `keymaps/vae.py`, `keymaps/text.py`) is a tuple of rules: our key,
the source key(s) it is built from, and a transform; `{i}` stands for a block index. Each transform
is one object that knows both directions and what it does to output rows:
  apply(*sources) -> ours          the forward conversion (loading)
  shape(*shapes) -> shape | None   the same on shapes, so a mismatch shows before any data is read
  invert(ours, n) -> sources       ours -> the n source tensors (export, round trips)
  row_slices(rows, n)              which of our output rows each of the n sources fills
  to_our_rows(t)                   a source's output rows in our order (a LoRA B, which adapts them)
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


class Transform:
    """Copy: our tensor is the source tensor."""

    def apply(self, *ts: torch.Tensor) -> torch.Tensor:
        (t,) = ts
        return t

    def shape(self, *shapes: tuple[int, ...]) -> tuple[int, ...] | None:
        (s,) = shapes
        return tuple(s)

    def invert(self, t: torch.Tensor, n: int) -> list[torch.Tensor]:
        return [t]

    def row_slices(self, rows: int, n: int) -> list[slice]:
        return [slice(0, rows)]

    def to_our_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t


class FuseRows(Transform):
    """Parts stacked along the output rows: diffusers' separate to_q, to_k, to_v -> our fused qkv."""

    def apply(self, *ts):
        return torch.cat(ts, dim=0)

    def shape(self, *shapes):
        if any(tuple(s[1:]) != tuple(shapes[0][1:]) for s in shapes):
            return None  # parts that cannot be stacked
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def invert(self, t, n):
        return list(t.chunk(n, dim=0))

    def row_slices(self, rows, n):
        return [slice(k * rows // n, (k + 1) * rows // n) for k in range(n)]


class SwapHalves(Transform):
    """(scale, shift) rows <-> (shift, scale): diffusers' AdaLayerNormContinuous order vs the official one.
    Its own inverse; a LoRA B on such a layer has its rows swapped the same way."""

    def apply(self, *ts):
        (t,) = ts
        return self.to_our_rows(t)

    def shape(self, *shapes):
        (s,) = shapes
        return tuple(s) if s[0] % 2 == 0 else None

    def invert(self, t, n):
        return [self.to_our_rows(t)]

    def to_our_rows(self, t):
        first, second = t.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)


class Conv1x1ToLinear(Transform):
    """A 1x1 conv weight [o, i, 1, 1] -> a linear weight [o, i] (LDM VAE attention)."""

    def apply(self, *ts):
        (t,) = ts
        return t.reshape(t.shape[0], t.shape[1])

    def shape(self, *shapes):
        (s,) = shapes
        return tuple(s[:2]) if tuple(s[2:]) == (1, 1) else None

    def invert(self, t, n):
        return [t[:, :, None, None]]


as_is = Transform()
fuse_qkv = FuseRows()
swap_halves = SwapHalves()
conv1x1_to_linear = Conv1x1ToLinear()


@dataclass(frozen=True)
class Rule:
    """Our key <- transform(*source keys). `{i}` in both is the block (or other) index."""

    ours: str
    sources: tuple[str, ...]
    transform: Transform = as_is


@dataclass(frozen=True)
class Step:
    """One key of ours, resolved: the concrete source keys and the transform that joins them."""

    sources: tuple[str, ...]
    transform: Transform


@dataclass(frozen=True)
class Layout:
    """One way a file stores a model: the `name` of its key naming, the `prefix` before every key of the
    model, and `markers`, key starts (after the prefix) that only this layout has (`weights.detect_layout`)."""

    name: str
    prefix: str
    markers: tuple[str, ...]


def identity_table(keys: Iterable[str]) -> tuple[Rule, ...]:
    """Every key of ours stored under its own name (official MMDiT files, diffusers VAE files)."""
    return tuple(Rule(k, (k,)) for k in keys)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def plan_keys(our_keys: Iterable[str], table: Iterable[Rule]) -> dict[str, Step]:
    """For every key of ours, its Step. Raises if a key has no rule or two.

    A literal rule (no `{i}`) takes precedence over a templated one that matches the same key.
    """
    compiled = [(_pattern(r.ours), r) for r in table]
    plan, unmapped, ambiguous = {}, [], []
    for key in our_keys:
        hits = [(m, r) for p, r in compiled if (m := p.match(key))]
        if len(hits) > 1:  # a literal row (no `{i}`) overrides the templated rows it also matches
            hits = [(m, r) for m, r in hits if "{i}" not in r.ours]
        if len(hits) != 1:
            (ambiguous if hits else unmapped).append(key)
            continue
        m, rule = hits[0]
        idx = m.groupdict().get("i")
        sources = tuple(s.replace("{i}", idx) if idx is not None else s for s in rule.sources)
        plan[key] = Step(sources, rule.transform)
    if unmapped or ambiguous:
        raise ValueError(f"key table does not cover our model: no rule for {unmapped}, several rules for {ambiguous}")
    return plan


def export_state_dict(state: Mapping[str, torch.Tensor], table: Iterable[Rule], prefix: str = "") -> dict:
    """Our state dict in the table's source names (each transform inverted), `prefix` before every key.
    Tensors are copies: the result shares no memory with `state`."""
    out = {}
    for key, step in plan_keys(state.keys(), table).items():
        parts = step.transform.invert(state[key], len(step.sources))
        out.update({prefix + s: p.clone() for s, p in zip(step.sources, parts, strict=True)})
    return out
