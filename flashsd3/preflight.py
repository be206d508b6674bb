"""What flashsd3-sample checks before it loads a model or creates a folder, from headers only.

A local model's transformer config comes from its config.json or, for a single file, from tensor shapes
in the safetensors header (`flashsd3.mmdit.loading.transformer_config`, as the loader reads it); with it the image
size is checked against the position table, and every local LoRA is planned onto the model built on
the meta device (`flashsd3.lora.formats.plan_lora`: keys, layout, ranks, shapes; no tensor is read).
The rules on the values of flags (size, seed range, steps, strength, skip-layer guidance) are the pipeline's
own, in `flashsd3.rules`, called with the flags' names.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .config import DEMO, SD3_MEDIUM, MMDiTConfig
from .hub import SD3_MEDIUM_REPO
from .rules import InputError


class PreflightError(InputError):
    """An input that cannot work, found before any heavy work; the message names the flag at fault."""


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
