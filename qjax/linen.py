"""QLoRA for Flax Linen: QLoRADense, QLoRADenseGeneral, convert, merge."""

from qjax._src.kbit import prepare_for_kbit_training
from qjax._src.linen_convert import ConversionSpec, convert, is_converted, merge
from qjax._src.linen_lora import LayerSpec, QLoRADense, QLoRADenseGeneral

__all__ = ["ConversionSpec", "LayerSpec", "QLoRADense", "QLoRADenseGeneral", "convert", "is_converted", "merge",
           "prepare_for_kbit_training"]
