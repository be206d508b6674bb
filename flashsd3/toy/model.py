"""The toy teacher: the real MMDiT at toy size, text through learnt attribute tokens, and its checkpoint file.

Text conditioning replaces SD3's CLIP/T5 by a table per attribute: a caption (shape, colour, position)
becomes 3 context tokens (its rows of the three tables, plus a learnt per-slot embedding) and a pooled
vector (the three rows concatenated). Each table has one extra row, the learnt "empty" value: the empty
prompt uses it in every slot, so caption dropout teaches the unconditional velocity that CFG needs, as
SD3 drops captions to the empty prompt's encoding.

The teacher file is one safetensors holding `mmdit.*` and `text.*` tensors, with the two configs as JSON
in its metadata: `load_teacher(path)` rebuilds both modules without any other file.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..config import MMDiTConfig
from ..mmdit import MMDiT
from ..outputs import atomic_write
from ..rng import seeded
from ..sampling import cfg_denoiser, flow_match_sigmas, sample_euler
from .data import ATTRIBUTES


@dataclass(frozen=True)
class TextConfig:
    """Learnt attribute tokens; sizes of the three tables come from flashsd3.toy.data.ATTRIBUTES."""

    token_dim: int = 64  # features per context token (= MMDiTConfig.context_dim)
    init_std: float = 0.5  # N(0, std) init of the tables

    @property
    def pooled_dim(self) -> int:  # the three tokens concatenated (= MMDiTConfig.pooled_dim)
        return len(ATTRIBUTES) * self.token_dim


TOY_TEXT = TextConfig()
# 16x16 RGB pixels, patch 4 -> 4x4 = 16 image tokens; width 128 = 4 heads of 32; 4 joint blocks (~2.3M params).
# Patch 4, not 2: a training step costs 2.6x less (measured on the shared 2-core CPU: 0.20 vs 0.55 CPU-s at
# batch 64), which is what lets the teacher train, and a distillation call it 32 times per batch, in minutes.
TOY_TEACHER = MMDiTConfig(
    depth=4, num_heads=4, head_dim=32, patch_size=4, in_channels=3, out_channels=3,
    context_dim=TOY_TEXT.token_dim, pooled_dim=TOY_TEXT.pooled_dim, pos_embed_max_size=4, sample_size=16,
)


class AttributeText(nn.Module):
    """labels (B, 3) (shape, colour, position; -1 = empty) -> (context (B, 3, token_dim), pooled (B, 3*token_dim))."""

    def __init__(self, config: TextConfig = TOY_TEXT):
        super().__init__()
        self.config = config
        # one row per value plus the learnt empty row, last
        self.tables = nn.ModuleList(nn.Embedding(len(values) + 1, config.token_dim) for values in ATTRIBUTES)
        self.slot = nn.Parameter(torch.zeros(len(ATTRIBUTES), config.token_dim))  # which attribute a token is
        for table in self.tables:
            nn.init.normal_(table.weight, std=config.init_std)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.ndim != 2 or labels.shape[1] != len(ATTRIBUTES):
            raise ValueError(f"labels must be (B, {len(ATTRIBUTES)}), got {tuple(labels.shape)}")
        tokens = []
        for col, (table, values) in enumerate(zip(self.tables, ATTRIBUTES, strict=True)):
            idx = labels[:, col]
            if (idx < -1).any() or (idx >= len(values)).any():
                raise ValueError(f"label column {col} must be in -1..{len(values) - 1}, got {idx.unique().tolist()}")
            tokens.append(table(torch.where(idx < 0, len(values), idx)))
        context = torch.stack(tokens, dim=1) + self.slot  # (B, 3, token_dim)
        return context, context.flatten(1)  # pooled (B, 3 * token_dim)

    def empty(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's (context, pooled), batch copies (the CFG unconditional branch)."""
        labels = torch.full((batch, len(ATTRIBUTES)), -1, dtype=torch.long, device=self.slot.device)
        return self(labels)


def build_teacher(config: MMDiTConfig = TOY_TEACHER, text_config: TextConfig = TOY_TEXT,
                  seed: int = 0) -> tuple[MMDiT, AttributeText]:
    """A fresh teacher (DiT init: blocks start as the identity) and its text module, from one seed."""
    if config.context_dim != text_config.token_dim or config.pooled_dim != text_config.pooled_dim:
        raise ValueError(f"MMDiT context/pooled dims ({config.context_dim}, {config.pooled_dim}) must equal the text "
                         f"module's ({text_config.token_dim}, {text_config.pooled_dim})")
    with seeded(seed):  # module initialisers draw from the global generator; the caller's state is kept
        return MMDiT(config).init_weights(), AttributeText(text_config)


def save_teacher(model: MMDiT, text: AttributeText, path: str | Path, **extra: str) -> None:
    """Write both modules to one safetensors file (atomically), configs in the metadata."""
    tensors = {f"mmdit.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"text.{k}": v.detach().contiguous() for k, v in text.state_dict().items()}
    meta = {"mmdit_config": json.dumps(asdict(model.config)), "text_config": json.dumps(asdict(text.config)), **extra}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_teacher(path: str | Path) -> tuple[MMDiT, AttributeText]:
    """Rebuild (model, text) from a `save_teacher` file, strictly (every key used, none missing), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toy teacher file not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "mmdit_config" not in meta or "text_config" not in meta:
        raise ValueError(f"{path} is not a toy teacher file (no mmdit_config/text_config metadata)")
    cfg = json.loads(meta["mmdit_config"])
    cfg["dual_attention_layers"] = tuple(cfg["dual_attention_layers"])
    model, text = MMDiT(MMDiTConfig(**cfg)), AttributeText(TextConfig(**json.loads(meta["text_config"])))
    tensors = load_file(str(path))
    for prefix, module in (("mmdit.", model), ("text.", text)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    stray = [k for k in tensors if not k.startswith(("mmdit.", "text."))]
    if stray:
        raise ValueError(f"{path}: unexpected keys {stray[:5]}")
    return model.eval(), text.eval()


@torch.no_grad()
def generate(model: MMDiT, text: AttributeText, labels: torch.Tensor, noise: torch.Tensor, *, steps: int,
             guidance: float, shift: float = 3.0, batch: int = 250) -> torch.Tensor:
    """Teacher samples for (N, 3) labels from (N, 3, R, R) noise: `steps` flow-matching Euler steps on SD3's
    shifted grid, classifier-free guidance against the learnt empty prompt when guidance > 1."""
    sigmas = flow_match_sigmas(steps, shift)
    out = []
    for lab, x in zip(labels.split(batch), noise.split(batch), strict=True):
        denoise = cfg_denoiser(model, text(lab), text.empty(lab.shape[0]), guidance)
        out.append(sample_euler(denoise, x, sigmas))
    return torch.cat(out)
