"""prepare_for_kbit_training for parameter trees (PEFT's prepare_model_for_kbit_training)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.adapters.tree import is_nnx_module
from qjax._src.errors import float_dtype
from qjax._src.core.qarray import is_quantized

_HALF = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def upcast_half_params(tree, dtype=jnp.float32):
    """Every bfloat16/float16 leaf that is not part of a QuantizedArray, cast to `dtype`.

    PEFT's `prepare_model_for_kbit_training` does this so norms, biases, embeddings and the head
    train and accumulate in float32 while the quantized kernels stay packed. Works on Linen
    variables, nnx.State and plain pytrees; integer leaves and QuantizedArrays are returned as is.
    Raises TypeError for a non-float `dtype`, for None and for an NNX module (use
    `qjax.nnx.prepare_for_kbit_training`, which casts in place).
    """
    float_dtype(dtype, "dtype")
    if tree is None or is_nnx_module(tree):
        raise TypeError(f"expected a params / variables tree (Linen variables, nnx.State), got "
                        f"{type(tree).__name__}" + ("; for an NNX model use qjax.nnx.prepare_for_kbit_training(model), "
                                                    "which casts in place" if tree is not None else ""))

    def cast(x):
        if is_quantized(x) or not hasattr(x, "dtype") or np.dtype(x.dtype) not in _HALF:
            return x
        return jnp.asarray(x).astype(dtype)
    return jax.tree_util.tree_map(cast, tree, is_leaf=is_quantized)


def prepare_for_kbit_training(variables, dtype=jnp.float32):
    """Linen: `upcast_half_params(variables, dtype)` (for NNX models see qjax.nnx.prepare_for_kbit_training).

    Gradient checkpointing of Linen blocks stays with the model definition (`nn.remat(Block)`), since
    Linen fixes a submodule's class where the parent builds it.
    """
    return upcast_half_params(variables, dtype)
