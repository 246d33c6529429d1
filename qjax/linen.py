"""QLoRA for Flax Linen: QLoRADense, QLoRADenseGeneral, QLoRAEinsum, convert, merge."""

from qjax._src.flax.kbit import prepare_for_kbit_training
from qjax._src.flax.linen_convert import ConversionSpec, convert, is_converted, merge
from qjax._src.flax.linen_layers import LayerSpec, QLoRADense, QLoRADenseGeneral, QLoRAEinsum

__all__ = ["ConversionSpec", "LayerSpec", "QLoRADense", "QLoRADenseGeneral", "QLoRAEinsum", "convert", "is_converted",
           "merge", "prepare_for_kbit_training"]
