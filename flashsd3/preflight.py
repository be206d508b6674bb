"""What flashsd3-sample checks before it loads a model or creates a folder, from headers only.

A local model's transformer config comes from its config.json or, for a single file, from tensor shapes
in the safetensors header (`flashsd3.mmdit.loading.transformer_config`, as the loader reads it); with it the image
size is checked against the position table, and every local LoRA is planned onto the model built on
the meta device (`flashsd3.lora.formats.plan_lora`: keys, layout, ranks, shapes; no tensor is read).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .config import DEMO, SD3_MEDIUM, MMDiTConfig
from .hub import SD3_MEDIUM_REPO

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
VAE_DOWNSCALE = 8  # SD3's VAE and the demo's: 4 levels of block_out_channels (vae/config.json)


class PreflightError(ValueError):
    """An input that cannot work, found before any heavy work; the message names the flag at fault."""


def check_seed(seed: int, total: int) -> None:
    """Image k of `total` uses seed + k; every one must be a seed torch.Generator takes."""
    if seed < 0 or seed + total > SEED_LIMIT:
        raise PreflightError(f"--seed {seed}: image k uses seed + k, and image {total - 1} would need "
                             f"{seed + total - 1}, outside 0 .. 2**64 - 1 (the seeds a torch generator takes)")


def model_config(model: str, demo: bool) -> MMDiTConfig | None:
    """The demo preset, a local model's transformer config from config.json / the safetensors header, or
    SD3-medium's for its hub repo (the published config); None for other hub ids (known once downloaded)."""
    if demo:
        return DEMO
    if not Path(model).exists():
        return SD3_MEDIUM if model == SD3_MEDIUM_REPO else None
    from .mmdit.loading import transformer_config
    from .weights import CheckpointError

    try:
        with warnings.catch_warnings():  # a config matching no preset: the loader warns about it later
            warnings.simplefilter("ignore")
            return transformer_config(model)
    except (CheckpointError, OSError) as e:
        raise PreflightError(_naming(e, "--model", model)) from None


def check_size(config: MMDiTConfig, height: int, width: int) -> None:
    """The image must fit the position table: pos_embed_max_size tokens of (patch x VAE) pixels a side."""
    factor, table = VAE_DOWNSCALE * config.patch_size, config.pos_embed_max_size
    for name, value in (("height", height), ("width", width)):
        if value % factor:
            raise PreflightError(f"--{name} {value}: must be a multiple of {factor} for this model")
        if value // factor > table:
            raise PreflightError(f"--{name} {value} exceeds the position table of this model: "
                                 f"at most {table * factor}")


def check_loras(config: MMDiTConfig | None, sources: list[str]) -> None:
    """Plan every local adapter onto the model on the meta device; hub ids are checked when loaded."""
    local = [source for source in sources if Path(source).exists()]
    if config is None or not local:
        return
    import torch

    from .lora.formats import open_lora, plan_lora
    from .mmdit import MMDiT
    from .weights import CheckpointError

    with torch.device("meta"):
        model = MMDiT(config)
    for source in local:
        try:
            plan_lora(model, open_lora(source))
        except (CheckpointError, OSError) as e:
            raise PreflightError(_naming(e, "--lora", source)) from None


def _naming(error: Exception, flag: str, value: str) -> str:
    """The library's message, which names the file at fault; with the flag in front if it does not."""
    return str(error) if value in str(error) else f"{flag} {value}: {error}"
