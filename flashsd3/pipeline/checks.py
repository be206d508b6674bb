"""Checks of the pipeline's Python-only arguments (each a ValueError naming the argument) and the
FloatingPointError for non-finite results, which says what is known instead of guessing. The rules the
CLI shares (size, seed range, steps, strength, edit size, skip-layer guidance) are in `flashsd3.rules`."""
from __future__ import annotations

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


def check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")


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
