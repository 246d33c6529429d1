"""Interop with the PyTorch ecosystem: bitsandbytes 4-bit models, PEFT adapters,
merged dense exports, torch module names."""

from qjax._src.io.bnb import bnb_state_dict, bnb_weight, from_bnb_state_dict
from qjax._src.io.names import IDENTITY, LLAMA, LLAMA_NNX, NameMap
from qjax._src.io.peft import (load_peft_adapter, load_safetensors, read_peft_config, save_peft_adapter,
                            save_safetensors)
from qjax._src.io.torch_state import bnb_model_state_dict, from_torch_state_dict, merged_state_dict, save_merged

__all__ = [
    "IDENTITY",
    "LLAMA",
    "LLAMA_NNX",
    "NameMap",
    "bnb_model_state_dict",
    "bnb_state_dict",
    "bnb_weight",
    "from_bnb_state_dict",
    "from_torch_state_dict",
    "load_peft_adapter",
    "load_safetensors",
    "merged_state_dict",
    "read_peft_config",
    "save_merged",
    "save_peft_adapter",
    "save_safetensors",
]
