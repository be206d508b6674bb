"""The two CLIP tokenizers of SD3, built offline from the CLIP BPE merges shipped with the package.

CLIP-L and OpenCLIP-bigG share one BPE vocabulary (OpenAI's `bpe_simple_vocab_16e6`, also shipped
by open_clip); the vocabulary is a pure function of the merge list, so only the gzipped merges are
shipped (assets/clip_bpe_merges.txt.gz, 208 kB), with the two published tokenizer configs. The
`tokenizer/` and `tokenizer_2/` folders of stabilityai/stable-diffusion-3-medium-diffusers differ only
in the pad token: "<|endoftext|>" (49407) vs "!" (0) (their special_tokens_map.json, copied in assets/).
"""
from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

ASSETS = Path(__file__).parent / "assets"
MERGES = ASSETS / "clip_bpe_merges.txt.gz"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable character table, in vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(others))]  # open_clip's order


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab 49408 entries, merges 48894 lines) as in the tokenizer/ folders of SD3."""
    lines = gzip.decompress(MERGES.read_bytes()).decode("utf-8").splitlines()
    merges = [m for m in lines[1:] if m]  # first line is "#version: 0.2"
    base = _bytes_to_unicode()
    tokens = base + [c + "</w>" for c in base] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_folders(root: str | Path) -> Path:
    """Write SD3's `tokenizer/` and `tokenizer_2/` (vocab, merges and the published configs) under
    `root`, so `CLIPTokenizer.from_pretrained(root, subfolder=...)` works with no hub."""
    vocab, merges = clip_vocab_and_merges()
    root = Path(root)
    for sub in ("tokenizer", "tokenizer_2"):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # pad tokens differ
            (folder / name).write_text((ASSETS / sub / name).read_text())
    return root


def sd3_clip_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(tokenizer, tokenizer_2) of SD3: same vocabulary, pads "<|endoftext|>" (49407) and "!" (0)."""
    with tempfile.TemporaryDirectory() as d:
        write_clip_tokenizer_folders(d)
        return (CLIPTokenizer.from_pretrained(d, subfolder="tokenizer"),
                CLIPTokenizer.from_pretrained(d, subfolder="tokenizer_2"))
