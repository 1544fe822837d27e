"""Fine-tuning: LoRA adapters (``difflab.finetune.lora``) trained on top of a finished run.

Knows nothing of samplers; the trainer and the Pipeline call into it.
"""

from difflab.finetune.lora import (
    LORA_FILE,
    LORA_FORMAT,
    LoRALayer,
    LoRAReport,
    add_lora,
    fuse_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    remove_lora,
    save_lora,
    set_lora_scale,
    unfuse_lora,
)

__all__ = [
    "LORA_FILE",
    "LORA_FORMAT",
    "LoRALayer",
    "LoRAReport",
    "add_lora",
    "fuse_lora",
    "load_lora",
    "lora_layers",
    "lora_state_dict",
    "remove_lora",
    "save_lora",
    "set_lora_scale",
    "unfuse_lora",
]
