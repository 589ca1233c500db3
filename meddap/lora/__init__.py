"""USLoRA (MEDDAP section 3.1, Eq. 3): low-rank adapters on the UNet's
attention projections, their files, and their training (`meddap.lora.train`).

    from meddap.lora import inject_lora, load_lora, save_lora, merge_lora
    names = inject_lora(sd.unet, rank=4, targets="cross")   # the paper's layers
    load_lora(sd.unet, "meddap_authors_lora_r4.safetensors")  # meddap or diffusers format
"""
from meddap.lora.adapter import (TARGET_PRESETS, AdapterConfig, LoRALinear, count_parameters,
                                 disable_lora, enable_lora, find_targets, inject_lora,
                                 load_base_state_dict, lora_layers, lora_parameters, lora_state_dict,
                                 merge_lora, remove_lora, set_lora_scale, unmerge_lora)
from meddap.lora.files import LoRAFormat, load_lora, read_lora_file, save_lora, write_lora_file

__all__ = [
    "LoRALinear", "LoRAFormat", "AdapterConfig", "TARGET_PRESETS",
    "inject_lora", "find_targets", "remove_lora", "lora_layers", "lora_parameters",
    "lora_state_dict", "count_parameters", "load_base_state_dict",
    "merge_lora", "unmerge_lora", "enable_lora", "disable_lora", "set_lora_scale",
    "load_lora", "save_lora", "read_lora_file", "write_lora_file",
]
