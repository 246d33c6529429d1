"""Linen QLoRA: QLoRADense / QLoRADenseGeneral, and conversion of an existing model.

Conversion does not rewrite the user's module classes. `convert` builds a subclass of the model's
class whose public methods run the original ones inside `nn.intercept_methods`; the interceptor
catches `nn.Dense` / `nn.DenseGeneral` calls at the converted paths and computes the QLoRA layer
from the variables stored at that path (the 2-D QuantizedArray `kernel`, `bias`, `lora_a`,
`lora_b`). Variable paths therefore stay those of the original model, for `setup` and `nn.compact`
modules alike, and layers inside `nn.scan` / `nn.vmap` / `nn.remat` are caught as well (their
variables carry the stacked leading axes; each layer's slice is quantized on its own).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta

from qjax._src import lora as L
from qjax._src.lora_config import LoraConfig
from qjax._src.policy import QuantConfig
from qjax._src.qarray import is_quantized



@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A converted layer: module path, in/out shapes of one layer, stacked leading axes, what it gets."""

    path: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    lead: tuple[int, ...] = ()
    lora: bool = True
    quantized: bool = True
    einsum: str | None = None  # the equation of an nn.Einsum layer (None: Dense / DenseGeneral)
    quant_config: QuantConfig | None = None  # this layer's own config (a QuantRules' choice); None: the spec's


# ----------------------------------------------------------------------------- the layer math


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _call(module: nn.Module, inputs, *, axis, features, kernel_init, lora: LoraConfig | None,
          quant: QuantConfig | None, backend: str = "auto", deterministic: bool | None = None,
          flat_kernel_init: bool = False):
    """The QLoRA layer on a bound Dense-like module: reads/creates its variables with `module.param`."""
    features = _tuple(features)
    axis = tuple(a % inputs.ndim for a in _tuple(axis))
    if axis != tuple(range(inputs.ndim - len(axis), inputs.ndim)):
        # Contracted axes moved last: the output keeps the other axes in order, as DenseGeneral does.
        inputs = jnp.moveaxis(inputs, axis, tuple(range(inputs.ndim - len(axis), inputs.ndim)))
    n_in = len(axis)
    in_shape = tuple(inputs.shape[inputs.ndim - n_in:])
    where = "/".join(module.scope.path) or "<root>"

    def kernel_init_fn(rng):
        if flat_kernel_init:  # DenseGeneral initializes the flattened (K, N) kernel
            w = kernel_init(rng, (int(np.prod(in_shape)), int(np.prod(features))), module.param_dtype)
            w = jnp.reshape(w, in_shape + features)
        else:
            w = kernel_init(rng, in_shape + features, module.param_dtype)
        return meta.unbox(w)

    loftq = None
    if L.wants_loftq(lora, quant) and module.is_initializing() and not module.has_variable("params", "kernel"):
        # LoftQ init of a fresh layer: kernel and adapters come from the same dense kernel.
        L.check_rank(lora.r, in_shape, features, where)
        loftq = L.loftq_kernel(kernel_init_fn(module.make_rng("params")), n_in, lora, quant)
    kernel = module.param("kernel", lambda rng: loftq[0] if loftq is not None else
                          (L.quantize_kernel(kernel_init_fn(rng), n_in, quant) if quant is not None
                           else kernel_init_fn(rng)))
    bias = module.param("bias", lambda rng: meta.unbox(module.bias_init(rng, features, module.param_dtype))) \
        if module.use_bias else None
    lora_a = lora_b = None
    if lora is not None:
        L.check_rank(lora.r, in_shape, features, where)
        lora_a = module.param("lora_a", lambda rng: loftq[1] if loftq is not None else
                              L.init_adapters(rng, in_shape, features, lora.r, lora.init)[0])
        lora_b = module.param("lora_b", lambda rng: loftq[2] if loftq is not None else
                              L.init_adapters(rng, in_shape, features, lora.r, lora.init)[1])
    expected = (int(np.prod(in_shape)), int(np.prod(features))) if is_quantized(kernel) else in_shape + features
    if tuple(kernel.shape) != expected:
        raise ValueError(f"{where}: kernel has shape {tuple(kernel.shape)}, expected {expected} for inputs "
                         f"of shape {inputs.shape} and features={features}")
    param_dtype = L.kernel_dtype(kernel)
    out_dtype = module.dtype or jnp.promote_types(inputs.dtype, param_dtype)
    compute_dtype = (quant.compute_dtype if quant is not None and quant.compute_dtype is not None
                     else out_dtype) if is_quantized(kernel) else out_dtype
    key = None
    if lora is not None and lora.dropout > 0 and not deterministic and module.has_rng("dropout"):
        key = module.make_rng("dropout")
    return L.lora_linear(inputs, kernel, bias, lora_a, lora_b, n_in=n_in, out_shape=features,
                         scaling=lora.scaling if lora is not None else 0.0, compute_dtype=compute_dtype,
                         out_dtype=out_dtype, precision=module.precision,
                         dropout_rate=lora.dropout if lora is not None else 0.0, dropout_key=key,
                         backend=backend, int8_threshold=L.llm_int8_threshold(kernel, quant))


