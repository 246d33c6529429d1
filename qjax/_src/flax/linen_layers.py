"""Linen QLoRA: QLoRADense / QLoRADenseGeneral, and conversion of an existing model.

Conversion does not rewrite the user's module classes. `convert` builds a subclass of the model's
class whose public methods run the original ones inside `nn.intercept_methods`; the interceptor
catches `nn.Dense` / `nn.DenseGeneral` / `nn.Einsum` calls at the converted paths and computes the QLoRA layer
from the variables stored at that path (the 2-D QuantizedArray `kernel`, `bias`, and the leaves of
the LoraConfig's adapter variant: LoRA's `lora_a`, `lora_b`). Variable paths therefore stay those of
the original model, for `setup` and `nn.compact` modules alike, and layers inside `nn.scan` /
`nn.vmap` / `nn.remat` are caught as well (their variables carry the stacked leading axes; each
layer's slice is quantized on its own).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta

from qjax._src.adapters import lora as L
from qjax._src.matmul import base as B
from qjax._src.errors import describe
from qjax._src.adapters.config import LoraConfig
from qjax._src.core.policy import QuantConfig
from qjax._src.core.qarray import is_quantized



@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A converted layer: module path, in/out shapes of one matrix, stacked leading axes, what it gets."""

    path: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    lead: tuple[int, ...] = ()
    lora: bool = True
    quantized: bool = True
    einsum: str | None = None  # the equation of an nn.Einsum / batched DenseGeneral (None: Dense / DenseGeneral)
    batch: tuple[int, ...] = ()  # an einsum's batch axes (one matrix and adapter per index), after `lead`
    quant_config: QuantConfig | None = None  # this layer's own config (a QuantRules' choice); None: the spec's


# ----------------------------------------------------------------------------- the layer math


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _check_stored(module: nn.Module, where: str, inputs, lora: LoraConfig | None, **shapes) -> None:
    """ValueError naming the layer, the inputs and each stored leaf (kernel, the adapter's) that does not
    fit a call on `inputs` (before `module.param` would report it as an initializer's shape)."""
    if not module.has_variable("params", "kernel"):
        return
    names = lora.variant.leaves() if lora is not None else ()
    stored = {n: module.get_variable("params", n) for n in names if module.has_variable("params", n)}
    # adapters set to None run the base alone (e.g. to compare with the base model): only absent ones are missing
    disabled = bool(names) and len(stored) == len(names) and all(x is None for x in stored.values())
    has_adapters = lora is not None and not disabled and (any(x is not None for x in stored.values())
                                                          or not module.is_initializing())
    L.check_params(f"params/{where} called on inputs {describe(inputs)}", module.get_variable("params", "kernel"),
                   stored, lora_config=lora if has_adapters else None, **shapes)


def _adapters(module: nn.Module, lora: LoraConfig | None, loftq, in_shape, out_shape, lead=()) -> dict | None:
    """The variant's adapter leaves of a bound module, read or created with `module.param` (each drawn
    with its own 'params' rng); loftq: the LoftQ init's leaves of a fresh layer, or None."""
    if lora is None:
        return None
    params = {name: module.param(name, lambda rng, name=name: loftq[name] if loftq is not None else
                                 L.init_params(rng, in_shape, out_shape, lora, lead=lead)[name])
              for name in lora.variant.leaves()}
    return None if all(x is None for x in params.values()) else params  # set to None: the base alone


def _dropout(module: nn.Module, lora: LoraConfig | None, deterministic: bool | None):
    """LoRA dropout of the adapters' input (None: off)."""
    if lora is None or lora.dropout == 0 or deterministic or not module.has_rng("dropout"):
        return None
    key = module.make_rng("dropout")
    return lambda x: L.dropout(x, lora.dropout, key)


