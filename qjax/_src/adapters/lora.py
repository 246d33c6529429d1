"""LoRA math shared by the Linen and NNX layers: pure functions of arrays, no Flax.

A LoRA linear layer maps x (..., *in_shape) to (..., *out_shape) with a frozen base kernel W and
trainable adapters A (*in_shape, r), B (r, *out_shape):

    y = x . W  (+ bias)  +  scaling * dropout(x) . A . B

The base kernel is either a dense array of shape (*in_shape, *out_shape) (16-bit LoRA) or a 2-D
QuantizedArray (prod(in_shape), prod(out_shape)): kernels of rank > 2 (attention's
(d_model, heads, head_dim)) are quantized over their flattened in/out axes, so the blocks and the
fused matmul see an ordinary (K, N) matrix.  Stacked (scanned) layers carry `lead` extra leading
axes on every leaf; `quantize_kernel` quantizes each layer's slice on its own so that slicing the
stacked leaves along those axes gives each layer's QuantizedArray exactly. Einsum kernels with batch
axes (per-expert weights, `EinsumPlan`) are stacks of the same kind over their batch axes, with one
adapter pair per batch index; their products are vmapped over those axes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from qjax._src.errors import describe, float_dtype
from qjax._src.core.qarray import QuantizedArray, is_quantized
from qjax._src.matmul.qmatmul import explicit_sharding, qmatmul
from qjax._src.core.quantize import dequantize
from qjax._src.matmul.sharded import qmatmul_sharded


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


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


def quantize_kernel(kernel, n_in: int, quant_config, lead: int = 0) -> QuantizedArray:
    """Quantizes a dense kernel (*lead, *in, *out) as a 2-D (prod(in), prod(out)) QuantizedArray.

    With lead > 0 each layer's (or expert's) slice is quantized on its own, one after the other
    (`lax.map`: the codes and statistics of quantizing it alone, bit for bit, and the temporaries
    of one layer at a time), so every leaf gets the leading axes and the static shape is that of
    one layer.
    """
    shape = tuple(kernel.shape)
    in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
    flat = jnp.reshape(kernel, shape[:lead] + (_prod(in_shape), _prod(out_shape)))
    if lead == 0:
        return quant_config.quantize(flat)
    # The NaN/Inf check of `quantize` cannot run on traced slices; do it once on the whole kernel.
    if not isinstance(kernel, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(kernel))):
        raise ValueError(f"kernel of shape={shape} holds NaN/Inf values; quantizing it would give wrong codes")
    q = jax.lax.map(quant_config.quantize, jnp.reshape(flat, (-1,) + flat.shape[lead:]))
    return jax.tree_util.tree_map(lambda a: jnp.reshape(a, shape[:lead] + a.shape[1:]), q)


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


def llm_int8_threshold(kernel, quant_config):
    """The LLM.int8 threshold for a layer's base matmul, or None when it uses qmatmul.

    A quantized kernel goes through `int8_matmul` when the layer's config `is_llm_int8` (int8,
    blocksize None); without a config, a per-channel int8 kernel uses the default threshold 6.0.
    """
    if not is_quantized(kernel):
        return None
    if quant_config is not None:
        return float(quant_config.llm_int8_threshold) if quant_config.is_llm_int8 else None
    return 6.0 if kernel.format == "int8" and kernel.blocksize is None else None


def base_matmul(x, kernel, *, n_in: int, out_shape: Sequence[int], compute_dtype, precision=None,
                backend: str = "auto", interpret: bool = False, int8_threshold: float | None = None):
    """x (..., *in) . kernel -> (..., *out) in compute_dtype.

    kernel: a 2-D QuantizedArray (K, N) (goes through `qmatmul`) or a dense (*in, *out) array
    (contracted with `lax.dot_general` exactly as nn.Dense / nn.DenseGeneral do it).
    backend: qmatmul's "auto" / "xla" / "pallas", or "pallas_interpret" (Pallas in interpret mode).
    int8_threshold: not None for an LLM.int8 layer (a per-channel int8 kernel): the product is
      `int8_matmul(x, kernel, threshold=int8_threshold)` (activations cast to compute_dtype;
      outlier columns in 16-bit, the rest int8 with int32 accumulation) instead of qmatmul.
    """
    batch = x.shape[:x.ndim - n_in]
    if int8_threshold is not None and is_quantized(kernel):
        from qjax._src.matmul.int8 import int8_matmul
        x2 = jnp.reshape(x, batch + (_prod(x.shape[x.ndim - n_in:]),)).astype(compute_dtype)
        y = int8_matmul(x2, kernel, threshold=int8_threshold)
        return jnp.reshape(y.astype(compute_dtype), batch + tuple(out_shape))
    if backend == "pallas_interpret":  # the Pallas kernels emulated on any backend (tests, CPU)
        backend, interpret = "pallas", True
    if is_quantized(kernel):
        x2 = jnp.reshape(x, batch + (_prod(x.shape[x.ndim - n_in:]),))
        kw = dict(compute_dtype=compute_dtype, backend=backend, interpret=interpret, precision=precision)
        if explicit_sharding(kernel.packed)[1] is not None:  # Explicit mesh axes: per shard, shard_map
            y = qmatmul_sharded(x2, kernel, **kw)
        else:
            y = qmatmul(x2, kernel, **kw)
        return jnp.reshape(y, batch + tuple(out_shape))
    x, kernel = x.astype(compute_dtype), jnp.asarray(kernel).astype(compute_dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())), precision=precision)


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


def dense_kernel(kernel, in_shape: Sequence[int], out_shape: Sequence[int], dtype=None):
    """The base kernel as a dense (*in, *out) array (dequantized if quantized)."""
    if is_quantized(kernel):
        w = dequantize(kernel, jnp.float32)
        return jnp.reshape(w, tuple(in_shape) + tuple(out_shape)).astype(dtype or kernel.dtype)
    return jnp.asarray(kernel).astype(dtype or kernel.dtype)


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


def kernel_dtype(kernel) -> Any:
    return kernel.dtype if is_quantized(kernel) else jnp.asarray(kernel).dtype


# ----------------------------------------------------------------------------- which layers

# Module names "all-linear" leaves alone: PEFT skips the model's output head.
HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "classifier", "score", "output_head")


def _pattern_hits(path: str, pattern) -> bool:
    """A LoRA target pattern matches a module path "a/b/q_proj" in full or as its trailing part (PEFT)."""
    from qjax._src.core.policy import matches_any
    if isinstance(pattern, str) and not pattern.startswith("re:"):
        return matches_any(path, (pattern, "*/" + pattern))
    return matches_any(path, (pattern,))


def select_layers(paths: Sequence[str], lora_config) -> list[str]:
    """The module paths that get adapters.

    Raises ValueError for a target pattern that matches nothing and for a config that selects no
    layer at all (say "all-linear" minus an `exclude` of everything); warns for an `exclude`
    pattern that matches no layer.

    "all-linear": every path whose last name is not an output head (HEAD_NAMES). Otherwise a path
    is chosen when a target pattern matches it in full or matches its trailing names. `exclude`
    patterns always win.
    """
    if lora_config.target_modules == "all-linear":
        chosen = [p for p in paths if p.rsplit("/", 1)[-1].lower() not in HEAD_NAMES]
    else:
        for pattern in lora_config.target_modules:
            if not any(_pattern_hits(p, pattern) for p in paths):
                raise ValueError(f"LoraConfig.target_modules pattern {pattern!r} matches no linear layer; "
                                 f"the linear layers are {list(paths)}")
        chosen = [p for p in paths if any(_pattern_hits(p, t) for t in lora_config.target_modules)]
    for pattern in lora_config.exclude:
        if not any(_pattern_hits(p, pattern) for p in paths):  # PEFT warns too: likely a typo
            warnings.warn(f"LoraConfig.exclude pattern {pattern!r} matches no linear layer, so it excludes nothing; "
                          f"the linear layers are {list(paths)}", stacklevel=3)
    kept = [p for p in chosen if not any(_pattern_hits(p, e) for e in lora_config.exclude)]
    if not kept:
        raise ValueError(f"LoraConfig(target_modules={lora_config.target_modules!r}, exclude={lora_config.exclude!r}) "
                         f"selects no layer for adapters; the linear layers are {list(paths)}. Change the patterns, "
                         "or pass lora_config=None to quantize without adapters")
    return kept


def vmap_lead(fn, lead: int):
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn


# ----------------------------------------------------------------------------- einsum layers


class EinsumPlan:
    """How an Einsum kernel maps onto the (*batch, *in, *out) LoRA form.

    From an equation "lhs,rhs->res" (explicit, two operands, no ellipsis in the kernel): the
    kernel labels contracted with the input (in lhs, not in res) are the in axes, in kernel order;
    the kernel labels that reach the output (in res, not in lhs) are the out axes, in output order;
    kernel labels shared by the input and the output (per-expert / per-head kernels of a batched
    matmul) are the batch axes, in kernel order. Each batch index has its own (prod(in), prod(out))
    matrix. `perm` orders the kernel's axes as (*batch, *in, *out). The bias (nn.Einsum's) has the
    output's kernel labels in output order (`bias_labels`: batch and out axes).
    Raises ValueError (naming `where`, the equation and `shape` when given) for an equation that is
    not such a projection: kernel labels summed over the kernel alone, no in or no out axis,
    repeated labels, an ellipsis in the kernel.
    """

    def __init__(self, einsum_str: str, where: str = "einsum", shape=None):
        eq = einsum_str.replace(" ", "")
        what = f"{where}: einsum_str {einsum_str!r}" + (f" with kernel shape {tuple(shape)}" if shape is not None else "")
        if "->" not in eq or eq.count(",") != 1:
            raise ValueError(f"{what} must be explicit ('->') with exactly two operands")
        ops, res = eq.split("->")
        lhs, rhs = ops.split(",")
        if "." in rhs:
            raise ValueError(f"{what} has an ellipsis in the kernel operand; it cannot be converted")
        if len(set(rhs)) != len(rhs) or len(set(lhs.replace("...", ""))) != len(lhs.replace("...", "")):
            raise ValueError(f"{what} repeats a label within an operand; it cannot be converted")
        if shape is not None and len(shape) != len(rhs):
            raise ValueError(f"{what}: the kernel shape does not fit the equation's kernel operand {rhs!r}")
        lone = [c for c in rhs if c not in lhs and c not in res]
        if lone:
            raise ValueError(f"{what}: kernel axes {lone} are summed over the kernel alone; only kernels whose "
                             "axes are contracted with the input (in), produced (out) or shared by both "
                             "(batch) can be quantized as (prod(in), prod(out)) matrices")
        self.einsum_str, self.lhs, self.rhs, self.res = eq, lhs, rhs, res
        self.batch_labels = "".join(c for c in rhs if c in lhs and c in res)
        self.in_labels = "".join(c for c in rhs if c in lhs and c not in res)
        self.out_labels = "".join(c for c in res if c in rhs and c not in lhs)
        self.bias_labels = "".join(c for c in res if c in rhs)
        if not self.in_labels or not self.out_labels:
            raise ValueError(f"{what} contracts no kernel axis with the input or produces none; it is not a "
                             "linear projection and cannot be converted")
        self.perm = tuple(rhs.index(c) for c in self.batch_labels + self.in_labels + self.out_labels)

    def _sizes(self, labels: str, kernel_shape) -> tuple[int, ...]:
        return tuple(kernel_shape[self.rhs.index(c)] for c in labels)

    def batch_shape(self, kernel_shape) -> tuple[int, ...]:
        return self._sizes(self.batch_labels, kernel_shape)

    def in_shape(self, kernel_shape) -> tuple[int, ...]:
        return self._sizes(self.in_labels, kernel_shape)

    def out_shape(self, kernel_shape) -> tuple[int, ...]:
        return self._sizes(self.out_labels, kernel_shape)

    def bias_dims(self, kernel_shape) -> tuple[int, ...]:
        """The shape of nn.Einsum's bias: the output's kernel axes (batch and out) in output order."""
        return self._sizes(self.bias_labels, kernel_shape)

    def kernel_shape(self, in_shape, out_shape, batch_shape=()) -> tuple[int, ...]:
        """The kernel's own shape from its batch, in and out axes."""
        dims = dict(zip(self.batch_labels + self.in_labels + self.out_labels,
                        tuple(batch_shape) + tuple(in_shape) + tuple(out_shape)))
        return tuple(dims[c] for c in self.rhs)

    def inverse_perm(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.perm))

    def _expanded(self, ndim: int) -> tuple[str, str]:
        """(lhs, res) with the ellipsis replaced by fresh labels for an input of rank ndim."""
        lhs, res = self.lhs, self.res
        if "..." in lhs:
            used = set(self.lhs + self.rhs + self.res)
            fresh = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
            n = ndim - (len(lhs) - 3)
            ell = "".join(fresh[:n])
            lhs, res = lhs.replace("...", ell), res.replace("...", ell)
        if len(lhs) != ndim:
            raise ValueError(f"einsum_str {self.einsum_str!r} expects an input of rank {len(lhs)}, got {ndim}")
        return lhs, res

    def to_in_last(self, x):
        """x (lhs) -> (*batch, *kept, *in): batch axes (kernel order) first, then the other kept input axes
        in input order, the contracted ones last."""
        lhs, res = self._expanded(x.ndim)
        kept = "".join(c for c in lhs if c in res and c not in self.batch_labels)
        target = self.batch_labels + kept + self.in_labels
        if target == lhs:
            return x, kept
        return jnp.einsum(f"{lhs}->{target}", x), kept

    def to_result(self, y, kept: str, ndim: int):
        """y (*batch, *kept, *out) -> the equation's output order."""
        _, res = self._expanded(ndim)
        src = self.batch_labels + kept + self.out_labels
        return y if src == res else jnp.einsum(f"{src}->{res}", y)

    def bias_shape(self, ndim: int, bias_shape) -> tuple[int, ...]:
        """nn.Einsum's broadcast shape of a bias (bias_labels) over the output."""
        _, res = self._expanded(ndim)
        dims = dict(zip(self.bias_labels, bias_shape))
        return tuple(dims.get(c, 1) for c in res)