def _einsum_call(module: nn.Module, inputs, einsum_str, *, lora: LoraConfig | None, quant: QuantConfig | None,
                 backend: str = "auto", deterministic: bool | None = None):
    """The QLoRA layer on a bound Einsum-like module (`shape`, `einsum_str`, `kernel_init`, `bias_init`)."""
    where = "/".join(module.scope.path) or "<root>"
    if (einsum_str is None) == (module.einsum_str is None):
        raise ValueError(f"{where}: give einsum_str either as a field or as a call argument, exactly once")
    plan = L.EinsumPlan(einsum_str if einsum_str is not None else module.einsum_str, where)
    shape = tuple(module.shape)
    if len(shape) != len(plan.rhs):
        raise ValueError(f"{where}: kernel shape {shape} does not fit einsum_str {plan.einsum_str!r}")
    in_shape, out_shape = plan.in_shape(shape), plan.out_shape(shape)

    def kernel_init_fn(rng):
        w = meta.unbox(module.kernel_init(rng, shape, module.param_dtype))
        return L.quantize_einsum_kernel(plan, w, quant) if quant is not None else w

    loftq = None
    if L.wants_loftq(lora, quant) and module.is_initializing() and not module.has_variable("params", "kernel"):
        L.check_rank(lora.r, in_shape, out_shape, where)
        w = meta.unbox(module.kernel_init(module.make_rng("params"), shape, module.param_dtype))
        loftq = L.loftq_kernel(w, len(in_shape), lora, quant, perm=plan.perm)
    kernel = module.param("kernel", lambda rng: loftq[0] if loftq is not None else kernel_init_fn(rng))
    bias = module.param("bias", lambda rng: meta.unbox(module.bias_init(rng, out_shape, module.param_dtype))) \
        if module.use_bias else None
    lora_a = lora_b = None
    if lora is not None:
        L.check_rank(lora.r, in_shape, out_shape, where)
        lora_a = module.param("lora_a", lambda rng: loftq[1] if loftq is not None else
                              L.init_adapters(rng, in_shape, out_shape, lora.r, lora.init)[0])
        lora_b = module.param("lora_b", lambda rng: loftq[2] if loftq is not None else
                              L.init_adapters(rng, in_shape, out_shape, lora.r, lora.init)[1])
    expected = (int(np.prod(in_shape)), int(np.prod(out_shape))) if is_quantized(kernel) else shape
    if tuple(kernel.shape) != expected:
        raise ValueError(f"{where}: kernel has shape {tuple(kernel.shape)}, expected {expected} for "
                         f"einsum_str {plan.einsum_str!r} and shape={shape}")
    out_dtype = module.dtype or jnp.promote_types(inputs.dtype, L.kernel_dtype(kernel))
    compute_dtype = (quant.compute_dtype if quant is not None and quant.compute_dtype is not None
                     else out_dtype) if is_quantized(kernel) else out_dtype
    key = None
    if lora is not None and lora.dropout > 0 and not deterministic and module.has_rng("dropout"):
        key = module.make_rng("dropout")
    return L.einsum_lora(inputs, plan, kernel, bias, lora_a, lora_b, out_shape=out_shape,
                         scaling=lora.scaling if lora is not None else 0.0, compute_dtype=compute_dtype,
                         out_dtype=out_dtype, precision=module.precision,
                         dropout_rate=lora.dropout if lora is not None else 0.0, dropout_key=key, backend=backend,
                         int8_threshold=L.llm_int8_threshold(kernel, quant))


