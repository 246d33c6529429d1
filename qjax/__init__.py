"""qjax: QLoRA for JAX. Quantized arrays bit-identical to bitsandbytes, fused kernels, Flax adapters."""

from qjax import checkpoint, interop, linen, nnx, optim, sharding
from qjax._src.flax.kbit import prepare_for_kbit_training, upcast_half_params
from qjax._src.core.footprint import Footprint, memory_footprint
from qjax._src.core.formats import BLOCKSIZES, FORMATS
from qjax._src.matmul.int8 import int8_matmul
from qjax._src.adapters.loftq import loftq, loftq_init
from qjax._src.adapters.config import LoraConfig
from qjax._src.adapters.variant import AdapterVariant, Axis, LoRA, register_variant
from qjax._src.core.policy import DEFAULT_SKIP, QuantConfig, dequantize_params, quantize_params
from qjax._src.core.family import QuantizedBase, is_quantized, register_family, static_field
from qjax._src.core.qarray import QuantizedArray
from qjax._src.matmul.qmatmul import qmatmul
from qjax._src.matmul.sharded import qmatmul_sharded
from qjax._src.sharding.lora import lora_sharding
from qjax._src.sharding.specs import quantized_sharding
from qjax._src.sharding.trees import (optimizer_sharding, params_sharding, quantize_params_sharded, shard_params,
                                      with_sharding_constraint)
from qjax._src.core.quantize import dequantize, dequantize_blockwise, quantize, quantize_blockwise
from qjax._src.core.rules import QuantRules, first_blocks
from qjax._src.errors import ConversionWarning
from qjax._src.flax.routing import RoutedWeight

__version__ = "0.1.0"

__all__ = [
    "AdapterVariant", "Axis", "LoRA", "register_variant",
    "BLOCKSIZES", "ConversionWarning", "DEFAULT_SKIP", "FORMATS", "Footprint", "LoraConfig", "QuantConfig", "QuantRules",
    "QuantizedArray", "QuantizedBase", "checkpoint", "dequantize", "dequantize_blockwise", "dequantize_params",
    "first_blocks", "int8_matmul", "interop", "is_quantized", "linen", "loftq", "loftq_init", "lora_sharding",
    "memory_footprint", "nnx", "optim", "optimizer_sharding", "params_sharding", "prepare_for_kbit_training",
    "qmatmul", "qmatmul_sharded", "quantize", "quantize_blockwise", "quantize_params",
    "quantize_params_sharded", "quantized_sharding", "register_family", "RoutedWeight", "shard_params", "sharding", "static_field",
    "upcast_half_params",
    "with_sharding_constraint",
]
