"""The dtype a sampling run computes in: `dtype="auto"` and the names the command line takes.

auto = float16 on CUDA (as before: SD3-medium's published weights are fp16); bfloat16 on a CPU whose matrix
units multiply bf16 natively (AMX-BF16 or AVX512-BF16, as torch's own CPU feature probes report them:
`torch.cpu._is_amx_tile_supported`, `torch.cpu._is_avx512_bf16_supported`); float32 on every other device.
On such a CPU a bf16 matmul runs ~4.5x the float32 rate (bench/RESULTS.md), and SD3's activations keep
bf16's range. The VAE decodes in the same dtype: bf16 vs float32 decode of the same latents differs by
about one uint8 level on average (PSNR ~46 dB, bench/RESULTS.md), ~6x faster on that CPU.

`auto` is for sampling (flashsd3-sample, FlashSD3Pipeline.from_pretrained, loaders given "auto"); training
and the parity tests always name their dtype.
"""
from __future__ import annotations

import torch

AUTO = "auto"
NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# torch.cpu probes (cpuinfo) for native bf16 matrix arithmetic, the first that answers True names it
_BF16_PROBES = (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))


def cpu_bf16_units() -> str | None:
    """'AMX-BF16' or 'AVX512-BF16' when this CPU has native bf16 matrix units, else None (a CPU without them,
    or a torch without the probes: then bf16 matmuls are emulated and slower than float32)."""
    for name, probe in _BF16_PROBES:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return name
    return None


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype | None:
    """A torch dtype from a dtype, a name ("fp16", "bf16", "fp32", "float16", ...) or "auto" (see the module
    docstring; `device` decides it, default CPU). None stays None (a loader then keeps the file's dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == AUTO:
        return auto_dtype(device)
    named = (NAMES.get(dtype) or getattr(torch, dtype, None)) if isinstance(dtype, str) else None
    if not isinstance(named, torch.dtype) or not named.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: expected 'auto', one of {', '.join(NAMES)}, or a torch floating dtype")
    return named


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    kind = torch.device(device if device is not None else "cpu").type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_bf16_units() is not None:
        return torch.bfloat16
    return torch.float32


def short_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the command line's names)."""
    return next((k for k, v in NAMES.items() if v == dtype), str(dtype).removeprefix("torch."))


def describe_auto(device: str | torch.device | None = None) -> str:
    """Why auto picks what it picks here, for the one line the CLI prints: 'bf16 (auto: AVX512-BF16 ...)'."""
    kind = torch.device(device if device is not None else "cpu").type
    dtype = auto_dtype(device)
    if kind == "cuda":
        why = "CUDA"
    elif dtype == torch.bfloat16:
        why = f"this CPU has {cpu_bf16_units()} matrix units; --dtype fp32 forces float32"
    elif kind == "cpu":
        why = "no native bf16 matrix units (AMX-BF16 / AVX512-BF16) on this CPU"
    else:
        why = f"{kind}"
    return f"{short_name(dtype)} (auto: {why})"
