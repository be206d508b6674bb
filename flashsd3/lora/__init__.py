"""LoRA for the MMDiT in plain PyTorch: PEFT, diffusers, kohya and OneTrainer files, merged or not."""
from .formats import LoRAError
from .lora import LoRAInfo, load_lora, lora_info, merge_lora, remove_lora, set_lora_scale, unmerge_lora

__all__ = ["LoRAError", "LoRAInfo", "load_lora", "lora_info", "merge_lora", "remove_lora", "set_lora_scale",
           "unmerge_lora"]