def _run(module: nn.Module, inputs, kernel, bias, adapters, lora: LoraConfig | None, quant: QuantConfig | None,
         *, out_shape, backend, deterministic, n_in=None, plan=None):
    """The adapted layer's output in the module's dtype (default: promoted dtype of inputs and kernel)."""
    out_dtype = module.dtype or jnp.promote_types(inputs.dtype, B.kernel_dtype(kernel))
    compute_dtype = (quant.compute_dtype if quant is not None and quant.compute_dtype is not None
                     else out_dtype) if is_quantized(kernel) else out_dtype
    variant = lora.variant if lora is not None else None
    return L.adapted(inputs, kernel, bias, adapters, variant=variant, scaling=lora.scaling if lora is not None else 0.0,
                     out_shape=out_shape, compute_dtype=compute_dtype, out_dtype=out_dtype, n_in=n_in, plan=plan,
                     precision=module.precision, drop=_dropout(module, lora, deterministic), backend=backend,
                     int8_threshold=B.llm_int8_threshold(kernel, quant))


def dense_call(module: nn.Module, inputs, *, axis, features, kernel_init, lora: LoraConfig | None,
          quant: QuantConfig | None, backend: str = "auto", deterministic: bool | None = None,
          flat_kernel_init: bool = False):
    """The QLoRA layer on a bound Dense-like module: reads/creates its variables with `module.param`."""
    features = as_tuple(features)
    axis = tuple(a % inputs.ndim for a in as_tuple(axis))
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

    L.check_layer_configs(lora, quant, where)
    _check_stored(module, where, inputs, lora, in_shape=in_shape, out_shape=features)
    loftq = None
    if L.wants_loftq(lora, quant) and module.is_initializing() and not module.has_variable("params", "kernel"):
        # LoftQ init of a fresh layer: kernel and adapters come from the same dense kernel.
        L.check_rank(lora.r, in_shape, features, where)
        loftq = L.loftq_params(kernel_init_fn(module.make_rng("params")), n_in, lora, quant)
    if module.has_variable("params", "kernel") and is_quantized(module.get_variable("params", "kernel")):
        # already quantized (checked above; maybe in torch's (out, in) storage, which Flax's initializer-shape
        # check would take for a mismatch): read as stored, the codes are never touched
        module.scope.reserve("kernel", "params")
        kernel = module.get_variable("params", "kernel")
    else:
        kernel = module.param("kernel", lambda rng: loftq[0] if loftq is not None else
                              (B.quantize_kernel(kernel_init_fn(rng), n_in, quant) if quant is not None
                               else kernel_init_fn(rng)))
    bias = module.param("bias", lambda rng: meta.unbox(module.bias_init(rng, features, module.param_dtype))) \
        if module.use_bias else None
    if lora is not None:
        L.check_rank(lora.r, in_shape, features, where)
    adapters = _adapters(module, lora, loftq[1] if loftq is not None else None, in_shape, features)
    return _run(module, inputs, kernel, bias, adapters, lora, quant, out_shape=features, backend=backend,
                deterministic=deterministic, n_in=n_in)


def _einsum_call(module: nn.Module, inputs, plan: B.EinsumPlan, shape: tuple[int, ...], *, kernel_init, bias_init,
                 lora: LoraConfig | None, quant: QuantConfig | None, backend: str = "auto",
                 deterministic: bool | None = None):
    """The QLoRA layer of an einsum projection on a bound module (`use_bias`, `dtype`, `precision`).

    plan: the layer's EinsumPlan; shape: its kernel's own shape. kernel_init(rng) / bias_init(rng):
    the dense kernel (shape) and bias (plan.bias_dims(shape)) of a fresh layer. A kernel with batch
    axes is quantized as one (prod(in), prod(out)) matrix per batch index, with adapters
    lora_a (*batch, *in, r) / lora_b (*batch, r, *out).
    """
    where = "/".join(module.scope.path) or "<root>"
    batch, in_shape, out_shape = plan.batch_shape(shape), plan.in_shape(shape), plan.out_shape(shape)

    def kernel_init_fn(rng):
        w = kernel_init(rng)
        return B.quantize_einsum_kernel(plan, w, quant) if quant is not None else w

    L.check_layer_configs(lora, quant, where)
    _check_stored(module, where, inputs, lora, in_shape=in_shape, out_shape=out_shape, stack=batch, dense_shape=shape)
    loftq = None
    if L.wants_loftq(lora, quant) and module.is_initializing() and not module.has_variable("params", "kernel"):
        L.check_rank(lora.r, in_shape, out_shape, where)
        w = B.permute_einsum_kernel(plan, kernel_init(module.make_rng("params")))
        loftq = L.loftq_params(w, len(in_shape), lora, quant, lead=len(batch))
    kernel = module.param("kernel", lambda rng: loftq[0] if loftq is not None else kernel_init_fn(rng))
    bias = module.param("bias", bias_init) if module.use_bias else None
    if lora is not None:
        L.check_rank(lora.r, in_shape, out_shape, where)
    adapters = _adapters(module, lora, loftq[1] if loftq is not None else None, in_shape, out_shape, batch)
    return _run(module, inputs, kernel, bias, adapters, lora, quant, out_shape=out_shape, backend=backend,
                deterministic=deterministic, plan=plan)


