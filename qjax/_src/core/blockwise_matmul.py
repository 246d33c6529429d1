"""The XLA matmul of the bitsandbytes blockwise family: `x @ W` decoding W a chunk of rows at a time.

The dequantization (nibble shifts, a select tree for the codebook, one multiply by the decoded
absmax) is elementwise, so XLA fuses it into a single loop that feeds the dot; a transposed
(torch `(out, in)`) weight is contracted along its stored last axis, so no transpose is
materialized. `QuantizedArray.xla_matmul` is `xla_qmatmul`; it is qmatmul's CPU path and the
oracle the Pallas kernels are tested against.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.core.blockwise import absmax_f32, dequantize_storage
from qjax._src.core.codes import lookup


def _nibble_halves(q, dtype):
    """A structured 4-bit q's values as two (R, C / 2) halves: columns 0, 2, 4, ... and 1, 3, 5, ...

    The high nibble of a byte is the even column, the low nibble the odd one, so the halves
    come without interleaving registers; a block of `blocksize` columns is `blocksize / 2`
    columns of each half. Same numbers as `dequantize`: `code * absmax` in float32, one rounding.
    """
    code = q.spec.codebook.code
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


def _chunk_rows(q, dtype, budget: int) -> int:
    """Storage rows decoded per loop step: whole rows (whole blocks), at most `budget` bytes."""
    rows, cols = q.storage_shape
    if not q.structured:
        return rows  # blocks cross rows: decode the weight in one step
    return int(max(1, min(rows, budget // (cols * np.dtype(dtype).itemsize))))


def _rows_of(q, absmax, packed_rows, absmax_rows):
    """A QuantizedArray of some storage rows of q, its absmax already decoded to float32."""
    n_rows = packed_rows.shape[0] if q.structured else q.storage_shape[0]
    cols = q.storage_shape[1]
    shape = (cols, n_rows) if q.transposed else (n_rows, cols)
    return dataclasses.replace(q, packed=packed_rows, absmax=absmax if absmax_rows is None else absmax_rows,
                               nested_absmax=None, offset=None, shape=shape)


def _rows_product(x2, w, dtype, precision, contract_packed: bool):
    """x2 (M, ·) times the rows of w (storage (rows, C)).

    contract_packed: x2 is (M, C) and the result (rows, M), one column per storage row;
    otherwise x2 is (M, rows) and the result the (M, C) partial sum over these rows.
    A 4-bit w is used as its even/odd nibble halves (no interleaving of the codes).
    """
    four_bit = w.spec.bits == 4 and w.structured
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


def _chunked_qmatmul(x2, q, dtype, precision, contract_packed: bool, budget: int):
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


def xla_qmatmul(x, q, dtype, precision=None, adjoint: bool = False):
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
