"""Keyed random generators: every random draw of training, the cache, the sample grids and the toy comes from a
CPU `torch.Generator` seeded from (a user's seed, a key naming the draw), never from the global RNG.

A draw then depends on its key alone, not on what was drawn before it: the same on every rank, for any number
of ranks, after a resume, and on any device (draws are made on the CPU and moved, as flux `get_noise`). Any
seed flashsd3-sample takes (0 .. 2**64 - 1) works here; keys are small ints named at each site.

    generator(seed, step, G_PASS, BATCH)       one stream for a batch-level draw
    sample_generators(seed, step, G_PASS, ids) one stream per global sample id (shard-invariant draws)
    offset_generator(seed, k)                  seed + k, as "image k uses seed + k" (flashsd3-sample)
    step_generator(seed, step, stream)         the training loop's per-step streams
    seeded(seed)                               a module constructor's draws (nn.Linear takes no generator)
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .rules import SEED_LIMIT  # torch.Generator.manual_seed takes 0 .. 2**64 - 1

_MASK = SEED_LIMIT - 1


def mix(*key: int) -> int:
    """A 63-bit hash of integers (any size or sign, each taken mod 2**64): FNV-style multiply and xor-shift
    per element, so keys differing in any element give unrelated seeds."""
    h = 0x2545F4914F6CDD1D
    for x in key:
        h = (h ^ (int(x) & _MASK)) * 0x100000001B3 % SEED_LIMIT
        h ^= h >> 29
    return h % (1 << 63)


def generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator for draw `key` of a run seeded `seed`."""
    return torch.Generator().manual_seed(mix(seed, *key))


def sample_generators(seed: int, *key: int, ids: Sequence[int]) -> list[torch.Generator]:
    """One generator per global sample id: sample i's draws do not depend on which rank or batch holds it."""
    return [generator(seed, *key, i) for i in ids]


def offset_generator(seed: int, offset: int = 0) -> torch.Generator:
    """A CPU generator seeded seed + offset (mod 2**64): the "image k uses seed + k" convention."""
    return torch.Generator().manual_seed((seed + offset) & _MASK)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The training loop's stream `stream` at `step`: seeded ((seed * 1_000_003 + stream) << 32) + step where
    that fits in 64 bits (every seed up to 4294, the layout of runs made before this module, kept so they
    resume and reproduce), else generator(seed, stream, step)."""
    head = seed * 1_000_003 + stream
    if 0 <= head < 2**32 and 0 <= step < 2**32:
        return torch.Generator().manual_seed((head << 32) + step)
    return generator(seed, stream, step)


def randn(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """(len(generators), *shape) float32 N(0, 1) on the CPU, row i from generators[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run module constructors from `seed` (their initialisers draw from the global CPU generator and take
    no other) and give the caller's global generator state back afterwards: nothing outside sees the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed & _MASK)
        yield
