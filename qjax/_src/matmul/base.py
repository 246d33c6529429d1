"""The frozen base of a layer: its kernel's 2-D layout, quantization and matmul. Pure functions, no Flax.

A linear layer maps x (..., *in_shape) to (..., *out_shape) with a kernel W. The base kernel is either
a dense array of shape (*in_shape, *out_shape) or a 2-D QuantizedArray (prod(in_shape),
prod(out_shape)): kernels of rank > 2 (attention's (d_model, heads, head_dim)) are quantized over their
flattened in/out axes, so the blocks and the fused matmul see an ordinary (K, N) matrix. Stacked
(scanned) layers carry `lead` extra leading axes on every leaf; `quantize_kernel` quantizes each
layer's slice on its own so that slicing the stacked leaves along those axes gives each layer's
QuantizedArray exactly. Einsum kernels with batch axes (per-expert weights, `EinsumPlan`) are stacks
of the same kind over their batch axes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.core.family import QuantizedBase, is_quantized
from qjax._src.core.qarray import QuantizedArray
from qjax._src.matmul.qmatmul import explicit_leaf_sharding, qmatmul
from qjax._src.matmul.sharded import qmatmul_sharded

def size_of(shape: Sequence[int]) -> int:
    """The number of elements of an array of `shape` (1 for ())."""
    return int(math.prod(shape))



def quantize_kernel(kernel, n_in: int, quant_config, lead: int = 0) -> QuantizedBase:
    """Quantizes a dense kernel (*lead, *in, *out) as a 2-D (prod(in), prod(out)) quantized array.

    quant_config: anything with `quantize(w2d) -> quantized array` (a QuantConfig, or a config of
    another family): the family is whatever it returns.
    With lead > 0 each layer's (or expert's) slice is quantized on its own, one after the other
    (`lax.map`: the codes and statistics of quantizing it alone, bit for bit, and the temporaries
    of one layer at a time), so every leaf gets the leading axes and the static shape is that of
    one layer.
    """
    shape = tuple(kernel.shape)
    in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
    flat = jnp.reshape(kernel, shape[:lead] + (size_of(in_shape), size_of(out_shape)))
    if lead == 0:
        return quant_config.quantize(flat)
    # The NaN/Inf check of `quantize` cannot run on traced slices; do it once on the whole kernel.
    if not isinstance(kernel, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(kernel))):
        raise ValueError(f"kernel of shape={shape} holds NaN/Inf values; quantizing it would give wrong codes")
    q = jax.lax.map(quant_config.quantize, jnp.reshape(flat, (-1,) + flat.shape[lead:]))
    return jax.tree_util.tree_map(lambda a: jnp.reshape(a, shape[:lead] + a.shape[1:]), q)



def llm_int8_threshold(kernel, quant_config):
    """The LLM.int8 threshold for a layer's base matmul, or None when it uses qmatmul.

    A quantized kernel goes through `int8_matmul` when the layer's config `is_llm_int8` (int8,
    blocksize None; a config without that attribute never does); without a config, a kernel that
    `is_llm_int8` (per-channel int8) uses the default threshold 6.0.
    """
    if not is_quantized(kernel):
        return None
    if quant_config is not None:
        return float(quant_config.llm_int8_threshold) if getattr(quant_config, "is_llm_int8", False) else None
    return 6.0 if kernel.is_llm_int8 else None



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
        x2 = jnp.reshape(x, batch + (size_of(x.shape[x.ndim - n_in:]),)).astype(compute_dtype)
        y = int8_matmul(x2, kernel, threshold=int8_threshold)
        return jnp.reshape(y.astype(compute_dtype), batch + tuple(out_shape))
    if backend == "pallas_interpret":  # the Pallas kernels emulated on any backend (tests, CPU)
        backend, interpret = "pallas", True
    if is_quantized(kernel):
        x2 = jnp.reshape(x, batch + (size_of(x.shape[x.ndim - n_in:]),))
        kw = dict(compute_dtype=compute_dtype, backend=backend, interpret=interpret, precision=precision)
        if explicit_leaf_sharding(kernel)[1] is not None:  # Explicit mesh axes: per shard, shard_map
            y = qmatmul_sharded(x2, kernel, **kw)
        else:
            y = qmatmul(x2, kernel, **kw)
        return jnp.reshape(y, batch + tuple(out_shape))
    x, kernel = x.astype(compute_dtype), jnp.asarray(kernel).astype(compute_dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())), precision=precision)



def dense_kernel(kernel, in_shape: Sequence[int], out_shape: Sequence[int], dtype=None):
    """The base kernel as a dense (*in, *out) array (dequantized if quantized)."""
    if is_quantized(kernel):
        w = kernel.dequantize(jnp.float32)
        return jnp.reshape(w, tuple(in_shape) + tuple(out_shape)).astype(dtype or kernel.dtype)
    return jnp.asarray(kernel).astype(dtype or kernel.dtype)



def kernel_dtype(kernel) -> Any:
    return kernel.dtype if is_quantized(kernel) else jnp.asarray(kernel).dtype



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



def permute_einsum_kernel(plan: EinsumPlan, kernel, lead: int = 0):
    """A dense Einsum kernel (*lead, *kernel_shape) permuted to (*lead, *batch, *in, *out)."""
    return jnp.transpose(kernel, tuple(range(lead)) + tuple(lead + p for p in plan.perm))


def quantize_einsum_kernel(plan: EinsumPlan, kernel, quant_config, lead: int = 0) -> QuantizedArray:
    """An Einsum kernel (*lead, *kernel_shape) permuted to (*lead, *batch, *in, *out) and quantized as 2-D
    matrices (prod(in), prod(out)), one per lead and batch index (their axes lead every leaf)."""
    return quantize_kernel(permute_einsum_kernel(plan, kernel, lead), len(plan.in_labels), quant_config,
                           lead=lead + len(plan.batch_labels))
