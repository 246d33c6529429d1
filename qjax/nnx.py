"""QLoRA for Flax NNX: QLoRALinear, QLoRALinearGeneral, QLoRAEinsum, convert, merge, and the variable types.

`LoRAParam` is Flax's own `nnx.LoRAParam` (the one adapter type): train the adapters alone with
`nnx.Optimizer(model, tx, wrt=qjax.nnx.LoRAParam)` and `nnx.grad(..., argnums=nnx.DiffState(0,
qjax.nnx.LoRAParam))`. `BaseParam` (an `nnx.Variable`, not an `nnx.Param`) holds the frozen base.
"""

from qjax._src.flax.kbit import prepare_for_kbit_training
from qjax._src.flax.nnx_convert import convert, merge
from qjax._src.flax.nnx_layers import BaseParam, LoRAParam, QLoRAEinsum, QLoRALinear, QLoRALinearGeneral

__all__ = ["BaseParam", "LoRAParam", "QLoRAEinsum", "QLoRALinear", "QLoRALinearGeneral", "convert", "merge",
           "prepare_for_kbit_training"]
