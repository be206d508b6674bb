"""Test helpers: the published Flash SD3 adapter config as a dict and as a peft LoraConfig."""
from __future__ import annotations

from flashsd3.config import FLASH_SD3_ADAPTER

# The fields of jasperai/flash-sd3's adapter_config.json (tests/fixtures/flash_sd3_adapter_config.json)
# that shape the adapter; rank, alpha and targets from the package's one copy (test_lora checks them
# against the file).
PUBLISHED = {
    "r": FLASH_SD3_ADAPTER.rank, "lora_alpha": FLASH_SD3_ADAPTER.alpha, "use_rslora": False, "rank_pattern": {},
    "alpha_pattern": {}, "peft_type": "LORA", "target_modules": list(FLASH_SD3_ADAPTER.target_modules),
    "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_dropout": 0.0, "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True,
}


def lora_config(**changes):
    """peft LoraConfig of the published adapter, with `changes`."""
    from peft import LoraConfig

    return LoraConfig(**{**{k: v for k, v in PUBLISHED.items() if k != "peft_type"}, **changes})