def einsum_plan(module: nn.Module, einsum_str: str | None) -> tuple[B.EinsumPlan, tuple[int, ...]]:
    """(plan, kernel shape) of an Einsum-like module (`shape`, `einsum_str`) called with einsum_str."""
    where = "params/" + "/".join(module.scope.path) if module.scope is not None else type(module).__name__
    if (einsum_str is None) == (module.einsum_str is None):
        raise ValueError(f"{where}: give einsum_str either as a field or as a call argument, exactly once")
    shape = tuple(module.shape)
    return B.EinsumPlan(einsum_str if einsum_str is not None else module.einsum_str, where, shape), shape


def einsum_module_call(module: nn.Module, inputs, einsum_str, **kw):
    """The QLoRA layer on a bound Einsum-like module (`shape`, `einsum_str`, `kernel_init`, `bias_init`)."""
    plan, shape = einsum_plan(module, einsum_str)
    return _einsum_call(
        module, inputs, plan, shape,
        kernel_init=lambda rng: meta.unbox(module.kernel_init(rng, shape, module.param_dtype)),
        bias_init=lambda rng: meta.unbox(module.bias_init(rng, plan.bias_dims(shape), module.param_dtype)), **kw)


def dense_general_plan(module: nn.Module, input_shape) -> tuple[B.EinsumPlan, tuple[int, ...]]:
    """(plan, kernel shape (*batch, *in, *features)) of a DenseGeneral-like module with batch_dims
    (`features`, `axis`, `batch_dims`) for inputs of input_shape."""
    where = "params/" + "/".join(module.scope.path) if module.scope is not None else type(module).__name__
    ndim = len(input_shape)
    batch_dims = tuple(d % ndim for d in as_tuple(module.batch_dims))
    if sorted(batch_dims) != list(range(len(batch_dims))):
        raise ValueError(f"{where}: batch_dims {tuple(module.batch_dims)} must be the leading input axes 0, 1, ...")
    axis, features = tuple(a % ndim for a in as_tuple(module.axis)), as_tuple(module.features)
    eq = B.dense_general_einsum(ndim, batch_dims, axis, len(features))
    shape = tuple(input_shape[d] for d in sorted(batch_dims)) + tuple(input_shape[a] for a in axis) + features
    return B.EinsumPlan(eq, where, shape), shape


def dense_general_batched_call(module: nn.Module, inputs, **kw):
    """The QLoRA layer on a bound DenseGeneral-like module with `batch_dims` (an einsum with batch axes)."""
    plan, shape = dense_general_plan(module, inputs.shape)
    batch, features = plan.batch_shape(shape), plan.out_shape(shape)
    n_b, n_in, n_out = (int(np.prod(s)) for s in (batch, plan.in_shape(shape), features))

    def kernel_init(rng):  # nn.DenseGeneral initializes the flattened (prod(batch) * prod(in), prod(features))
        return jnp.reshape(meta.unbox(module.kernel_init(rng, (n_b * n_in, n_out), module.param_dtype)), shape)

    def bias_init(rng):
        return jnp.reshape(meta.unbox(module.bias_init(rng, (n_b * n_out,), module.param_dtype)), batch + features)

    return _einsum_call(module, inputs, plan, shape, kernel_init=kernel_init, bias_init=bias_init, **kw)


