"""qmatmul: `x @ dequantize(W)` without keeping a dense W, with a backward pass for `x`.

Two backends share one `jax.custom_vjp`:
  xla:    pure jnp. The dequantization (nibble shifts, a select tree for the codebook, one
          multiply by the decoded absmax) is elementwise, so XLA fuses it into a single loop
          that feeds the dot; a transposed (torch `(out, in)`) weight is contracted along its
          stored last axis, so no transpose is materialized. The CPU path and the test oracle.
  pallas: the kernels in `qjax.kernels` (Mosaic GPU on Hopper, Triton elsewhere, a split-K
          GEMV kernel for M <= 16); `interpret=True` runs them on the CPU.
  auto:   chosen per lowering platform (`qjax.kernels.dispatch.per_platform`): the kernels
          where the program is lowered for CUDA, the xla path everywhere else.

Gradients: `dx = dy @ W^T` runs through the same machinery: the xla path contracts the
other stored axis, the Pallas path runs its kernels on the view `q.T` (no bytes move). The QuantizedArray is frozen: its cotangent is zeros (float0 for the integer
code leaves), so `jax.grad(..., allow_int=True)` over a tree holding it works and returns
zeros/float0 for it; the usual route is to differentiate only the trainable subtree.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.core import formats
from qjax._src.core.codes import lookup
from qjax._src.core.qarray import QuantizedArray, check_leaves
from qjax._src.core.quantize import _values_f32, absmax_f32
from qjax._src.errors import describe

BACKENDS = ("auto", "xla", "pallas")
_FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


# ----------------------------------------------------------------------------- xla path


def dequantize_storage(q: QuantizedArray, dtype):
    """q's values in storage orientation (`q.storage_shape`), rounded to dtype.

    The same numbers as `dequantize(q, dtype)` (transposed back for a transposed q): the
    float32 product `code * absmax`, one rounding. Statistics are decoded once per block.
    """
    return _values_f32(q, absmax_f32(q)).astype(dtype)


def _nibble_halves(q: QuantizedArray, dtype):
    """A structured 4-bit q's values as two (R, C / 2) halves: columns 0, 2, 4, ... and 1, 3, 5, ...

    The high nibble of a byte is the even column, the low nibble the odd one, so the halves
    come without interleaving registers; a block of `blocksize` columns is `blocksize / 2`
    columns of each half. Same numbers as `dequantize`: `code * absmax` in float32, one rounding.
    """
    code = formats.get_format(q.format).codebook.code
    absmax = absmax_f32(q)  # (R, C / bs), decoded once
    rows, half = q.packed.shape
    per_block = q.blocksize // 2

    def values(nibbles):
        v = lookup(nibbles, code).reshape(rows, half // per_block, per_block) * absmax[..., None]
        return v.reshape(rows, half).astype(dtype)

    return values(q.packed >> 4), values(q.packed & 0xF)


def _dot(a, b, a_axis: int, b_axis: int, precision):
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


# Decoded weight per step of the chunked loop. On the CPU it is sized for the caches: the
# decoded chunk is written and read again at once, and one temporary reused from step to step
# replaces a dense-sized one that costs a page fault per 4 KiB on every call (measured 3-5x
# faster at M <= 16, benchmarks/RESULTS.md). Elsewhere (the XLA path on a GPU) it only bounds
# the temporary of very large layers; smaller ones run as a single step.
CPU_CHUNK_BYTES = 8 << 20
CHUNK_BYTES = 256 << 20


def _chunk_rows(q: QuantizedArray, dtype, budget: int) -> int:
    """Storage rows decoded per loop step: whole rows (whole blocks), at most `budget` bytes."""
    rows, cols = q.storage_shape
    if not q.structured:
        return rows  # blocks cross rows: decode the weight in one step
    return int(max(1, min(rows, budget // (cols * np.dtype(dtype).itemsize))))


def _rows_of(q: QuantizedArray, absmax, packed_rows, absmax_rows):
    """A QuantizedArray of some storage rows of q, its absmax already decoded to float32."""
    n_rows = packed_rows.shape[0] if q.structured else q.storage_shape[0]
    cols = q.storage_shape[1]
    shape = (cols, n_rows) if q.transposed else (n_rows, cols)
    return dataclasses.replace(q, packed=packed_rows, absmax=absmax if absmax_rows is None else absmax_rows,
                               nested_absmax=None, offset=None, shape=shape)


def _rows_product(x2, w: QuantizedArray, dtype, precision, contract_packed: bool):
    """x2 (M, ·) times the rows of w (storage (rows, C)).

    contract_packed: x2 is (M, C) and the result (rows, M), one column per storage row;
    otherwise x2 is (M, rows) and the result the (M, C) partial sum over these rows.
    A 4-bit w is used as its even/odd nibble halves (no interleaving of the codes).
    """
    four_bit = formats.get_format(w.format).bits == 4 and w.structured
    if contract_packed:
        if four_bit:
            hi, lo = _nibble_halves(w, dtype)
            return _dot(hi, x2[:, 0::2], 1, 1, precision) + _dot(lo, x2[:, 1::2], 1, 1, precision)
        return _dot(dequantize_storage(w, dtype), x2, 1, 1, precision)
    if four_bit:
        hi, lo = _nibble_halves(w, dtype)
        even, odd = _dot(x2, hi, 1, 0, precision), _dot(x2, lo, 1, 0, precision)
        return jnp.stack([even, odd], axis=-1).reshape(even.shape[:-1] + (2 * even.shape[-1],))
    return _dot(x2, dequantize_storage(w, dtype), 1, 0, precision)


def _chunked_qmatmul(x2, q: QuantizedArray, dtype, precision, contract_packed: bool, budget: int):
    """x2 (M, K) @ q in float32, decoding `_chunk_rows` storage rows of q per loop step."""
    absmax = absmax_f32(q)  # decoded once for the whole weight
    n_rows = q.storage_shape[0]
    rows = _chunk_rows(q, dtype, budget)
    steps = n_rows // rows
    per_row_absmax = q.blocksize is not None or q.transposed  # per-channel int8 scales columns otherwise
    head = steps * rows

    def rows_slice(start, stop):
        if (start, stop) == (0, n_rows):  # the whole weight (also a flat layout's 1-D leaves)
            return _rows_of(q, absmax, q.packed, None)
        return _rows_of(q, absmax, q.packed[start:stop], absmax[start:stop] if per_row_absmax else None)

    def x_rows(start, stop):
        return x2 if contract_packed else x2[:, start:stop]

    if steps <= 1:
        parts = [_rows_product(x_rows(0, rows), rows_slice(0, rows), dtype, precision, contract_packed)]
    else:
        packed = q.packed[:head].reshape((steps, rows) + q.packed.shape[1:])
        scales = absmax[:head].reshape((steps, rows) + absmax.shape[1:]) if per_row_absmax else None

        def product(args):
            p, a, xc = args
            return _rows_product(x2 if xc is None else xc, _rows_of(q, absmax, p, a), dtype, precision,
                                 contract_packed)

        if contract_packed:
            out = jax.lax.map(product, (packed, scales, None))  # (steps, rows, M)
            parts = [out.reshape((head,) + out.shape[2:])]
        else:
            xs = jnp.moveaxis(x2[:, :head].reshape(x2.shape[0], steps, rows), 1, 0)  # (steps, M, rows)

            def accumulate(acc, args):
                return acc + product(args), None

            acc0 = jnp.zeros((x2.shape[0], q.storage_shape[1]), jnp.float32)
            parts = [jax.lax.scan(accumulate, acc0, (packed, scales, xs))[0]]
    if head < n_rows:
        parts.append(_rows_product(x_rows(head, n_rows), rows_slice(head, n_rows), dtype, precision,
                                   contract_packed))
    if contract_packed:
        return jnp.concatenate(parts, axis=0).T  # (M, rows of storage)
    return sum(parts[1:], parts[0])


def _sees_whole_arrays() -> bool:
    """True when this computation holds whole arrays: one device, or inside `shard_map` over every axis.

    Under GSPMD (plain jit over several devices) the weight may be sharded along the axis the
    loop slices, and the partitioner would gather or reshard it step by step (measured: 2-6x
    the collective bytes of a train step, benchmarks/RESULTS.md), so there it is decoded whole;
    `qmatmul_sharded` (and the QLoRA layers on Explicit meshes) run the loop per shard instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.size == 1 or all(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)
    return jax.device_count() == 1


