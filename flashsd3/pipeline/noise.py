"""The one source of randomness of a pipeline run: every draw (initial noise, the VAE posterior sample of an
edited image, the sampler's re-noise) comes from it, in that order, as float32 on the CPU (flux
`get_noise`), so a seed gives the same image on any device."""
from __future__ import annotations

import numbers

import torch

from ..rules import check_seed as check_seed_range

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64)


class PerImageNoise:
    """One CPU generator per image (seeded with that image's seed): every draw of image k comes from its
    own stream, so image k can be regenerated alone (`seed + k`, see `image_seeds`)."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw(self, shape) -> torch.Tensor:
        """(B, ...) float32 on the CPU, image k's slice from generator k."""
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.generators])


class SharedNoise:
    """One generator for the whole batch (the global CPU RNG if None): draws (B, ...) at once, as
    diffusers' `randn_tensor` with one generator. The generator may live on another device."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def draw(self, shape) -> torch.Tensor:
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.randn(tuple(shape), generator=self.generator, device=device, dtype=torch.float32)


def image_seeds(seed: int, count: int) -> list[int]:
    """Image k of a run with `seed` uses seed + k, so any image can be regenerated alone."""
    return [seed + k for k in range(count)]


def check_seed(seed, count: int) -> list[int] | None:
    """Per-image seeds from `seed` (int: seed + k; a sequence: one per image), checked; None stays None."""
    if seed is None:
        return None
    if _is_int(seed):
        check_seed_range(seed, count, "seed")
        return image_seeds(int(seed), count)
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__len__"):
        raise ValueError(f"seed must be an int or a list of ints, got {type(seed).__name__} {seed!r}")
    seeds = list(seed)
    bad = [s for s in seeds if not _is_int(s) or not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"seed list entries must be ints in [0, 2**64), got {bad[0]!r}")
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} images")
    return [int(s) for s in seeds]


def random_source(seeds: list[int] | None, generator: torch.Generator | None) -> PerImageNoise | SharedNoise:
    if seeds is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return PerImageNoise(seeds) if seeds is not None else SharedNoise(generator)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
