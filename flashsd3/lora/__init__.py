"""LoRA for the MMDiT in plain PyTorch: PEFT, diffusers, kohya, OneTrainer, LyCORIS and ComfyUI files, merged or not;
trainable."""
from .formats import LoRAError
from .lora import LoRAInfo, load_lora, lora_info, merge_lora, remove_lora, set_lora_scale, unmerge_lora
from .save import save_lora
from .train import (
    add_lora,
    load_lora_state_dict,
    load_trainable_lora,
    lora_disabled,
    lora_parameters,
    lora_scaled,
    lora_state_dict,
    make_trainable,
    named_lora_parameters,
)

__all__ = ["LoRAError", "LoRAInfo", "load_lora", "lora_info", "merge_lora", "remove_lora", "set_lora_scale",
           "unmerge_lora", "add_lora", "load_lora_state_dict", "load_trainable_lora", "lora_disabled",
           "lora_parameters", "lora_scaled", "lora_state_dict", "make_trainable", "named_lora_parameters", "save_lora"]