class QLoRADense(nn.Module):
    """Drop-in for `nn.Dense` with a frozen quantized kernel and trainable LoRA adapters.

    Fields as nn.Dense (`features`, `use_bias`, `dtype`, `param_dtype`, `precision`, `kernel_init`,
    `bias_init`), plus `lora_config` (None: no adapters), `quant_config` (None: 16-bit LoRA, the
    kernel stays dense), `backend` (qmatmul backend: "auto", "xla", "pallas", or "pallas_interpret"
    to emulate the kernels) and `deterministic` (None: LoRA dropout is on when a 'dropout' rng is
    given).
    Variables: params/kernel: QuantizedArray (in, features) (or dense); params/bias (features,);
    params/lora_a (in, r); params/lora_b (r, features).
    Call: inputs (..., in) -> (..., features) in `dtype` (default: promoted dtype of inputs and
    param_dtype); the base matmul runs in `quant_config.compute_dtype`.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    lora_config: LoraConfig | None = LoraConfig()
    quant_config: QuantConfig | None = QuantConfig()
    backend: str = "auto"
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, inputs):
        return _call(self, inputs, axis=-1, features=self.features, kernel_init=self.kernel_init,
                     lora=self.lora_config, quant=self.quant_config, backend=self.backend,
                     deterministic=self.deterministic)


class QLoRADenseGeneral(nn.Module):
    """Drop-in for `nn.DenseGeneral` (no `batch_dims`): kernel (*in_axes, *features) quantized as 2-D.

    Variables: params/kernel: QuantizedArray (prod(in_axes), prod(features)) (dense
    (*in_axes, *features) with quant_config=None); params/bias (*features,);
    params/lora_a (*in_axes, r); params/lora_b (r, *features).
    Call: inputs with the `axis` axes contracted -> (..., *features).
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    lora_config: LoraConfig | None = LoraConfig()
    quant_config: QuantConfig | None = QuantConfig()
    backend: str = "auto"
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, inputs):
        return _call(self, inputs, axis=self.axis, features=self.features, kernel_init=self.kernel_init,
                     lora=self.lora_config, quant=self.quant_config, backend=self.backend,
                     deterministic=self.deterministic, flat_kernel_init=True)


class QLoRAEinsum(nn.Module):
    """Drop-in for `nn.Einsum`: the kernel `shape` permuted to (*in_axes, *out_axes) and quantized as 2-D.

    in_axes are the kernel axes the equation contracts with the input (kernel order), out_axes the
    ones it produces (output order). Variables: params/kernel: QuantizedArray (prod(in), prod(out))
    (the dense kernel of `shape` with quant_config=None); params/bias (*out_axes,) (nn.Einsum's);
    params/lora_a (*in_axes, r); params/lora_b (r, *out_axes). E.g. "btd,dnh->btnh" with shape
    (d, n, h): kernel (d, n*h), lora_a (d, r), lora_b (r, n, h).
    Kernel axes shared by the input and the output (batched matmuls) are not supported.
    """

    shape: Sequence[int]
    einsum_str: str | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    lora_config: LoraConfig | None = LoraConfig()
    quant_config: QuantConfig | None = QuantConfig()
    backend: str = "auto"
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, inputs, einsum_str: str | None = None):
        return _einsum_call(self, inputs, einsum_str, lora=self.lora_config, quant=self.quant_config,
                            backend=self.backend, deterministic=self.deterministic)
