"""Test helpers: tiny random SD3 text encoders with offline tokenizers, saved in the layouts we load.

    tok, enc, tok2, enc2 = tiny_clip_pair(seed=0)          # transformers objects, TINY-sized by default
    tok3, enc3 = tiny_t5(seed=1, d_model=32)                # optional T5 (tokenizer_3, text_encoder_3)
    save_diffusers_text_folder(root, tok, enc, tok2, enc2)  # root/{tokenizer,text_encoder,...}/
    save_text_single_file(path, enc, enc2)                  # text_encoders.clip_l.transformer.* ...

The tiny CLIP tokenizer is real CLIP BPE machinery over a small vocabulary written here: the 256 byte
symbols (so "!" is id 0, the pad of tokenizer_2, as in the real vocab), the same with "</w>", a few
merges, then <|startoftext|> and <|endoftext|> as the two last ids (like 49406/49407); building it
takes milliseconds. For SD3's real tokenizers pass `tokenizers=flashsd3.tokenizers.sd3_clip_tokenizers()`.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from flashsd3.keymaps.text import CLIP_G_PREFIX, CLIP_L_PREFIX, T5_PREFIX

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
TINY_MERGES = [("c", "a"), ("ca", "t</w>"), ("o", "f</w>"), ("t", "h"), ("th", "e</w>"), ("p", "h"), ("ph", "o")]


def byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(rest))]


def _special(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def write_tiny_clip_tokenizer(folder: Path, *, pad: str = EOT) -> Path:
    """A CLIPTokenizer folder with SD3's tokenizer configs over the tiny vocabulary; pad EOT or "!"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in TINY_MERGES] + [SOT, EOT]
    ids = {tok: i for i, tok in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TINY_MERGES))
    added = {str(ids[SOT]): {**_special(SOT, True), "special": True},
             str(ids[EOT]): {**_special(EOT, False), "special": True}}
    if pad != EOT:  # tokenizer_2: "!" (id 0) is a special added token
        added = {str(ids[pad]): {**_special(pad, False), "special": True}, **added}
    config = {"add_prefix_space": False, "added_tokens_decoder": added, "bos_token": SOT,
              "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": EOT, "errors": "replace",
              "model_max_length": 77, "pad_token": pad, "tokenizer_class": "CLIPTokenizer", "unk_token": EOT}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": _special(SOT, True), "eos_token": _special(EOT, False),
               "pad_token": _special(pad, False), "unk_token": _special(EOT, False)}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def tiny_clip_tokenizers():
    """(tokenizer, tokenizer_2) over the tiny vocabulary, built offline through from_pretrained."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(Path(tmp) / "tokenizer")))
        tok2 = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(Path(tmp) / "tokenizer_2", pad="!")))
    return tok, tok2


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random (default inits leave biases 0 and norms 1, hiding mistakes); norm scales
    stay near 1 so activations keep a sane size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * std
            p.copy_((noise + 1 if "norm" in name and name.endswith("weight") else noise).to(p.dtype))
    return model


def tiny_clip_config(hidden: int, *, vocab_size: int, act: str, layers: int = 2, heads: int = 2,
                     projection_dim: int | None = None) -> CLIPTextConfig:
    # eos_token_id=2 as SD3's configs: transformers then finds EOS by argmax(ids) (EOT is the last id)
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          projection_dim=projection_dim or hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)


def tiny_clip_pair(seed: int = 0, *, hidden_l: int = 8, hidden_g: int = 16, layers: int = 2,
                   dtype: torch.dtype = torch.float32, identity_l_projection: bool = True, tokenizers=None):
    """(tokenizer, text_encoder, tokenizer_2, text_encoder_2), random, eval mode.

    Defaults fit flashsd3.TINY: pooled 8 + 16 = 24 = pooled_dim, context 24 zero-padded to 32.
    CLIP-L's projection is the identity, as in SD3 (pass identity_l_projection=False for a random one).
    `tokenizers`: a (tokenizer, tokenizer_2) pair to use instead of the tiny ones (sets the vocab size).
    """
    tok, tok2 = tokenizers or tiny_clip_tokenizers()
    enc = CLIPTextModelWithProjection(tiny_clip_config(hidden_l, vocab_size=len(tok), act="quick_gelu", layers=layers))
    enc2 = CLIPTextModelWithProjection(tiny_clip_config(hidden_g, vocab_size=len(tok2), act="gelu", layers=layers))
    randomize_(enc, seed)
    randomize_(enc2, seed + 1)
    if identity_l_projection:
        with torch.no_grad():
            enc.text_projection.weight.copy_(torch.eye(hidden_l))
    return tok, enc.to(dtype).eval(), tok2, enc2.to(dtype).eval()


def tiny_t5(seed: int = 0, *, d_model: int = 32, layers: int = 2, dtype: torch.dtype = torch.float32):
    """(tokenizer_3, text_encoder_3): a small unigram T5 tokenizer and a random gated-GELU T5 encoder."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = ["a", "photo", "of", "cat", "the", "dog", "red", "on", "mars"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=layers,
                   num_heads=d_model // 8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    enc = T5EncoderModel(cfg)
    randomize_(enc, seed, std=0.2)
    return tok, enc.to(dtype).eval()


def save_diffusers_text_folder(root: Path, tok, enc, tok2, enc2, tok3=None, enc3=None) -> Path:
    """Write the text parts of a diffusers SD3 folder with save_pretrained (safetensors)."""
    root = Path(root)
    parts = {"tokenizer": tok, "text_encoder": enc, "tokenizer_2": tok2, "text_encoder_2": enc2,
             "tokenizer_3": tok3, "text_encoder_3": enc3}
    for sub, obj in parts.items():
        if obj is not None:
            obj.save_pretrained(str(root / sub))
    return root


def text_single_file_state(enc, enc2, enc3=None, *, with_l_projection: bool = False,
                           t5_embedding_key: str = "encoder.embed_tokens.weight") -> dict:
    """Stability single-file text keys (the prefixes diffusers' single_file_utils.py strips). CLIP-L's
    projection is left out unless asked (diffusers replaces it by the identity anyway); T5's tied
    embedding is stored once under `t5_embedding_key` (Stability's reference: encoder.embed_tokens.weight;
    diffusers detection: shared.weight)."""
    sd = {CLIP_L_PREFIX + k: v for k, v in enc.state_dict().items()
          if with_l_projection or k != "text_projection.weight"}
    sd.update({CLIP_G_PREFIX + k: v for k, v in enc2.state_dict().items()})
    if enc3 is not None:
        t5 = {k: v for k, v in enc3.state_dict().items() if k not in ("shared.weight", "encoder.embed_tokens.weight")}
        t5[t5_embedding_key] = enc3.shared.weight
        sd.update({T5_PREFIX + k: v for k, v in t5.items()})
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def save_text_single_file(path: Path, enc, enc2, enc3=None, *, extra: dict | None = None, **kw) -> Path:
    save_file({**text_single_file_state(enc, enc2, enc3, **kw), **(extra or {})}, str(path))
    return Path(path)