def xla_qmatmul(x, q: QuantizedArray, dtype, precision=None, adjoint: bool = False):
    """x (..., K) @ q (K, N) in jnp: fused dequantize, then dots with float32 accumulation.

    adjoint=True computes x (..., N) @ q^T instead (the backward pass), on the same storage.
    The stored axis is contracted directly (no transpose of a torch-ordered weight). The weight
    is decoded a chunk of storage rows at a time inside a loop (`CPU_CHUNK_BYTES` per step on
    the CPU, `CHUNK_BYTES` elsewhere), so no dense-sized temporary exists; contracting the
    packed axis gives each chunk's outputs, contracting the row axis sums partial products.
    Under GSPMD over several devices the weight is decoded in one step (`_sees_whole_arrays`).
    A structured 4-bit weight is used as its even/odd nibble halves.
    """
    x = x.astype(dtype)
    contract_packed = bool(q.transposed) != bool(adjoint)  # storage (R, C): contract C?
    x2 = x.reshape(-1, x.shape[-1])

    def run(budget):
        return lambda x2: _chunked_qmatmul(x2, q, dtype, precision, contract_packed, budget)

    if _sees_whole_arrays():
        y = jax.lax.platform_dependent(x2, cpu=run(CPU_CHUNK_BYTES), default=run(CHUNK_BYTES))
    else:
        y = run(math.inf)(x2)
    return y.reshape(x.shape[:-1] + (y.shape[-1],)).astype(dtype)


