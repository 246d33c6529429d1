"""LoRA math shared by the Linen and NNX layers: pure functions of arrays, no Flax.

A LoRA linear layer maps x (..., *in_shape) to (..., *out_shape) with a frozen base kernel W (see
`qjax._src.matmul.base`) and trainable adapters A (*in_shape, r), B (r, *out_shape):

    y = x . W  (+ bias)  +  scaling * dropout(x) . A . B

Einsum kernels with batch axes (per-expert weights) get one adapter pair per batch index; their
products are vmapped over those axes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from qjax._src.errors import describe, float_dtype
from qjax._src.core.qarray import is_quantized
from qjax._src.matmul.base import (EinsumPlan, _prod, base_matmul, dense_kernel, vmap_lead)
from qjax._src.matmul.qmatmul import explicit_sharding

def check_rank(r: int, in_shape: Sequence[int], out_shape: Sequence[int], where: str) -> None:
    """Raises ValueError unless 1 <= r <= min(prod(in_shape), prod(out_shape))."""
    k, n = _prod(in_shape), _prod(out_shape)
    if not 1 <= r <= min(k, n):
        raise ValueError(f"{where}: LoRA rank r={r} must be in [1, min(in={k}, out={n})={min(k, n)}] "
                         f"for a layer of in_shape={tuple(in_shape)} out_shape={tuple(out_shape)}; "
                         "lower LoraConfig.r or exclude this layer")


def check_layer(where: str, kernel, lora_a, lora_b, *, in_shape: Sequence[int], out_shape: Sequence[int],
                stack: Sequence[int] = (), r: int | None = None, dense_shape: Sequence[int] | None = None) -> None:
    """Raises ValueError, naming `where` and every leaf that does not fit, for a layer's stored leaves.

    kernel: a 2-D QuantizedArray (prod(in), prod(out)) stacked over `stack`, or dense of shape
    `dense_shape` (default (*stack, *in, *out)); None skips it. r: the adapters'
    rank (None: the layer has no adapters, lora_a / lora_b are not checked), lora_a
    (*stack, *in, r), lora_b (*stack, r, *out).
    """
    in_shape, out_shape, stack = tuple(in_shape), tuple(out_shape), tuple(stack)
    problems = []
    if is_quantized(kernel):
        want = (_prod(in_shape), _prod(out_shape))
        if tuple(kernel.shape) != want or tuple(kernel.stack_shape) != stack:
            problems.append(f"kernel is a QuantizedArray of shape {tuple(kernel.shape)} stacked "
                            f"{tuple(kernel.stack_shape)}, expected shape {want} stacked {stack}")
    elif kernel is not None:
        want = tuple(dense_shape) if dense_shape is not None else stack + in_shape + out_shape
        if tuple(np.shape(kernel)) != want:
            problems.append(f"kernel ({describe(kernel)}) should have shape {want}")
    if r is not None:
        for name, x, want in (("lora_a", lora_a, stack + in_shape + (r,)), ("lora_b", lora_b, stack + (r,) + out_shape)):
            if x is None:
                problems.append(f"{name} is missing")
            elif tuple(np.shape(x)) != want:
                problems.append(f"{name} ({describe(x)}) should have shape {want}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems) + f" (a layer of in_shape={in_shape}, "
                         f"out_shape={out_shape}{f', r={r}' if r is not None else ''}"
                         f"{f', stacked {stack}' if stack else ''}); do the variables or the inputs belong to "
                         "another model or LoraConfig?")


def check_layer_configs(lora_config, quant_config, where: str) -> None:
    """A QLoRA layer's lora_config (None or a LoraConfig) and quant_config (None or a QuantConfig); TypeError otherwise."""
    from qjax._src.adapters.config import LoraConfig
    from qjax._src.core.policy import QuantConfig

    for name, value, cls in (("lora_config", lora_config, LoraConfig), ("quant_config", quant_config, QuantConfig)):
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"{where}: {name} must be a qjax.{cls.__name__} or None, got {value!r} ({describe(value)})")


def check_merge_args(dtype, requantize) -> None:
    """`merge`'s dtype (None or a float dtype: an int one would truncate the merged kernels) and
    requantize (None or a QuantConfig); TypeError otherwise."""
    from qjax._src.core.policy import QuantConfig

    if dtype is not None:
        float_dtype(dtype, "merge dtype")
    if requantize is not None and not isinstance(requantize, QuantConfig):
        raise TypeError(f"requantize must be a qjax.QuantConfig or None, got {requantize!r} ({describe(requantize)})")



