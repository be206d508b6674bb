"""Checks of the pipeline's arguments from Python (each a ValueError naming the argument) and the
FloatingPointError for non-finite results, which says what is known instead of guessing."""
from __future__ import annotations

import math
import numbers

import torch

OUTPUT_TYPES = ("pil", "pt", "latent")


def check_prompts(prompt, what: str = "prompt") -> list[str] | None:
    """A prompt or a non-empty list of prompts -> list; None stays None."""
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {_show(prompt)}")
    return list(prompts)


def check_count(n, what: str = "num_images_per_prompt") -> int:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {_show(n)}")
    return int(n)


def check_number(v, what: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite real number within [low, high] ((low, high] if low_open)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {_show(v)}")
    if low is not None and (v < low or (low_open and v == low)) or high is not None and v > high:
        lo = "(" if low_open else "["
        raise ValueError(f"{what} must be in {lo}{low}, {high}], got {v!r}")
    return float(v)


def check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")


def check_skip_layers(layers: tuple[int, ...], depth: int) -> None:
    bad = [i for i in layers if i >= depth]
    if bad:
        raise ValueError(f"skip_guidance_layers {bad} beyond the model's {depth} joint blocks (0..{depth - 1})")


def check_finite(t: torch.Tensor, what: str, context: str = "") -> None:
    """FloatingPointError if t holds NaN/inf; `context` says what is known (dtype, adapters)."""
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"NaN or inf in the {what} ({t.dtype}{', ' + context if context else ''}). "
                                 f"{precision_hint(t.dtype)}")


def precision_hint(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "float16 can overflow in SD3's activations: try dtype bfloat16 or float32."
    if dtype == torch.bfloat16:
        return "bfloat16 does not overflow where float16 does; if float32 runs clean, precision is the cause."
    return (f"{dtype} does not overflow here, so the weights, an adapter or the inputs (latents, embeddings) "
            "likely hold NaN/inf.")


def _show(v) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) < 60 else text[:57] + '...'}"
