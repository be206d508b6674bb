"""Text conditioning for SD3: CLIP-L + OpenCLIP-bigG (+ optional T5-XXL) -> (context tokens, pooled vector).

SD3 paper (Esser et al. 2024) §5.2 "Text encoders"; Stability-AI/sd3.5 `sd3_infer.py` (`SD3Inferencer.get_cond`);
diffusers `StableDiffusion3Pipeline.encode_prompt` with `_get_clip_prompt_embeds` / `_get_t5_prompt_embeds`.

    L, G    = CLIP-L, CLIP-bigG on the prompt padded/truncated to 77 tokens
    clip    = cat_features(L.hidden_states[-2], G.hidden_states[-2])      # (B, 77, 768 + 1280)
    context = cat_tokens(zero_pad_features(clip, 4096), T5 or zeros)     # (B, 77 + 77, 4096)
    pooled  = cat_features(L.text_embeds, G.text_embeds)                  # (B, 2048)

`hidden_states[-2]` is the penultimate layer's output without the final LayerNorm; `text_embeds` is the
EOS token after the final LayerNorm, through the projection (CLIP-L's is the identity in SD3).
Flash SD3 runs without T5: its 77 tokens are zeros, which still matter (the context embedder has a bias
and they join the attention), so the count is the initml fork's 77, not later diffusers' 256.

The encoders are transformers models; we only load them strictly (flashsd3.weights) and call them.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .keymaps.rules import Rule
from .keymaps.text import (
    CLIP_G_PREFIX,
    CLIP_IGNORE,
    CLIP_L_PREFIX,
    CLIP_L_SINGLE_FILE_IGNORE,
    CLIP_TABLE,
    T5_EMBEDDING_KEYS,
    T5_PREFIX,
    T5_TABLE,
)
from .tokenizers import sd3_clip_tokenizers
from .weights import TRANSFORMERS_WEIGHTS, CheckpointError, SafetensorsReader, find_weights, load_into

CLIP_TOKENS = 77  # both CLIPs: max_position_embeddings (text_encoder*/config.json), tokenizer model_max_length
# initml/diffusers fork (the Flash SD3 model card's): _get_t5_prompt_embeds pads to tokenizer_max_length = 77;
# diffusers 0.42 pads to max_sequence_length, default 256 (pipeline_stable_diffusion_3.py)
T5_TOKENS = 77
CONTEXT_DIM = 4096  # transformer joint_attention_dim = T5-XXL d_model
# Architecture configs for single files, which carry none. clip_l/clip_g: copies of SD3-medium's
# text_encoder{,_2}/config.json. t5xxl: google/t5-v1_1-xxl hyperparameters as a T5EncoderModel config.
CONFIG_DIR = Path(__file__).parent / "configs"


class TextEncoders(nn.Module):
    """The SD3 text encoders with their tokenizers; `encode(prompts)` -> (context, pooled)."""

    def __init__(self, tokenizer_l, clip_l, tokenizer_g, clip_g, tokenizer_t5=None, t5=None, *,
                 context_dim: int = CONTEXT_DIM):
        super().__init__()
        if (t5 is None) != (tokenizer_t5 is None):
            raise ValueError("T5 needs both its tokenizer and its encoder (or neither)")
        if t5 is not None and t5.config.d_model != context_dim:
            raise ValueError(f"T5 d_model {t5.config.d_model} != context_dim {context_dim}")
        clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
        if clip_width > context_dim:
            raise ValueError(f"CLIP-L + CLIP-G width {clip_width} exceeds context_dim {context_dim}")
        self.tokenizer_l, self.tokenizer_g, self.tokenizer_t5 = tokenizer_l, tokenizer_g, tokenizer_t5
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.context_dim = context_dim
        self.requires_grad_(False).eval()  # frozen in SD3; T5 has dropout 0.1 in train mode

    @property
    def dtype(self) -> torch.dtype:  # everything we return is in CLIP-L's dtype, as diffusers' zeros
        return self.clip_l.dtype

    @property
    def device(self) -> torch.device:
        return self.clip_l.device

    @torch.no_grad()
    def encode(self, prompts: str | list[str], *, t5_tokens: int = T5_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> context (B, 77 + t5_tokens, context_dim), pooled (B, L + G projection dims).

        Prompts longer than 77 CLIP tokens (or t5_tokens T5 tokens) are truncated, as in diffusers,
        with a warning for CLIP's limit.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        warn_truncated(self.tokenizer_l, prompts)
        l_tokens, l_pooled = clip_features(self.tokenizer_l, self.clip_l, prompts)  # (B, 77, 768), (B, 768)
        g_tokens, g_pooled = clip_features(self.tokenizer_g, self.clip_g, prompts)  # (B, 77, 1280), (B, 1280)
        clip = torch.cat([l_tokens, g_tokens], dim=-1).to(self.dtype)  # (B, 77, 2048)
        clip = F.pad(clip, (0, self.context_dim - clip.shape[-1]))  # zero features up to T5's width
        context = torch.cat([clip, self._t5_context(prompts, t5_tokens)], dim=1)  # (B, 77 + t5_tokens, 4096)
        pooled = torch.cat([l_pooled, g_pooled], dim=-1).to(self.dtype)  # (B, 2048)
        return context, pooled

    def _t5_context(self, prompts: list[str], tokens: int) -> torch.Tensor:
        if self.t5 is None:  # Flash SD3 recipe: zeros in the text encoder dtype (_get_t5_prompt_embeds)
            return torch.zeros(len(prompts), tokens, self.context_dim, dtype=self.dtype, device=self.device)
        ids = self.tokenizer_t5(prompts, padding="max_length", max_length=tokens, truncation=True,
                                add_special_tokens=True, return_tensors="pt").input_ids  # (B, tokens)
        return self.t5(ids.to(self.t5.device)).last_hidden_state.to(self.dtype)  # no attention mask, as diffusers

    def offload(self, device: torch.device | str = "cpu") -> TextEncoders:
        """Move the encoders off the accelerator (after encoding) and return its cached memory."""
        self.to(device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self

    # Loading ------------------------------------------------------------------------------------

    @classmethod
    def from_diffusers_folder(cls, path: str | Path, *, dtype: torch.dtype = torch.float16,
                              device: torch.device | str = "cpu", t5: bool = False,
                              context_dim: int = CONTEXT_DIM) -> TextEncoders:
        """Load text_encoder{,_2} + tokenizer{,_2} (and text_encoder_3 + tokenizer_3 if `t5`) from a
        diffusers model folder (e.g. stable-diffusion-3-medium-diffusers). Weights must be safetensors."""
        root = Path(path)

        def reader(sub: str) -> SafetensorsReader:
            return SafetensorsReader(find_weights(root / sub, TRANSFORMERS_WEIGHTS))

        models = [load_clip(_clip_config(root / sub), reader(sub), dtype=dtype, device=device)
                  for sub in ("text_encoder", "text_encoder_2")]
        if t5:
            from transformers import T5Config

            t5_config = T5Config.from_pretrained(str(root / "text_encoder_3"))
            models.append(load_t5(t5_config, reader("text_encoder_3"), dtype=dtype, device=device))
        return cls._assemble(load_tokenizers(root, t5=t5), models, context_dim)

    @classmethod
    def from_single_file(cls, path: str | Path, tokenizer_source: str | Path | None = None, *,
                         dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                         t5: bool = False, context_dim: int = CONTEXT_DIM,
                         clip_l_config: CLIPTextConfig | None = None, clip_g_config: CLIPTextConfig | None = None,
                         t5_config=None) -> TextEncoders:
        """Load `text_encoders.{clip_l,clip_g[,t5xxl]}.transformer.*` from a Stability single file.

        The file has no configs: SD3's are shipped in flashsd3/configs/ (override with *_config).
        Tokenizers: see `load_tokenizers` (None: the CLIP tokenizers shipped in the package).
        CLIP-L's projection is the identity (see keymaps/text.py); a projection in the file is ignored.
        """
        reader = SafetensorsReader([Path(path)])
        l_cfg = clip_l_config or CLIPTextConfig.from_json_file(str(CONFIG_DIR / "clip_l.json"))
        g_cfg = clip_g_config or CLIPTextConfig.from_json_file(str(CONFIG_DIR / "clip_g.json"))
        models = [
            load_clip(l_cfg, reader, CLIP_L_PREFIX, dtype=dtype, device=device, identity_projection=True),
            load_clip(g_cfg, reader, CLIP_G_PREFIX, dtype=dtype, device=device),
        ]
        if t5:
            from transformers import T5Config

            t5_config = t5_config or T5Config.from_json_file(str(CONFIG_DIR / "t5xxl.json"))
            models.append(load_t5(t5_config, reader, T5_PREFIX, dtype=dtype, device=device))
        return cls._assemble(load_tokenizers(tokenizer_source, t5=t5), models, context_dim)

    @classmethod
    def _assemble(cls, tokenizers, models, context_dim) -> TextEncoders:
        tok_l, tok_g, tok_t5 = tokenizers
        clip_l, clip_g, t5 = (*models, None)[:3]
        return cls(tok_l, clip_l, tok_g, clip_g, tok_t5, t5, context_dim=context_dim)


def warn_truncated(tokenizer, prompts: list[str]) -> None:
    """One warning per call if a prompt is longer than CLIP's 77 tokens (start and end tokens included):
    the rest is cut off, as diffusers `_get_clip_prompt_embeds` does (with its own warning)."""
    lengths = [len(ids) for ids in tokenizer(prompts, verbose=False).input_ids]  # start/end tokens included
    long = [n for n in lengths if n > CLIP_TOKENS]
    if long:
        which = f"a prompt of {long[0]}" if len(long) == 1 else f"{len(long)} prompts of up to {max(long)}"
        warnings.warn(f"{which} CLIP tokens: only the first {CLIP_TOKENS} of each are used, the rest is cut off",
                      stacklevel=4)  # the caller of encode (past torch.no_grad's wrapper)


def clip_features(tokenizer, encoder: CLIPTextModelWithProjection, prompts: list[str]):
    """One CLIP: (penultimate hidden states (B, 77, D), projected pooled EOS state (B, P))."""
    ids = tokenizer(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                    return_tensors="pt").input_ids  # (B, 77); CLIP-L pads with EOS 49407, CLIP-G with "!" = 0
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def load_tokenizers(source: str | Path | None = None, *, t5: bool = False):
    """(tokenizer, tokenizer_2, tokenizer_3 or None) from the subfolders of a diffusers folder or hub
    repo; with no source, SD3's CLIP tokenizers shipped in the package (flashsd3.tokenizers).
    The two CLIP tokenizers share one BPE vocabulary and differ in padding (see flashsd3/tokenizers.py)."""
    if source is None:
        if t5:
            raise ValueError("T5 needs a tokenizer source (a folder or hub repo with tokenizer_3/)")
        return (*sd3_clip_tokenizers(), None)
    source = str(source)
    tok_l = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    tok_g = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")
    tok_t5 = AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3") if t5 else None
    return tok_l, tok_g, tok_t5


def load_clip(config: CLIPTextConfig, reader: SafetensorsReader, prefix: str = "", *,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              identity_projection: bool = False) -> CLIPTextModelWithProjection:
    """Build a CLIP text model on the meta device and fill it strictly from `reader` under `prefix`.
    `identity_projection`: set text_projection to the identity instead of loading it."""
    _require_prefix(reader, prefix, "CLIP text encoder")
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    ignore = CLIP_IGNORE
    if identity_projection:
        if config.projection_dim != config.hidden_size:
            raise CheckpointError(f"{reader.name}: identity projection needs projection_dim == hidden_size, "
                                  f"config has {config.projection_dim} != {config.hidden_size}")
        model.text_projection = nn.Identity()  # placeholder so the strict load does not ask for it
        ignore = CLIP_L_SINGLE_FILE_IGNORE
    load_into(model, reader, CLIP_TABLE, prefix=prefix, ignore=ignore, dtype=dtype, device=device)
    if identity_projection:
        proj = nn.Linear(config.hidden_size, config.projection_dim, bias=False, device=device, dtype=dtype)
        nn.init.eye_(proj.weight.data)
        model.text_projection = proj
    emb = model.text_model.embeddings  # non-persistent buffer, left on meta: recompute (arange of positions)
    positions = torch.arange(emb.position_embedding.num_embeddings, device=device).expand(1, -1)
    emb.register_buffer("position_ids", positions, persistent=False)
    _check_materialized(model, reader)
    return model.eval()


def load_t5(config, reader: SafetensorsReader, prefix: str = "", *, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None):
    """Build a transformers T5EncoderModel on the meta device and fill it strictly from `reader`."""
    from transformers import T5EncoderModel

    _require_prefix(reader, prefix, "T5 encoder")
    present = [k for k in T5_EMBEDDING_KEYS if prefix + k in reader.keys()]
    if not present:
        raise CheckpointError(f"{reader.name}: no T5 token embedding, expected one of "
                              + ", ".join(prefix + k for k in T5_EMBEDDING_KEYS))
    emb = present[0]  # both keys name one tied tensor; prefer `shared.weight`, as transformers ties to it
    table = T5_TABLE + (Rule("shared.weight", (emb,)), Rule("encoder.embed_tokens.weight", (emb,)))
    ignore = [f"^{re.escape(k)}$" for k in present[1:]]
    with torch.device("meta"):
        model = T5EncoderModel(config)
    load_into(model, reader, table, prefix=prefix, ignore=ignore, dtype=dtype, device=device)
    model.set_input_embeddings(model.shared)  # re-tie: the strict load assigned two copies
    if dtype == torch.float16:  # transformers keeps T5's FF output (`wo`) in fp32: fp16 overflows there
        for name, _ in model.named_parameters():
            if name.endswith(".DenseReluDense.wo.weight"):
                fp32 = reader.get(prefix + name, torch.float32).to(device)
                model.get_submodule(name.rsplit(".", 1)[0]).weight = nn.Parameter(fp32, requires_grad=False)
    _check_materialized(model, reader)
    return model.eval()


def _clip_config(folder: Path) -> CLIPTextConfig:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a diffusers text_encoder folder)")
    return CLIPTextConfig.from_pretrained(str(folder))


def _require_prefix(reader: SafetensorsReader, prefix: str, what: str) -> None:
    if not any(k.startswith(prefix) for k in reader.keys()):
        raise CheckpointError(f"{reader.name}: no {what} weights (no key starts with {prefix!r}); "
                              "this file may hold only the diffusion model")


def _check_materialized(model: nn.Module, reader: SafetensorsReader) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor neither in the checkpoint nor recomputed above (e.g. a new transformers buffer)
        raise CheckpointError(f"{reader.name}: {type(model).__name__} tensors left unloaded: {left}")