def init_adapters(key, in_shape: Sequence[int], out_shape: Sequence[int], r: int, init: str,
                  dtype=jnp.float32, lead: Sequence[int] = ()):
    """(lora_a (*lead, *in_shape, r), lora_b (*lead, r, *out_shape)) as PEFT initializes them.

    init "default": A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's kaiming_uniform_(a=sqrt(5)),
    PEFT's default), B = 0. "gaussian": A ~ N(0, 1/r^2), B = 0. Either way B = 0, so the adapted
    layer starts out computing exactly what its base computes.
    "loftq" needs the base weight and a quantizer (`loftq_kernel`); here, for a layer whose base
    stays dense (16-bit LoRA, or a layer a QuantRules keeps in 16 bits), there is no quantization
    error to correct, so it falls back to "default" (the layer computes the original one).
    """
    in_shape, out_shape, lead = tuple(in_shape), tuple(out_shape), tuple(lead)
    a_shape = lead + in_shape + (r,)
    if init in ("default", "loftq"):
        bound = 1.0 / math.sqrt(_prod(in_shape))
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    elif init == "gaussian":
        a = jax.random.normal(key, a_shape, jnp.float32) / r
    else:
        raise ValueError(f"Unknown LoRA init {init!r}. It needs to be one of ['default', 'gaussian', 'loftq'].")
    b = jnp.zeros(lead + (r,) + out_shape, dtype)
    return a.astype(dtype), b



def loftq_kernel(kernel, n_in: int, lora_config, quant_config, lead: int = 0):
    """LoftQ init of one layer (or a stack of `lead`-axis layers): (q, lora_a, lora_b).

    kernel: dense (*lead, *in, *out) (Einsum kernels permuted first, `permute_einsum_kernel`, their
    batch axes counted in `lead`): the first `n_in` axes after lead are the in axes. Each layer's
    kernel is flattened to (prod(in), prod(out)) and initialized by `qjax.loftq_init` (rank
    lora_config.r, lora_config.loftq_iter iterations, the scaling folded in); stacked layers are
    handled one by one with vmap. Returns q: a 2-D QuantizedArray (with the lead axes on its
    leaves, like `quantize_kernel`), lora_a (*lead, *in, r), lora_b (*lead, r, *out), float32, with
    `x . deq(q) + scaling * x . lora_a . lora_b ≈ x . kernel`.
    """
    from qjax._src.adapters.loftq import loftq_init

    shape = tuple(kernel.shape)
    in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
    flat = jnp.reshape(kernel, shape[:lead] + (_prod(in_shape), _prod(out_shape)))
    if lead and not isinstance(kernel, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(kernel))):
        raise ValueError(f"kernel of shape={shape} holds NaN/Inf values; quantizing it would give wrong codes")
    q, a, b = vmap_lead(lambda w: loftq_init(w, lora_config, quant_config), lead)(flat)
    r = lora_config.r
    return (q, jnp.reshape(a, shape[:lead] + in_shape + (r,)).astype(jnp.float32),
            jnp.reshape(b, shape[:lead] + (r,) + out_shape).astype(jnp.float32))



def wants_loftq(lora_config, quant_config) -> bool:
    """True when a layer with these configs is initialized by LoftQ (a quantized base and init="loftq")."""
    return lora_config is not None and quant_config is not None and lora_config.init == "loftq"



def _explicit_delta_shardings(x, a, b, n_in: int):
    """Output specs of the two adapter dots on a mesh with Explicit axes (None elsewhere).

    Explicit axes make a dot over a sharded contraction ambiguous; the adapter's rank axis is
    small, so x @ A is reduced to x's batch sharding, and (x @ A) @ B is split like B's out axes.
    """
    specs = [explicit_sharding(t)[1] for t in (x, a, b)]
    if all(s is None for s in specs):
        return None, None
    pad = lambda spec, n: tuple(spec or ()) + (None,) * (n - len(tuple(spec or ())))  # noqa: E731
    batch = pad(specs[0], x.ndim)[: x.ndim - n_in]
    out = pad(specs[2], b.ndim)[1:]
    return PartitionSpec(*batch, None), PartitionSpec(*batch, *out)


def lora_delta(x, lora_a, lora_b, *, n_in: int, scaling: float, precision=None):
    """scaling * x (..., *in) . A (*in, r) . B (r, *out) -> (..., *out), in the promoted dtype of x and A."""
    dtype = jnp.promote_types(x.dtype, lora_a.dtype)
    x, a, b = x.astype(dtype), lora_a.astype(dtype), lora_b.astype(dtype)
    h_sharding, y_sharding = _explicit_delta_shardings(x, a, b, n_in)
    h = jax.lax.dot_general(x, a, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
                            precision=precision, out_sharding=h_sharding)
    y = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=precision,
                            out_sharding=y_sharding)
    return y * jnp.asarray(scaling, dtype)


