"""Interop with the PyTorch ecosystem: bitsandbytes 4-bit state dicts, PEFT adapters, torch names."""

from qjax._src.bnb import bnb_state_dict, bnb_weight, from_bnb_state_dict
from qjax._src.names import IDENTITY, LLAMA, LLAMA_NNX, NameMap
from qjax._src.peft import (load_peft_adapter, load_safetensors, read_peft_config, save_peft_adapter,
                            save_safetensors)

__all__ = [
    "IDENTITY",
    "LLAMA",
    "LLAMA_NNX",
    "NameMap",
    "bnb_state_dict",
    "bnb_weight",
    "from_bnb_state_dict",
    "load_peft_adapter",
    "load_safetensors",
    "read_peft_config",
    "save_peft_adapter",
    "save_safetensors",
]
