"""Fine-tuning: LoRA adapters (``difflab.finetune.lora``) trained on top of a finished run,
and adapter files made by other tools (``difflab.finetune.lycoris``: kohya, LyCORIS, PEFT).

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
from difflab.finetune.lycoris import (
    AdapterLayer,
    AdapterReport,
    AdapterSet,
    AdapterTarget,
    clip_text_name_map,
    save_kohya,
)

__all__ = [
    "AdapterLayer",
    "AdapterReport",
    "AdapterSet",
    "AdapterTarget",
    "clip_text_name_map",
    "save_kohya",
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
