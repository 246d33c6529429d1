"""Interop with the PyTorch ecosystem: bitsandbytes 4-bit state dicts."""

from qjax._src.bnb import bnb_state_dict, bnb_weight, from_bnb_state_dict

__all__ = ["bnb_state_dict", "bnb_weight", "from_bnb_state_dict"]
