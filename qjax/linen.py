"""QLoRA for Flax Linen: QLoRADense, QLoRADenseGeneral, convert, merge."""

from qjax._src.linen_convert import ConversionSpec, convert, is_converted, merge
from qjax._src.linen_lora import LayerSpec, QLoRADense, QLoRADenseGeneral

__all__ = ["ConversionSpec", "LayerSpec", "QLoRADense", "QLoRADenseGeneral", "convert", "is_converted", "merge"]