def _kw(default):
    """A keyword-only module field, so a layer's own fields (features, ...) stay first and positional."""
    return dataclasses.field(default=default, kw_only=True)


class _QLoRAModule(nn.Module):
    """The fields every Linen QLoRA layer shares with nn.Dense (keyword-only, after each layer's own)."""

    use_bias: bool = _kw(True)
    dtype: Any = _kw(None)
    param_dtype: Any = _kw(jnp.float32)
    precision: Any = _kw(None)
    kernel_init: Any = _kw(nn.linear.default_kernel_init)
    bias_init: Any = _kw(nn.initializers.zeros_init())
    lora_config: LoraConfig | None = _kw(LoraConfig())
    quant_config: QuantConfig | None = _kw(QuantConfig())
    backend: str = _kw("auto")
    deterministic: bool | None = _kw(None)


class QLoRADense(_QLoRAModule):
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

    @nn.compact
    def __call__(self, inputs):
        return dense_call(self, inputs, axis=-1, features=self.features, kernel_init=self.kernel_init,
                     lora=self.lora_config, quant=self.quant_config, backend=self.backend,
                     deterministic=self.deterministic)


class QLoRADenseGeneral(_QLoRAModule):
    """Drop-in for `nn.DenseGeneral`: kernel (*in_axes, *features) quantized as 2-D.

    Variables: params/kernel: QuantizedArray (prod(in_axes), prod(features)) (dense
    (*in_axes, *features) with quant_config=None); params/bias (*features,);
    params/lora_a (*in_axes, r); params/lora_b (r, *features).
    Call: inputs with the `axis` axes contracted -> (..., *features).
    With `batch_dims` (the leading input axes, each index with its own matrix, e.g. one per
    expert): kernel (*batch, *in_axes, *features) is a stack over the batch axes of QuantizedArray
    (prod(in_axes), prod(features)); bias (*batch, *features); lora_a (*batch, *in_axes, r);
    lora_b (*batch, r, *features); output (*batch, *other input axes, *features) as nn.DenseGeneral.
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    batch_dims: Sequence[int] = ()

    @nn.compact
    def __call__(self, inputs):
        if self.batch_dims:
            return dense_general_batched_call(self, inputs, lora=self.lora_config, quant=self.quant_config,
                                               backend=self.backend, deterministic=self.deterministic)
        return dense_call(self, inputs, axis=self.axis, features=self.features, kernel_init=self.kernel_init,
                     lora=self.lora_config, quant=self.quant_config, backend=self.backend,
                     deterministic=self.deterministic, flat_kernel_init=True)


class QLoRAEinsum(_QLoRAModule):
    """Drop-in for `nn.Einsum`: the kernel `shape` permuted to (*in_axes, *out_axes) and quantized as 2-D.

    in_axes are the kernel axes the equation contracts with the input (kernel order), out_axes the
    ones it produces (output order). Variables: params/kernel: QuantizedArray (prod(in), prod(out))
    (the dense kernel of `shape` with quant_config=None); params/bias (*out_axes,) (nn.Einsum's);
    params/lora_a (*in_axes, r); params/lora_b (r, *out_axes). E.g. "btd,dnh->btnh" with shape
    (d, n, h): kernel (d, n*h), lora_a (d, r), lora_b (r, n, h).
    Kernel axes shared by the input and the output (batch axes: per-expert / per-head weights of a
    batched matmul) give one matrix per batch index: the kernel is a QuantizedArray stacked over
    the batch axes (kernel order), the bias nn.Einsum's (batch and out axes in output order),
    lora_a (*batch, *in_axes, r), lora_b (*batch, r, *out_axes). E.g. "etd,edh->eth" with shape
    (e, d, h): kernel stack (e,) of (d, h), lora_a (e, d, r), lora_b (e, r, h).
    """

    shape: Sequence[int]
    einsum_str: str | None = None

    @nn.compact
    def __call__(self, inputs, einsum_str: str | None = None):
        return einsum_module_call(self, inputs, einsum_str, lora=self.lora_config, quant=self.quant_config,
                                   backend=self.backend, deterministic=self.deterministic)