# ----------------------------------------------------------------------------- dispatch


def _forward(x, q, dtype, backend, interpret, precision, adjoint=False):
    def xla(x, q):
        return xla_qmatmul(x, q, dtype, precision, adjoint)

    if backend == "xla":
        return xla(x, q)
    from qjax.kernels import dispatch  # lazy: Pallas imports are slow and not needed on the CPU

    w = dispatch.adjoint_view(q) if adjoint else q
    if w is None or not dispatch.can_use(x.shape, w, dtype):
        return xla(x, q)  # the backward of a weight whose adjoint no kernel takes (per-channel int8)

    def kernel(x, q):
        w = dispatch.adjoint_view(q) if adjoint else q
        return dispatch.qmatmul(x, w, dtype, interpret=interpret, precision=precision)

    if backend == "pallas":
        return kernel(x, q)
    return dispatch.per_platform(kernel, xla, x, q)  # "auto": the kernels on CUDA, XLA elsewhere


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _qmatmul(x, q, dtype, backend, interpret, precision):
    return _forward(x, q, dtype, backend, interpret, precision)


def _qmatmul_fwd(x, q, dtype, backend, interpret, precision):
    # Residuals: the quantized weight itself (4.1 bits a parameter), never the dense W.
    return _forward(x, q, dtype, backend, interpret, precision), (q, jnp.zeros((), x.dtype))


def _zero_cotangent(leaf):
    if leaf is None:
        return None
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(np.shape(leaf), jax.dtypes.float0)