def dropout(x, rate: float, key):
    """Inverted dropout of x with keep probability 1 - rate (identity for rate 0 or key None)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def lora_linear(x, kernel, bias, lora_a, lora_b, *, n_in: int, out_shape: Sequence[int], scaling: float,
                compute_dtype, out_dtype, precision=None, dropout_rate: float = 0.0, dropout_key=None,
                backend: str = "auto", interpret: bool = False, int8_threshold: float | None = None):
    """The adapted layer: (base(x) + bias + scaling * dropout(x) A B) cast to out_dtype.

    x: (..., *in). kernel: see `base_matmul`. bias: (*out) or None. lora_a/lora_b: (*in, r) /
    (r, *out), or both None (a quantized layer without adapters). The base runs in compute_dtype
    (bitsandbytes' compute dtype), the adapters in the promoted dtype of x and lora_a (PEFT), and
    the sum is cast to out_dtype, the dtype the original layer returns.
    """
    y = base_matmul(x, kernel, n_in=n_in, out_shape=out_shape, compute_dtype=compute_dtype,
                    precision=precision, backend=backend, interpret=interpret, int8_threshold=int8_threshold)
    if bias is not None:
        bias = jnp.asarray(bias).astype(y.dtype)
        y = y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)
    if lora_a is not None:
        delta = lora_delta(dropout(x, dropout_rate, dropout_key), lora_a, lora_b, n_in=n_in,
                           scaling=scaling, precision=precision)
        # With B = 0 the delta is exactly zero and the sum is the base output bit for bit.
        dtype = jnp.promote_types(y.dtype, delta.dtype)
        y = (y.astype(dtype) + delta.astype(dtype))
    return y.astype(out_dtype)



def merged_kernel(kernel, lora_a, lora_b, *, in_shape: Sequence[int], out_shape: Sequence[int],
                  scaling: float, dtype) -> jax.Array:
    """W + scaling * A @ B as a dense (*in, *out) array in dtype (the sum is taken in float32)."""
    w = dense_kernel(kernel, in_shape, out_shape, jnp.float32)
    if lora_a is not None:
        k, n, r = _prod(in_shape), _prod(out_shape), lora_a.shape[-1]
        a = jnp.reshape(lora_a.astype(jnp.float32), (k, r))
        b = jnp.reshape(lora_b.astype(jnp.float32), (r, n))
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * np.float32(scaling)
        w = w + jnp.reshape(delta, w.shape)
    return w.astype(dtype)



def einsum_lora(x, plan: EinsumPlan, kernel, bias, lora_a, lora_b, *, out_shape: Sequence[int], scaling: float,
                compute_dtype, out_dtype, precision=None, dropout_rate: float = 0.0, dropout_key=None,
                backend: str = "auto", interpret: bool = False, int8_threshold: float | None = None):
    """An adapted Einsum layer: einsum(x, W) (+ bias) + scaling * dropout(x) . A . B, in the equation's layout.

    kernel: a QuantizedArray (prod(in), prod(out)) of the kernel permuted to (*batch, *in, *out),
    stacked over the batch axes (one matrix per batch index; goes through `qmatmul`, vmapped over
    the batch axes), or the dense kernel in its own layout (computed with `jnp.einsum` as
    nn.Einsum does). bias: (*bias_labels) in output order, or None. lora_a (*batch, *in, r),
    lora_b (*batch, r, *out) (one adapter per batch index), or both None. out_shape: the out axes'
    sizes (in output order). Returns out_dtype.
    """
    x2, kept = plan.to_in_last(x)
    n_in, n_batch = len(plan.in_labels), len(plan.batch_labels)
    if is_quantized(kernel):
        base = lambda xb, k: base_matmul(xb, k, n_in=n_in, out_shape=out_shape,  # noqa: E731
                                         compute_dtype=compute_dtype, precision=precision, backend=backend,
                                         interpret=interpret, int8_threshold=int8_threshold)
        y = plan.to_result(vmap_lead(base, n_batch)(x2, kernel), kept, x.ndim)
    else:
        y = jnp.einsum(plan.einsum_str, x.astype(compute_dtype), jnp.asarray(kernel).astype(compute_dtype),
                       precision=precision)
    if bias is not None:
        bias = jnp.asarray(bias).astype(y.dtype)
        y = y + jnp.reshape(bias, plan.bias_shape(x.ndim, bias.shape))
    if lora_a is not None:
        delta = vmap_lead(lambda xb, a, b: lora_delta(xb, a, b, n_in=n_in, scaling=scaling, precision=precision),
                          n_batch)(dropout(x2, dropout_rate, dropout_key), lora_a, lora_b)
        delta = plan.to_result(delta, kept, x.ndim)
        dtype = jnp.promote_types(y.dtype, delta.dtype)
        y = y.astype(dtype) + delta.astype(dtype)
    return y.astype(out_dtype)


def einsum_merged_kernel(plan: EinsumPlan, kernel, lora_a, lora_b, *, kernel_shape: Sequence[int],
                         scaling: float, dtype) -> jax.Array:
    """W + scaling * A @ B as a dense kernel in the Einsum's own layout `kernel_shape` (per batch index)."""
    in_shape, out_shape = plan.in_shape(kernel_shape), plan.out_shape(kernel_shape)
    if not is_quantized(kernel):
        kernel = jnp.transpose(jnp.asarray(kernel), plan.perm)
    fn = lambda k, a, b: merged_kernel(k, a, b, in_shape=in_shape, out_shape=out_shape,  # noqa: E731
                                       scaling=scaling, dtype=dtype)
    w = vmap_lead(fn, len(plan.batch_labels))(kernel, lora_a, lora_b)
    return jnp.transpose(w, plan.inverse_perm())
