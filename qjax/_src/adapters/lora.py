"""The adapted layer, shared by the Linen and NNX layers and the converters: pure functions of arrays, no Flax.

A layer maps x (..., *in) to (..., *out) with a frozen base kernel W (see `qjax._src.matmul.base`)
and the adapter leaves of its LoraConfig's variant (`qjax._src.adapters.variant`):

    y = x . W  (+ bias)  +  variant.delta(dropout(x), x . W, W)

Einsum kernels with batch axes (per-expert weights) get one adapter per batch index; their
deltas are vmapped over those axes. `lora_linear` is LoRA's (lora_a, lora_b) pair spelled out.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.errors import describe, float_dtype
from qjax._src.core.qarray import is_quantized
from qjax._src.matmul.base import EinsumPlan, base_matmul, dense_kernel, size_of, vmap_lead
from qjax._src.adapters.variant import LoRA

_LORA = LoRA()


def _pair(lora_a, lora_b) -> dict | None:
    return None if lora_a is None and lora_b is None else {"lora_a": lora_a, "lora_b": lora_b}


def check_rank(r: int, in_shape: Sequence[int], out_shape: Sequence[int], where: str) -> None:
    """Raises ValueError unless 1 <= r <= min(prod(in_shape), prod(out_shape))."""
    k, n = size_of(in_shape), size_of(out_shape)
    if not 1 <= r <= min(k, n):
        raise ValueError(f"{where}: LoRA rank r={r} must be in [1, min(in={k}, out={n})={min(k, n)}] "
                         f"for a layer of in_shape={tuple(in_shape)} out_shape={tuple(out_shape)}; "
                         "lower LoraConfig.r or exclude this layer")


def check_params(where: str, kernel, params: Mapping[str, Any] | None, *, lora_config, in_shape: Sequence[int],
                 out_shape: Sequence[int], stack: Sequence[int] = (),
                 dense_shape: Sequence[int] | None = None) -> None:
    """Raises ValueError, naming `where` and every leaf that does not fit, for a layer's stored leaves.

    kernel: a 2-D QuantizedArray (prod(in), prod(out)) stacked over `stack`, or dense of shape
    `dense_shape` (default (*stack, *in, *out)); None skips it. lora_config: None (the layer has
    no adapters, params are not checked) or the LoraConfig whose variant's leaves (rank r,
    stacked over `stack`) params must hold.
    """
    in_shape, out_shape, stack = tuple(in_shape), tuple(out_shape), tuple(stack)
    problems = []
    if is_quantized(kernel):
        want = (size_of(in_shape), size_of(out_shape))
        if tuple(kernel.shape) != want or tuple(kernel.stack_shape) != stack:
            problems.append(f"kernel is a QuantizedArray of shape {tuple(kernel.shape)} stacked "
                            f"{tuple(kernel.stack_shape)}, expected shape {want} stacked {stack}")
    elif kernel is not None:
        want = tuple(dense_shape) if dense_shape is not None else stack + in_shape + out_shape
        if tuple(np.shape(kernel)) != want:
            problems.append(f"kernel ({describe(kernel)}) should have shape {want}")
    r = lora_config.r if lora_config is not None else None
    if lora_config is not None:
        problems += lora_config.variant.check(params or {}, in_shape=in_shape, out_shape=out_shape, r=r, lead=stack)
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems) + f" (a layer of in_shape={in_shape}, "
                         f"out_shape={out_shape}{f', r={r}' if r is not None else ''}"
                         f"{f', stacked {stack}' if stack else ''}); do the variables or the inputs belong to "
                         "another model or LoraConfig?")


def check_layer_configs(lora_config, quant_config, where: str) -> None:
    """A QLoRA layer's lora_config (None or a LoraConfig) and quant_config (None, a QuantConfig, or any config
    with `quantize(w)` returning a quantized array: a custom family's); TypeError otherwise."""
    from qjax._src.adapters.config import LoraConfig

    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"{where}: lora_config must be a qjax.LoraConfig or None, got {lora_config!r} "
                        f"({describe(lora_config)})")
    if quant_config is not None and not callable(getattr(quant_config, "quantize", None)):
        raise TypeError(f"{where}: quant_config must be a qjax.QuantConfig or None, got {quant_config!r} "
                        f"({describe(quant_config)}); a custom family's config needs a quantize(w) method")


