"""prepare_for_kbit_training (PEFT's prepare_model_for_kbit_training) for Linen variables and NNX models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax._src.adapters.config import check_patterns
from qjax._src.adapters.tree import is_nnx_module
from qjax._src.core.qarray import is_quantized
from qjax._src.errors import float_dtype
from qjax._src.flax.nnx_layers import BaseParam
from qjax._src.flax.select import module_matches

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


def prepare_for_kbit_training(variables_or_model, dtype=jnp.float32, *, remat=None):
    """PEFT's prepare_model_for_kbit_training: bf16/fp16 params that are not a base kernel cast to `dtype`.

    variables_or_model: Linen variables (or any params pytree: returns a new tree, `upcast_half_params`)
    or an NNX model (cast in place; returns the model). Norm scales, biases, embeddings and the head
    are cast; QuantizedArrays, NNX base kernels (`BaseParam`) and integer leaves are left alone
    (the adapters are float32 already).
    remat (NNX models only): patterns of module paths (as LoraConfig.target_modules, e.g. "blocks/*"
    or "layers") whose `__call__` is wrapped in `nnx.remat`, so their activations are recomputed in
    the backward pass. Linen blocks get gradient checkpointing where the model is defined
    (`nn.remat(Block)`), since Linen fixes a submodule's class where the parent builds it.
    Raises TypeError for a non-float dtype (before casting anything), for None, for remat that is
    not patterns or is given with Linen variables; ValueError for remat patterns that match no module.
    """
    if not is_nnx_module(variables_or_model):
        if remat is not None:
            raise TypeError(f"remat= is for NNX models (it wraps their modules' __call__ in nnx.remat), got "
                            f"{type(variables_or_model).__name__}; for Linen wrap the block class in nn.remat "
                            "where the model is defined")
        return upcast_half_params(variables_or_model, dtype)
    model = variables_or_model
    patterns = check_patterns(remat, "remat") if remat else ()
    float_dtype(dtype, "dtype")  # before anything is cast
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, nnx.Param) and not isinstance(node, BaseParam):
            value = node.get_value()
            new = upcast_half_params(value, dtype)
            if new is not value:
                node.set_value(new)
    if patterns:
        hits = [node for parts, node in nnx.iter_graph(model)
                if isinstance(node, nnx.Module) and parts
                and any(module_matches("/".join(str(p) for p in parts), p) for p in patterns)]
        if not hits:
            raise ValueError(f"prepare_for_kbit_training: remat patterns {list(patterns)} match no module")
        for node in hits:
            _remat_module(node)
    return model


def _remat_module(module) -> None:
    """Wraps one NNX module's `__call__` in nnx.remat (by giving it a subclass of its class); idempotent."""
    cls = type(module)
    if getattr(cls, "_qjax_remat", False):
        return
    original = cls.__call__

    @nnx.remat
    def call(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    module.__class__ = type(cls.__name__, (cls,), {"__call__": lambda self, *a, **k: call(self, *a, **k),
                                                    "_qjax_remat": True, "__module__": cls.__module__})