def dense_general_einsum(ndim: int, batch_dims: Sequence[int], axis: Sequence[int], n_features: int) -> str:
    """The einsum equation of nn.DenseGeneral / nnx.LinearGeneral with batch axes, for an input of rank ndim.

    batch_dims: the leading input axes (0, 1, ...) shared with the kernel; axis: the contracted ones.
    Kernel (*batch, *in (axis order), *features); output (*batch, *other input axes, *features):
    e.g. "abc,acd->abd" for batch_dims=(0,), axis=(2,), one feature axis.
    """
    batch_dims, axis = tuple(d % ndim for d in batch_dims), tuple(a % ndim for a in axis)
    labels = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    lhs, feats = labels[:ndim], labels[ndim:ndim + n_features]
    rhs = "".join(lhs[d] for d in batch_dims) + "".join(lhs[a] for a in axis) + feats
    res = "".join(lhs[d] for d in batch_dims) + "".join(
        c for i, c in enumerate(lhs) if i not in batch_dims and i not in axis) + feats
    return f"{lhs},{rhs}->{res}"


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


def permute_einsum_kernel(plan: EinsumPlan, kernel, lead: int = 0):
    """A dense Einsum kernel (*lead, *kernel_shape) permuted to (*lead, *batch, *in, *out)."""
    return jnp.transpose(kernel, tuple(range(lead)) + tuple(lead + p for p in plan.perm))


def quantize_einsum_kernel(plan: EinsumPlan, kernel, quant_config, lead: int = 0) -> QuantizedArray:
    """An Einsum kernel (*lead, *kernel_shape) permuted to (*lead, *batch, *in, *out) and quantized as 2-D
    matrices (prod(in), prod(out)), one per lead and batch index (their axes lead every leaf)."""
    return quantize_kernel(permute_einsum_kernel(plan, kernel, lead), len(plan.in_labels), quant_config,
                           lead=lead + len(plan.batch_labels))