def check_merge_args(dtype, requantize) -> None:
    """`merge`'s dtype (None or a float dtype: an int one would truncate the merged kernels) and
    requantize (None or a QuantConfig); TypeError otherwise."""
    from qjax._src.core.policy import QuantConfig

    if dtype is not None:
        float_dtype(dtype, "merge dtype")
    if requantize is not None and not isinstance(requantize, QuantConfig):
        raise TypeError(f"requantize must be a qjax.QuantConfig or None, got {requantize!r} ({describe(requantize)})")


# ----------------------------------------------------------------------------- init


def init_params(key, in_shape: Sequence[int], out_shape: Sequence[int], lora_config, dtype=jnp.float32,
                lead: Sequence[int] = ()) -> dict[str, jax.Array]:
    """{leaf: array}: the adapter of lora_config's variant (rank r, init) for a layer (*in) -> (*out),
    stacked over `lead`; the layer starts out computing its base."""
    return lora_config.variant.init(key, tuple(in_shape), tuple(out_shape), lora_config.r, init=lora_config.init,
                                    dtype=dtype, lead=tuple(lead))


def loftq_params(kernel, n_in: int, lora_config, quant_config, lead: int = 0):
    """(q, {leaf: array}): LoftQ init by lora_config's variant of dense kernel (*lead, *in, *out)
    (Einsum kernels permuted first, `permute_einsum_kernel`, their batch axes counted in `lead`)."""
    return lora_config.variant.loftq(kernel, n_in, lora_config, quant_config, lead)


def wants_loftq(lora_config, quant_config) -> bool:
    """True when a layer with these configs is initialized by LoftQ (a quantized base and init="loftq")."""
    return lora_config is not None and quant_config is not None and lora_config.init == "loftq"


# ----------------------------------------------------------------------------- the layer