def _qmatmul_bwd(dtype, backend, interpret, precision, res, dy):
    q, x_proto = res
    dx = _forward(dy.astype(dtype), q, dtype, backend, interpret, precision, adjoint=True)
    return dx.astype(x_proto.dtype), jax.tree_util.tree_map(_zero_cotangent, q)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _resolve_backend(backend: str, x, q: QuantizedArray, dtype, interpret: bool) -> str:
    """"xla", "pallas", or "auto" (decided per lowering platform in `_forward`)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. It needs to be one of {list(BACKENDS)}.")
    if backend == "xla":
        return "xla"
    from qjax.kernels import dispatch

    if backend == "auto":
        return "auto" if dispatch.can_use(x.shape, q, dtype) else "xla"
    dispatch.check(x.shape, q, dtype)  # raises naming the shape/layout a kernel cannot take
    # Traced (jit, export) the kernel is staged for whatever platform it is lowered for; an eager
    # call runs on the default backend, where the kernels need a GPU.
    if not interpret and not isinstance(x, jax.core.Tracer) and jax.default_backend() != "gpu":
        raise ValueError(f"backend='pallas' needs a CUDA GPU (the default backend is "
                         f"{jax.default_backend()!r}); pass interpret=True to emulate the kernels, "
                         "use backend='xla', or trace it for CUDA (jax.export(..., platforms=['cuda'])).")
    return "pallas"


def _check_args(x, q, compute_dtype):
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"qmatmul needs a QuantizedArray for q, got {type(q).__name__}")
    if not hasattr(x, "dtype") or np.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"qmatmul: x must be a float32, bfloat16 or float16 array, got {describe(x)}")
    if q.ndim != 2:
        raise ValueError(f"qmatmul needs a 2-D QuantizedArray of logical shape (K, N), got {q!r}")
    if np.ndim(x) < 1 or np.shape(x)[-1] != q.shape[0]:
        raise ValueError(f"qmatmul: x {describe(x)} must have shape (..., K) with K={q.shape[0]} "
                         f"to multiply {q!r} (logical shape (K, N)={q.shape})")
    if math.prod(np.shape(x)) == 0 or q.size == 0:
        raise ValueError(f"qmatmul: empty operand, x {describe(x)}, q {q!r}")
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qmatmul: compute_dtype must be float32, bfloat16 or float16, got {dtype.name}")
    formats.get_format(q.format)
    check_leaves(q, "qmatmul")
    return dtype


def explicit_sharding(a):
    """(mesh, spec) of an array whose sharding is part of its type (Explicit mesh axes), else (None, None)."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True) or not any(
            t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None, None
    return mesh, sharding.spec


def qmatmul(x, q: QuantizedArray, *, compute_dtype=None, backend: str = "auto", interpret: bool = False,
            precision=None) -> jax.Array:
    """`x @ dequantize(q)` with the dequantization fused into the matmul.

    x: float32/bfloat16/float16 array of shape (..., K); any leading batch dims, any M (incl. 1).
    q: QuantizedArray of logical shape (K, N): nf4/fp4 (optionally double-quantized) or int8
      (blockwise or per-channel), in any layout (structured or flat, `transposed` for weights
      imported from torch in `(out, in)` = `(N, K)` order; their codes are used as stored).
    compute_dtype: dtype of the weight fed to the matmul and of the result (default x.dtype);
      accumulation is float32.
    backend: "xla" (jnp), "pallas" (the kernels in `qjax.kernels`), or "auto": when a kernel takes
      the shape and layout, the kernels where the program is lowered for CUDA and XLA on every other
      platform, chosen per lowering platform (so `jax.export(..., platforms=["cuda"])` from a CPU
      host holds the kernels); XLA otherwise.
    interpret: run the Pallas kernels in interpret mode (CPU emulation, for tests).
    precision: of the dots, as for `jax.lax.dot_general` (the XLA path's dots and the Triton-backend
      kernels'; on a GPU, HIGHEST keeps float32 products out of TF32).
    Returns an array of shape (..., N) in compute_dtype. Differentiable w.r.t. x (the weight is
    frozen: its cotangent is zeros, float0 for integer leaves).
    Raises TypeError for a non-float x or a non-QuantizedArray q; ValueError for mismatched
    shapes, inconsistent leaves, an unknown backend, (backend="pallas") a layout no kernel takes,
    or a q sharded over Explicit mesh axes (use `qmatmul_sharded`).
    """
    dtype = _check_args(x, q, compute_dtype)
    _, spec = explicit_sharding(q.packed)
    if spec is not None and any(e is not None for e in spec):
        raise ValueError(f"{q!r} is sharded over Explicit mesh axes ({spec}), which the fused dequantization "
                         "cannot take under plain jit: call qjax.qmatmul_sharded(x, q) (shard_map; the QLoRA "
                         "layers do this for you), or build the mesh with AxisType.Auto axes")
    x = jnp.asarray(x)
    resolved = _resolve_backend(backend, x, q, dtype, interpret)
    return _qmatmul(x, q, dtype, resolved, bool(interpret), precision)
