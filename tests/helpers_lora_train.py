"""Test helpers for trainable adapters: twin models (peft on diffusers / ours) with equal weights and adapters."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from flashsd3 import TINY, MMDiT
from flashsd3.lora import add_lora, load_lora, lora_parameters
from flashsd3.lora.train import FLASH_SD3_TARGETS, our_rows, select_targets
from flashsd3.mmdit import from_diffusers_state_dict
from helpers_mmdit import random_diffusers_transformer
from helpers_reference import read_json, read_tsv

FLOAT64_TOL = 1e-10  # float64: fused qkv vs separate q/k/v and the image-/context-first join reorder sums only


PUBLISHED_KEYS = read_tsv("flash_sd3_adapter_keys.tsv")  # what peft writes for the published adapter
PUBLISHED_CONFIG = read_json("flash_sd3_adapter_config.json")


def ours_from_diffusers(ref, cfg) -> MMDiT:
    """Our model with the weights of diffusers' `ref`, through the public in-memory conversion."""
    return from_diffusers_state_dict(ref.state_dict(), cfg)


def peft_config(r=4, alpha=3, targets=FLASH_SD3_TARGETS) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=True)


def twins(targets="flash-sd3", peft_targets=FLASH_SD3_TARGETS, seed=0, dtype=torch.float64):
    """(peft model on diffusers, our model): same random base weights, same random non-zero A and B.
    dtype: add_lora's (None: its default, the wider of float32 and the float64 base's)."""
    ref = random_diffusers_transformer(TINY, torch.float64, seed=seed)
    ours = ours_from_diffusers(ref, TINY)
    model = get_peft_model(ref, peft_config(targets=peft_targets) if peft_targets != "all-linear"
                           else LoraConfig(r=4, lora_alpha=3, target_modules="all-linear"))
    add_lora(ours, rank=4, alpha=3, targets=targets, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, m in lora_modules(model).items():
            for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
        for path, (A, B) in peft_ab(model).items():
            update, target = our_update(ours, path)
            update.A.copy_(A)
            update.B.copy_(our_rows(target, B))
    return model, ours


def lora_modules(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def peft_ab(model) -> dict:
    return {n: (m.lora_A["default"].weight, m.lora_B["default"].weight) for n, m in lora_modules(model).items()}


def our_update(ours, path: str):
    """The update of adapter 'default' that diffusers module `path` names, and its Target."""
    target = select_targets(ours, [path])[path]
    layer = ours.get_submodule(target.module)
    (update,) = [u for u in layer.lora["default"] if (u.start, u.stop) == (target.start, target.stop)]
    return update, target


def frozen_base() -> MMDiT:
    """twins()'s base model without adapters, frozen as add_lora freezes (at::linear picks its kernel by
    requires_grad, so only equally frozen models agree bitwise)."""
    return ours_from_diffusers(random_diffusers_transformer(TINY, torch.float64, seed=0), TINY).requires_grad_(False)


def loss_of(out: torch.Tensor, seed=3) -> torch.Tensor:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out * w).sum()


def grad_close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Relative error < FLOAT64_TOL; zero gradients (the last block's context query) must be zero in both."""
    return bool((ours - ref).norm() <= FLOAT64_TOL * ref.norm())


def call_ref(model, lat, t, ctx, pooled):
    return model(hidden_states=lat, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample


def peft_out(folder, inputs):
    """Outputs of diffusers' transformer (twins' base weights) with the peft adapter saved at `folder`."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(random_diffusers_transformer(TINY, torch.float64, seed=0), folder)
    with torch.no_grad():
        return call_ref(model, *inputs)


def flashsd3_out(source, inputs, **kw):
    ours = frozen_base()
    load_lora(ours, source, **kw)
    with torch.no_grad():
        return ours(*inputs)


def saved(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def randomize(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