def dropout(x, rate: float, key):
    """Inverted dropout of x with keep probability 1 - rate (identity for rate 0 or key None)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _from_result(plan: EinsumPlan, y, kept: str):
    """y in the equation's output order -> (*batch, *kept, *out): the inverse of `plan.to_result`.

    kept: `plan.to_in_last`'s (the ellipsis expanded: its labels are the kept ones the written
    lhs does not name).
    """
    res = plan.res.replace("...", "".join(c for c in kept if c not in plan.lhs))
    src = plan.batch_labels + kept + plan.out_labels
    return y if src == res else jnp.einsum(f"{res}->{src}", y)


def adapted(x, kernel, bias, params: Mapping[str, Any] | None, *, variant, scaling: float, out_shape: Sequence[int],
            compute_dtype, out_dtype, n_in: int | None = None, plan: EinsumPlan | None = None, precision=None,
            drop: Callable | None = None, backend: str = "auto", interpret: bool = False,
            int8_threshold: float | None = None):
    """The adapted layer: (base(x) + bias + variant.delta(drop(x), base(x), W)) cast to out_dtype.

    x: (..., *in) for a Dense-like layer (n_in in axes), or the input of `plan`'s einsum.
    kernel: see `base_matmul` (an Einsum's: a QuantizedArray (prod(in), prod(out)) of the kernel
    permuted to (*batch, *in, *out), stacked over the batch axes, or the dense kernel in its own
    layout). bias: (*out) (an Einsum's: plan.bias_labels) or None. params: the variant's leaves
    (with the einsum's batch axes leading), or None (a layer without adapters). drop: dropout
    applied to the adapter's input (None: none). The base runs in compute_dtype (bitsandbytes'),
    the adapter in its own promoted dtype (PEFT); the sum is cast to out_dtype.
    """
    if plan is None:
        x2, n_batch = x, 0
        base = base_matmul(x, kernel, n_in=n_in, out_shape=out_shape, compute_dtype=compute_dtype,
                           precision=precision, backend=backend, interpret=interpret, int8_threshold=int8_threshold)
        to_result = lambda y: y  # noqa: E731
        bias_shape = lambda b: (1,) * (base.ndim - b.ndim) + b.shape  # noqa: E731
    else:
        x2, kept = plan.to_in_last(x)
        n_in, n_batch = len(plan.in_labels), len(plan.batch_labels)
        if is_quantized(kernel):
            base = vmap_lead(lambda xb, k: base_matmul(xb, k, n_in=n_in, out_shape=out_shape,
                                                       compute_dtype=compute_dtype, precision=precision,
                                                       backend=backend, interpret=interpret,
                                                       int8_threshold=int8_threshold), n_batch)(x2, kernel)
        else:  # as nn.Einsum computes it, then (a transpose) in the adapter's layout
            base = _from_result(plan, jnp.einsum(plan.einsum_str, x.astype(compute_dtype),
                                                 jnp.asarray(kernel).astype(compute_dtype), precision=precision), kept)
            kernel = jnp.transpose(jnp.asarray(kernel), plan.perm)  # one dense matrix per batch index
        to_result = lambda y: plan.to_result(y, kept, x.ndim)  # noqa: E731
        bias_shape = lambda b: plan.bias_shape(x.ndim, b.shape)  # noqa: E731
    y = to_result(base)
    if bias is not None:
        bias = jnp.asarray(bias).astype(y.dtype)
        y = y + jnp.reshape(bias, bias_shape(bias))
    if params is not None:
        xd = drop(x2) if drop is not None else x2
        delta = vmap_lead(lambda p, xb, bb, k: variant.delta(p, xb, bb, k, n_in=n_in, scaling=scaling,
                                                              precision=precision), n_batch)(
            dict(params), xd, base, kernel)
        delta = to_result(delta)
        # With B = 0 the delta is exactly zero and the sum is the base output bit for bit.
        dtype = jnp.promote_types(y.dtype, delta.dtype)
        y = y.astype(dtype) + delta.astype(dtype)
    return y.astype(out_dtype)


def lora_linear(x, kernel, bias, lora_a, lora_b, *, n_in: int, out_shape: Sequence[int], scaling: float,
                compute_dtype, out_dtype, precision=None, dropout_rate: float = 0.0, dropout_key=None,
                backend: str = "auto", interpret: bool = False, int8_threshold: float | None = None):
    """`adapted` with LoRA's pair lora_a (*in, r) / lora_b (r, *out) (both None: no adapters) and dropout."""
    return adapted(x, kernel, bias, _pair(lora_a, lora_b), variant=_LORA, scaling=scaling, out_shape=out_shape,
                   compute_dtype=compute_dtype, out_dtype=out_dtype, n_in=n_in, precision=precision,
                   drop=lambda t: dropout(t, dropout_rate, dropout_key), backend=backend, interpret=interpret,
                   int8_threshold=int8_threshold)


# ----------------------------------------------------------------------------- merge


def merged_params(kernel, params: Mapping[str, Any] | None, *, variant, scaling: float, in_shape: Sequence[int],
                  out_shape: Sequence[int], dtype) -> jax.Array:
    """One matrix's kernel with its adapter folded in (`variant.merge`), dense (*in, *out) in dtype,
    summed in float32. kernel: a 2-D QuantizedArray (prod(in), prod(out)) or dense (*in, *out).
    params: the variant's leaves (no lead axes), or None (the kernel alone; variant unused).
    """
    w = dense_kernel(kernel, tuple(in_shape), tuple(out_shape), jnp.float32)
    if params is not None:
        w = variant.merge(params, w, scaling=scaling)
    return w.astype(dtype)


def einsum_merged_params(plan: EinsumPlan, kernel, params: Mapping[str, Any] | None, *, variant, scaling: float,
                         kernel_shape: Sequence[int], dtype) -> jax.Array:
    """`merged_params` of an Einsum layer, in the Einsum's own layout `kernel_shape` (per batch index)."""
    in_shape, out_shape = plan.in_shape(kernel_shape), plan.out_shape(kernel_shape)
    if not is_quantized(kernel):
        kernel = jnp.transpose(jnp.asarray(kernel), plan.perm)
    fn = lambda k, p: merged_params(k, p, variant=variant, scaling=scaling, in_shape=in_shape,  # noqa: E731
                                    out_shape=out_shape, dtype=dtype)
    w = vmap_lead(fn, len(plan.batch_labels))(kernel, None if params is None else dict(params))
    return jnp.transpose(w, plan.inverse_perm())
