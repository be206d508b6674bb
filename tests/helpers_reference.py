"""Test helpers over the published key lists in tests/fixtures/ (see its README): read them, and read
"from" them as if they were checkpoints (shapes only; each tensor a constant, its row number)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


def read_tsv(name: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{key: shape} of tests/fixtures/<name> (rows `key<TAB>shape as JSON[<TAB>note]`), keys under `prefix`."""
    rows = (line.split("\t") for line in (FIXTURES / name).read_text().splitlines())
    return {r[0]: tuple(json.loads(r[1])) for r in rows if r[0].startswith(prefix)}


def read_json(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


class KeyListReader:
    """A weights.Reader over a key list: tensor k is the constant k's index (an expanded scalar, no
    memory), so where each tensor ends up can be checked."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], name: str = "key list"):
        self.shapes, self.name = shapes, name
        self.index = {k: i for i, k in enumerate(shapes)}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.tensor(float(self.index[key]), dtype=dtype or torch.float32).expand(self.shapes[key])

    def source_of(self, key: str) -> str:
        return self.name
