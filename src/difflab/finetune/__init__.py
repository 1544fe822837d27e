"""Fine-tuning: LoRA adapters (``difflab.finetune.lora``) and LyCORIS' LoHa / LoKr
(``difflab.finetune.loha_lokr``) trained on top of a finished run, and adapter files made by
other tools (``difflab.finetune.lycoris``: kohya, LyCORIS, PEFT).

Knows nothing of samplers; the trainer and the Pipeline call into it.
"""

from difflab.finetune.loha_lokr import LoHaLayer, LoKrLayer, lokr_factorization
from difflab.finetune.lora import (
    ADAPTER_KINDS,
    LORA_FILE,
    LORA_FORMAT,
    LoRALayer,
    LoRAReport,
    adapter_layer,
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
    "ADAPTER_KINDS",
    "AdapterLayer",
    "AdapterReport",
    "AdapterSet",
    "AdapterTarget",
    "clip_text_name_map",
    "save_kohya",
    "LORA_FILE",
    "LORA_FORMAT",
    "LoRALayer",
    "LoHaLayer",
    "LoKrLayer",
    "LoRAReport",
    "adapter_layer",
    "add_lora",
    "fuse_lora",
    "load_lora",
    "lokr_factorization",
    "lora_layers",
    "lora_state_dict",
    "remove_lora",
    "save_lora",
    "set_lora_scale",
    "unfuse_lora",
]
