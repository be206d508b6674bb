"""What a run trains: LoRA adapters (`add_lora`) or a chosen set of the transformer's full weights.

Shared by every objective (flow.py, flash/task.py): `set_trainable` before the optimiser is built (also on a
meta-device model, where it checks the run's choices before anything is loaded or written), `save_trained` for
the final weights. Adapters are saved with `save_lora` in the published PEFT layout, so
`flashsd3-sample --lora RUN/lora` loads them; full weights as a transformer folder `load_transformer` reads.
"""
from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .. import rng
from ..lora.checkpointing import checkpoint_blocks
from ..outputs import atomic_dir
from .config import TrainConfig

ADAPTER = "default"  # the adapter's name in the model and in the saved file
PRESETS = ("flash-sd3", "all-linear")


def lora_targets(spec: str) -> str | list[str]:
    return spec if spec in PRESETS else [t.strip() for t in spec.split(",") if t.strip()]


def set_trainable(cfg: TrainConfig, model: nn.Module) -> None:
    """Freeze the model, then make trainable either cfg.train_modules (patterns) or new LoRA adapters (their A
    drawn from generator seed cfg.seed: the same on every rank and for any number of ranks); activation
    checkpointing of the joint blocks if asked. Errors name the flag at fault."""
    from ..lora import LoRAError, add_lora

    model.requires_grad_(False)
    checkpoint_blocks(model, cfg.activation_checkpointing)
    if cfg.train_modules:
        names = [n for n, _ in model.named_parameters()]
        unmatched = [p for p in cfg.train_modules if not any(fnmatch(n, p) for n in names)]
        if unmatched:
            raise ValueError(f"--train-modules pattern(s) {', '.join(unmatched)} match no parameter "
                             f"(names look like {names[len(names) // 2]})")
        for n, p in model.named_parameters():
            if any(fnmatch(n, pat) for pat in cfg.train_modules):
                p.data = p.data.float()  # trained weights and their AdamW state in fp32
                p.requires_grad_(True)
        return
    try:
        add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha or float(cfg.lora_rank),
                 targets=lora_targets(cfg.lora_targets), name=ADAPTER, generator=rng.offset_generator(cfg.seed))
    except LoRAError as e:
        raise ValueError(f"--lora-targets {cfg.lora_targets}: {e}") from None


def save_trained(cfg: TrainConfig, model: nn.Module, out: Path) -> Path:
    """RUN/lora (adapter_model.safetensors + adapter_config.json) or RUN/transformer (config + weights)."""
    if not cfg.train_modules:
        from ..lora import save_lora

        save_lora(model, out / "lora", name=ADAPTER, format="peft")
        return out / "lora"
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(model.config.to_diffusers(), indent=2) + "\n")
        save_file(tensors, str(tmp / "diffusion_pytorch_model.safetensors"))

    atomic_dir(out / "transformer", write)
    return out / "transformer"
