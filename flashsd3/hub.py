"""Finding weights: local paths as given, hub repo ids through huggingface_hub (cache, offline mode, token)."""
from __future__ import annotations

from pathlib import Path

SD3_MEDIUM_REPO = "stabilityai/stable-diffusion-3-medium-diffusers"
FLASH_SD3_LORA_REPO = "jasperai/flash-sd3"

# What a text-to-image run needs from the SD3 diffusers repo (safetensors and configs only).
PIPELINE_PATTERNS = [
    "model_index.json", "transformer/*.json", "transformer/*.safetensors", "vae/*.json", "vae/*.safetensors",
    "text_encoder/*.json", "text_encoder/*.safetensors", "text_encoder_2/*.json", "text_encoder_2/*.safetensors",
    "tokenizer/*", "tokenizer_2/*",
]
T5_PATTERNS = ["text_encoder_3/*.json", "text_encoder_3/*.safetensors", "tokenizer_3/*"]


class WeightsUnavailable(RuntimeError):
    """Weights could not be found locally nor fetched; the message says what to do."""


def looks_like_repo_id(source: str) -> bool:
    return not Path(source).exists() and source.count("/") == 1 and not source.startswith((".", "/", "~"))


def resolve(source: str | Path, *, patterns: list[str] | None = None, what: str = "model") -> Path:
    """A local path (checked to exist) or a downloaded snapshot folder of a hub repo id."""
    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(source):
        raise WeightsUnavailable(f"{what} not found: {source} is neither an existing path nor a hub repo id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as e:  # offline, gated, unknown repo, no token: one message for all
        gated = " SD3-medium is gated: accept its license on the hub page, then `hf auth login`." \
            if "stabilityai" in source else ""
        raise WeightsUnavailable(
            f"could not get the {what} '{source}' from the Hugging Face hub ({type(e).__name__}: {_first_line(e)})."
            f"{gated} Or download the files yourself and pass a local path (a diffusers folder or a "
            f"single .safetensors file)."
        ) from e


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0].rstrip(".") if lines else "no details"
