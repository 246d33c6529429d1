"""NNX QLoRA: QLoRALinear / QLoRALinearGeneral, in-place conversion and merging.

Variable types: the adapters are `flax.nnx.LoRAParam` (Flax's own, so every existing filter keeps
working: `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`, `nnx.DiffState(0, nnx.LoRAParam)`); the
frozen base kernel is a `BaseParam`, a plain `nnx.Variable` subclass (not an `nnx.Param`), so no
Param filter ever selects it. Biases stay `nnx.Param`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qjax._src.adapters import lora as L
from qjax._src.matmul import base as B
from qjax._src.flax import planner as P
from qjax._src.errors import describe
from qjax._src.adapters.config import LoraConfig
from qjax._src.adapters.variant import LoRA
from qjax._src.core.policy import QuantConfig
from qjax._src.core.qarray import is_quantized

LoRAParam = nnx.LoRAParam


class BaseParam(nnx.Variable):
    """The frozen base kernel of a LoRA layer: a QuantizedArray (or a dense array in 16-bit LoRA)."""


class QLoRABase(nnx.Module):
    """Shared state and call of the NNX QLoRA layers (kernel, bias, the adapter variant's leaves, dropout)."""

    def _setup(self, kernel, bias, *, in_shape, out_shape, lead, dtype, param_dtype, precision,
               lora_config, quant_config, backend, rngs, where, batch=()):
        """kernel: dense (*lead, *batch, *in, *out) (quantized here as one 2-D matrix per lead and batch
        index) or already quantized; batch: an einsum's batch axes (one matrix and adapter per index)."""
        L.check_layer_configs(lora_config, quant_config, where)
        self.in_shape, self.out_shape, self.lead = tuple(in_shape), tuple(out_shape), tuple(lead)
        self.batch = tuple(batch)
        stack = self.lead + self.batch
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.lora_config, self.quant_config, self.backend = lora_config, quant_config, backend
        self.where = where
        self.use_bias = bias is not None
        if lora_config is not None:
            L.check_rank(lora_config.r, in_shape, out_shape, where)
        quantize = quant_config if not is_quantized(kernel) else None  # a quantized kernel stays as it is
        key = rngs.params() if lora_config is not None and not L.wants_loftq(lora_config, quantize) else None
        kernel, adapters = P.adapter_params(where, P.KernelLayout(self.in_shape, self.out_shape, lead=stack), kernel,
                                            lora_config, quantize, key)
        self.kernel = BaseParam(kernel)
        self.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
        if lora_config is not None:
            for name, value in adapters.items():
                setattr(self, name, LoRAParam(value))
        else:
            for name in LoRA.leaves():  # the adapter slots stay, empty
                setattr(self, name, nnx.data(None))
        if lora_config is not None and lora_config.dropout > 0:
            self.lora_dropout = nnx.Dropout(lora_config.dropout, rngs=rngs)
        else:
            self.lora_dropout = nnx.data(None)

    def _dense_shape(self) -> tuple[int, ...]:
        """A dense (16-bit LoRA) kernel's shape without the stacked layers' axes: (*batch, *in, *out)."""
        return self.batch + self.in_shape + self.out_shape

    def _check(self, x) -> None:
        """ValueError naming the layer, x and each leaf (set with `nnx.update` or `set_value`) that does not fit.

        Inside `nnx.vmap` / `nnx.scan` over stacked layers the leaves come without the `lead` axes.
        """
        if x is not None and tuple(x.shape[x.ndim - len(self.in_shape):]) != self.in_shape:
            raise ValueError(f"{self.where}: x ({describe(x)}) must end in the layer's in_shape {self.in_shape}")
        kernel = self.kernel.get_value()
        n_lead = len(kernel.stack_shape) - len(self.batch) if is_quantized(kernel) else \
            jnp.ndim(kernel) - len(self._dense_shape())
        lead = self.lead if n_lead == len(self.lead) else ()
        L.check_params(self.where, kernel, self.adapters(), lora_config=self.lora_config, in_shape=self.in_shape,
                       out_shape=self.out_shape, stack=lead + self.batch, dense_shape=lead + self._dense_shape())

    def adapters(self) -> dict | None:
        """{leaf: value} of the LoraConfig variant's adapter leaves (absent ones None), or None without adapters."""
        if self.lora_config is None:
            return None
        nodes = {name: getattr(self, name, None) for name in self.lora_config.variant.leaves()}
        return {name: node.get_value() if node is not None else None for name, node in nodes.items()}

    def _operands(self, x):
        """(kernel, bias, out dtype, compute dtype of the base matmul) for input x."""
        kernel = self.kernel.get_value()
        bias = self.bias.get_value() if self.bias is not None else None
        out_dtype = self.dtype or jnp.promote_types(x.dtype, B.kernel_dtype(kernel))
        compute = out_dtype
        if is_quantized(kernel) and self.quant_config is not None and self.quant_config.compute_dtype is not None:
            compute = self.quant_config.compute_dtype
        return kernel, bias, out_dtype, compute

    def _run(self, x, plan: B.EinsumPlan | None = None):
        """The adapted layer on x: Dense-like (plan None) or the einsum `plan` (kernel (*batch, *in, *out)
        quantized, or dense in plan.rhs order)."""
        self._check(x if plan is None else None)
        kernel, bias, out_dtype, compute = self._operands(x)
        lora = self.lora_config
        return L.adapted(x, kernel, bias, self.adapters(), variant=lora.variant if lora is not None else None,
                         scaling=lora.scaling if lora is not None else 0.0, out_shape=self.out_shape,
                         compute_dtype=compute, out_dtype=out_dtype, n_in=len(self.in_shape), plan=plan,
                         precision=self.precision, drop=self.lora_dropout, backend=self.backend,
                         int8_threshold=B.llm_int8_threshold(kernel, self.quant_config))

    def _apply(self, x):
        return self._run(x)

    def _einsum_apply(self, x, plan: B.EinsumPlan):
        return self._run(x, plan)

    def merged_kernel(self, dtype=None) -> jax.Array:
        """The kernel with the adapter folded in (the variant's merge; LoRA: W + scaling * A @ B) as a dense
        array in the layer's layout (*lead, *batch, *in, *out) (default dtype: the kernel's original)."""
        self._check(None)
        kernel, lora = self.kernel.get_value(), self.lora_config
        kw = dict(variant=lora.variant if lora is not None else None, scaling=lora.scaling if lora is not None else 0.0,
                  dtype=dtype or B.kernel_dtype(kernel))
        return B.vmap_lead(lambda k, p: self._merged_one(k, p, **kw), len(self.lead))(kernel, self.adapters())

    def _merged_one(self, kernel, params, **kw) -> jax.Array:
        """One stacked layer's merged kernel (*batch, *in, *out) (`merged_kernel`)."""
        fn = lambda k, p: L.merged_params(k, p, in_shape=self.in_shape, out_shape=self.out_shape, **kw)  # noqa: E731
        return B.vmap_lead(fn, len(self.batch))(kernel, params)


class QLoRALinear(QLoRABase):
    """Drop-in for `nnx.Linear`: frozen quantized kernel plus trainable LoRA adapters.

    in_features, out_features, use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as
    nnx.Linear. lora_config (None: no adapters), quant_config (None: 16-bit LoRA), backend.
    Attributes: kernel: BaseParam(QuantizedArray (in, out)); bias: Param (out,); lora_a:
    LoRAParam (in, r); lora_b: LoRAParam (r, out). Call: x (..., in) -> (..., out).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, precision=None, kernel_init=nnx.initializers.lecun_normal(),
                 bias_init=nnx.initializers.zeros_init(), lora_config: LoraConfig | None = LoraConfig(),
                 quant_config: QuantConfig | None = QuantConfig(), backend: str = "auto", rngs: nnx.Rngs,
                 _kernel=None, _bias=None, _lead=(), _where: str = "QLoRALinear"):
        self.in_features, self.out_features = in_features, out_features
        kernel = _kernel if _kernel is not None else kernel_init(rngs.params(), (in_features, out_features),
                                                                 param_dtype)
        bias = _bias if _bias is not None or not use_bias else bias_init(rngs.params(), (out_features,), param_dtype)
        self._setup(kernel, bias, in_shape=(in_features,), out_shape=(out_features,), lead=_lead, dtype=dtype,
                    param_dtype=param_dtype, precision=precision, lora_config=lora_config,
                    quant_config=quant_config, backend=backend, rngs=rngs, where=_where)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, lora_config, quant_config, *, rngs, backend="auto",
                    where: str = "") -> "QLoRALinear":
        """Wraps an existing nnx.Linear (its kernel (*lead, in, out) quantized, its bias kept)."""
        kernel = linear.kernel.get_value()
        bias = linear.bias.get_value() if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, use_bias=bias is not None, dtype=linear.dtype,
                   param_dtype=linear.param_dtype, precision=linear.precision, lora_config=lora_config,
                   quant_config=quant_config, backend=backend, rngs=rngs, _kernel=kernel, _bias=bias,
                   _lead=kernel.shape[:-2], _where=where or "QLoRALinear")

    def __call__(self, x):
        return self._apply(x)


class QLoRALinearGeneral(QLoRABase):
    """Drop-in for `nnx.LinearGeneral` (contracting the trailing `len(in_features)` axes).

    Attributes: kernel: BaseParam(QuantizedArray (prod(in), prod(out))); bias: Param (*out,);
    lora_a: LoRAParam (*in_features, r); lora_b: LoRAParam (r, *out_features).
    Call: x (..., *in_features) -> (..., *out_features).
    With `batch_axis` ({leading input axis: size}, each index with its own matrix, e.g. one per
    expert): kernel a stack over the batch axes of QuantizedArray (prod(in), prod(out)); bias
    Param (*batch, *out); lora_a (*batch, *in_features, r); lora_b (*batch, r, *out_features);
    x (*batch, ..., *in_features) -> (*batch, ..., *out_features).
    """

    def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int], *,
                 axis: int | Sequence[int] = -1, batch_axis=None, use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32,
                 precision=None, kernel_init=nnx.initializers.lecun_normal(),
                 bias_init=nnx.initializers.zeros_init(), lora_config: LoraConfig | None = LoraConfig(),
                 quant_config: QuantConfig | None = QuantConfig(), backend: str = "auto", rngs: nnx.Rngs,
                 _module: nnx.LinearGeneral | None = None, _where: str = "QLoRALinearGeneral"):
        if _module is not None:
            self._from(_module, lora_config, quant_config, rngs=rngs, backend=backend, where=_where)
            return
        dense = nnx.LinearGeneral(in_features, out_features, axis=axis, batch_axis=batch_axis or {}, use_bias=use_bias,
                                  dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
                                  bias_init=bias_init, rngs=rngs)
        self._from(dense, lora_config, quant_config, rngs=rngs, backend=backend, where="QLoRALinearGeneral")

    @classmethod
    def from_linear_general(cls, m: nnx.LinearGeneral, lora_config, quant_config, *, rngs,
                            backend="auto", where: str = "") -> "QLoRALinearGeneral":
        """Wraps an existing nnx.LinearGeneral (kernel (*lead, *batch, *in, *out) quantized as 2-D matrices,
        bias kept)."""
        return cls(m.in_features, m.out_features, axis=m.axis, lora_config=lora_config, quant_config=quant_config,
                   backend=backend, rngs=rngs, _module=m, _where=where or "QLoRALinearGeneral")

    def _from(self, m, lora_config, quant_config, *, rngs, backend, where):
        n = len(m.axis)
        if tuple(m.axis) != tuple(range(-n, 0)):
            raise ValueError(f"{where}: nnx.LinearGeneral must contract the trailing axes given as negative "
                             f"numbers (axis={m.axis}, batch_axis={dict(m.batch_axis)}) to be converted")
        kernel = m.kernel.get_value()
        bias = m.bias.get_value() if m.bias is not None else None
        in_shape, out_shape = tuple(m.in_features), tuple(m.out_features)
        self.in_features, self.out_features, self.axis = in_shape, out_shape, tuple(m.axis)
        self.batch_axis = dict(m.batch_axis)
        batch = tuple(self.batch_axis[k] for k in sorted(self.batch_axis))
        self._setup(kernel, bias, in_shape=in_shape, out_shape=out_shape,
                    lead=kernel.shape[:kernel.ndim - len(batch) - n - len(out_shape)], dtype=m.dtype,
                    param_dtype=m.param_dtype, precision=m.precision, lora_config=lora_config,
                    quant_config=quant_config, backend=backend, rngs=rngs, where=where, batch=batch)

    def __call__(self, x):
        if not self.batch_axis:
            return self._apply(x)
        eq = B.dense_general_einsum(x.ndim, range(len(self.batch_axis)), self.axis, len(self.out_features))
        return self._einsum_apply(x, B.EinsumPlan(eq))


def einsum_plan(m: nnx.Einsum, where: str) -> B.EinsumPlan:
    """The EinsumPlan of an nnx.Einsum; ValueError naming `where`, the equation and the kernel shape."""
    if m.einsum_str is None:
        raise ValueError(f"{where}: nnx.Einsum without an einsum_str at construction (kernel shape "
                         f"{tuple(m.kernel_shape)}) cannot be converted")
    return B.EinsumPlan(m.einsum_str, where, m.kernel_shape)


class QLoRAEinsum(QLoRABase):
    """Drop-in for `nnx.Einsum` (einsum_str given at construction): kernel permuted to (*in, *out), quantized as 2-D.

    in axes: the kernel axes the equation contracts with the input (kernel order); out axes: the
    ones it produces (output order). E.g. "btd,dnh->btnh" with kernel_shape (d, n, h): kernel
    BaseParam(QuantizedArray (d, n*h)) (the dense kernel of kernel_shape with quant_config=None),
    bias Param (n, h), lora_a LoRAParam (d, r), lora_b LoRAParam (r, n, h).
    Kernel axes shared by the input and the output (batch axes: per-expert / per-head weights of a
    batched matmul) give one matrix per batch index: e.g. "etd,edh->eth" with kernel_shape
    (e, d, h): kernel BaseParam(QuantizedArray (d, h) stacked over e), bias Param (e, h),
    lora_a (e, d, r), lora_b (e, r, h).
    """

    def __init__(self, einsum_str: str, kernel_shape: Sequence[int], bias_shape: Sequence[int] | None = None, *,
                 dtype=None, param_dtype=jnp.float32, precision=None, kernel_init=nnx.initializers.lecun_normal(),
                 bias_init=nnx.initializers.zeros_init(), lora_config: LoraConfig | None = LoraConfig(),
                 quant_config: QuantConfig | None = QuantConfig(), backend: str = "auto", rngs: nnx.Rngs,
                 _module: nnx.Einsum | None = None, _where: str = "QLoRAEinsum"):
        if _module is None:
            _module = nnx.Einsum(einsum_str, kernel_shape, bias_shape, dtype=dtype, param_dtype=param_dtype,
                                 precision=precision, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        m, where = _module, _where
        plan = einsum_plan(m, where)
        shape = tuple(m.kernel_shape)
        kernel = m.kernel.get_value()
        lead = tuple(kernel.shape[:kernel.ndim - len(shape)])
        in_shape, out_shape = plan.in_shape(shape), plan.out_shape(shape)
        bias = m.bias.get_value() if m.bias is not None else None
        self.einsum_str, self.kernel_shape = plan.einsum_str, shape
        self.bias_shape = tuple(m.bias_shape) if m.bias_shape is not None else None
        if bias is not None:
            bias = jnp.reshape(bias, lead + plan.bias_dims(shape))
        if quant_config is not None and not is_quantized(kernel):
            # (*lead, *kernel_shape) -> (*lead, *batch, *in, *out); _setup quantizes it (or runs LoftQ) as 2-D.
            kernel = B.permute_einsum_kernel(plan, kernel, len(lead))
        self._setup(kernel, bias, in_shape=in_shape, out_shape=out_shape, lead=lead, dtype=m.dtype,
                    param_dtype=m.param_dtype, precision=m.precision, lora_config=lora_config,
                    quant_config=quant_config, backend=backend, rngs=rngs, where=where,
                    batch=plan.batch_shape(shape))

    @classmethod
    def from_einsum(cls, m: nnx.Einsum, lora_config, quant_config, *, rngs, backend="auto",
                    where: str = "") -> "QLoRAEinsum":
        """Wraps an existing nnx.Einsum (kernel (*lead, *kernel_shape) quantized as 2-D, bias kept)."""
        return cls(m.einsum_str, m.kernel_shape, m.bias_shape, lora_config=lora_config, quant_config=quant_config,
                   backend=backend, rngs=rngs, _module=m, _where=where or "QLoRAEinsum")

    def __call__(self, x, einsum_str: str | None = None):
        if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
            raise ValueError(f"QLoRAEinsum was converted for {self.einsum_str!r}; called with {einsum_str!r}")
        return self._einsum_apply(x, B.EinsumPlan(self.einsum_str))

    def _dense_shape(self) -> tuple[int, ...]:
        return self.kernel_shape  # a dense Einsum kernel keeps its own layout

    def _merged_one(self, kernel, params, **kw) -> jax.Array:
        """One stacked layer's merged kernel in the Einsum's own layout `kernel_shape`."""
        return L.einsum_merged_params(B.EinsumPlan(self.einsum_str), kernel, params, kernel_shape=self.kernel_shape,
                                      **kw)

