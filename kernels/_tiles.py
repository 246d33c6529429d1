"""Shared pieces of the Pallas kernels: the static weight description, validation, tile decode.

A kernel works in the weight's *storage* orientation: `(K, N)` for a plain weight, `(N, K)`
for a transposed (torch `(out, in)`) one. A tile of storage rows [r0, r0 + tr) and columns
[c0, c0 + tc) is decoded from its packed codes and absmax with shifts and masks, then the
codebook through a 16-entry table passed as an input (or a select tree over Python constants;
kernels may not capture arrays), exactly as `qjax.dequantize` computes it: `code * absmax` in
float32, rounded once to the compute dtype. See `Decode`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from qjax._src.core import formats
from qjax._src.core.blockwise import absmax_f32
from qjax._src.core.codes import lookup
from qjax._src.core.family import is_quantized
from qjax._src.core.qarray import QuantizedArray

_FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
_INV_127 = float(np.float32(1 / 127))


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Static facts a kernel needs about a structured 2-D QuantizedArray of logical shape (K, N)."""

    format: str
    blocksize: int
    transposed: bool
    k: int
    n: int
    double_quant: bool = False

    @property
    def bits(self) -> int:
        return formats.get_format(self.format).bits

    @property
    def storage(self) -> tuple[int, int]:
        return (self.n, self.k) if self.transposed else (self.k, self.n)

    @property
    def code(self) -> tuple[float, ...] | None:
        book = formats.get_format(self.format).codebook
        return None if book is None else tuple(float(v) for v in book.code)


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def weight_spec(x_shape, q: QuantizedArray, dtype, kernel: str) -> WeightSpec:
    """Validates x's shape and q's layout for a Pallas kernel; raises ValueError naming what fails.

    The layout questions are the array's (`q.kernel_problems()`: only a structured 2-D
    QuantizedArray of a format the kernels decode answers none); x's shape and the dtype are here.
    """
    if not is_quantized(q):
        raise TypeError(f"{kernel}: q must be a quantized array, got {type(q).__name__}")
    problems = list(q.kernel_problems())
    if len(x_shape) < 1 or (q.ndim == 2 and x_shape[-1] != q.shape[0]):
        problems.append(f"x shape={tuple(x_shape)} must be (..., K) with K={q.shape[0] if q.ndim else '?'}")
    if np.dtype(dtype) not in _FLOAT_DTYPES:
        problems.append(f"compute dtype {np.dtype(dtype).name} is not float32, bfloat16 or float16")
    if problems:
        raise ValueError(f"{kernel} cannot take x shape={tuple(x_shape)} with {q!r}: " + "; ".join(problems))
    q.check_leaves(kernel)
    return WeightSpec(q.format, q.blocksize, q.transposed, q.shape[0], q.shape[1], q.double_quant)


def storage_operands(q: QuantizedArray):
    """(codes, absmax) as 2-D storage-oriented arrays; nested statistics decoded once, in XLA.

    codes: (R, C * bits / 8) uint8/int8; absmax: (R, C / blocksize) float32.
    """
    return q.packed, absmax_f32(q)


@dataclasses.dataclass(frozen=True)
class Decode:
    """How the Triton-backend kernels decode a tile (static; part of their tuning configs).

    table:  4-bit codes through a 16-entry float32 table load (`tl.load(table + idx)`, an
            L1-resident gather: ~1 load per element) instead of a 15-select tree.
    nested: double-quantized absmax decoded in the kernel (uint8 code -> 256-entry dynamic
            table, times the nested absmax of its 256-block, plus the offset), so only
            4.127 bits per parameter cross HBM; otherwise an XLA prologue writes float32 absmax.
    """

    table: bool = True
    nested: bool = True


def weight_operands(q: QuantizedArray, decode: Decode) -> tuple:
    """The arrays a Triton-backend kernel reads for q: codes, absmax, then the optional tables.

    Order: codes (R, C * bits / 8); absmax (R, C / bs) float32, or its uint8 codes when decoded
    in-kernel; [codebook (16,) float32]; [dynamic code (256,), nested absmax, offset (1,)].
    """
    nested = decode.nested and q.double_quant
    ops = [q.packed, q.absmax if nested else absmax_f32(q)]
    if decode.table and q.spec.bits == 4:
        ops.append(jnp.asarray(q.spec.codebook.code))
    if nested:
        ops += [jnp.asarray(formats.DYNAMIC_CODE), q.nested_absmax, q.offset.reshape(1)]
    return tuple(ops)


def reference(x, q: QuantizedArray, compute_dtype=None):
    """The oracle of every kernel: `x @ dequantize(q)` with float32 accumulation, in compute_dtype."""
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    w = q.dequantize(dtype)
    y = jnp.matmul(x.astype(dtype), w, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
    return y.astype(dtype)


# ----------------------------------------------------------------------------- in-kernel decode


def decode_values(codes, spec: WeightSpec, table_ref=None):
    """Codes tile (tr, tc * bits / 8) -> (tr, tc) float32 code values (before the absmax).

    4-bit codes go through `table_ref` (a (16,) float32 ref) when given, else a select tree.
    """
    if spec.bits == 8:
        return codes.astype(jnp.float32)
    hi = (codes >> 4).astype(jnp.int32)
    lo = (codes & 0xF).astype(jnp.int32)
    tr, half = codes.shape
    idx = jnp.stack([hi, lo], axis=-1).reshape(tr, 2 * half)  # first of a pair in the high nibble
    if table_ref is not None:
        return pltr.load(table_ref.at[idx])
    return lookup(idx, spec.code)


def expand_absmax(a, tc: int):
    """(tr, nb) per-block absmax -> (tr, tc), each value repeated over its block's columns."""
    tr, nb = a.shape
    rep = tc // nb
    return jnp.broadcast_to(a[:, :, None], (tr, nb, rep)).reshape(tr, tc)


def scale(vals, absmax, spec: WeightSpec, dtype):
    """`code * absmax` in float32 (int8: `(code * absmax) / 127` as qjax.dequantize), rounded to dtype."""
    w = vals * absmax
    if spec.bits == 8:
        w = w * _INV_127
    return w.astype(dtype)


def load_weight_tile(wrefs, spec: WeightSpec, decode: Decode, r0, c0, tr: int, tc: int, dtype):
    """Dequantized storage tile [r0, r0 + tr) x [c0, c0 + tc) (Triton/interpret), zeros outside.

    wrefs: refs in `weight_operands` order. Masked loads give code 0 and absmax 0 outside the
    array, so tails contribute exact zeros.
    """
    codes_ref, absmax_ref, *tables = wrefs
    table_ref = tables.pop(0) if decode.table and spec.bits == 4 else None
    rows_total, cols_total = spec.storage
    per_byte = 8 // spec.bits
    pc = tc // per_byte
    nb = max(1, tc // spec.blocksize)
    blocks_per_row = cols_total // spec.blocksize
    rows = r0 + jnp.arange(tr, dtype=jnp.int32)[:, None]
    pcols = c0 // per_byte + jnp.arange(pc, dtype=jnp.int32)[None, :]
    codes = pltr.load(codes_ref.at[pl.ds(r0, tr), pl.ds(c0 // per_byte, pc)],
                      mask=(rows < rows_total) & (pcols < cols_total // per_byte), other=0)
    acols = c0 // spec.blocksize + jnp.arange(nb, dtype=jnp.int32)[None, :]
    amask = (rows < rows_total) & (acols < blocks_per_row)
    absmax = pltr.load(absmax_ref.at[pl.ds(r0, tr), pl.ds(c0 // spec.blocksize, nb)], mask=amask, other=0)
    if decode.nested and spec.double_quant:
        dyn_ref, nested_ref, offset_ref = tables
        flat = jnp.where(amask, rows * blocks_per_row + acols, 0)
        scale_ = pltr.load(nested_ref.at[flat // formats.NESTED_BLOCKSIZE])
        absmax = pltr.load(dyn_ref.at[absmax.astype(jnp.int32)]) * scale_ + offset_ref[0]
        absmax = jnp.where(amask, absmax, 0.0)
    values = decode_values(codes, spec, table_ref)
    return scale(values, expand_absmax(absmax, tc), spec, dtype)


def load_x_tile(x_ref, m0, k0, tm: int, tk: int, m: int, k: int):
    rows = m0 + jnp.arange(tm, dtype=jnp.int32)[:, None]
    cols = k0 + jnp.arange(tk, dtype=jnp.int32)[None, :]
    return pltr.load(x_ref.at[pl.ds(m0, tm), pl.ds(k0, tk)], mask=(rows < m) & (cols < k), other=0)


def tile_dot(xt, wt, spec: WeightSpec, precision=None):
    """x tile (tm, tk) times a weight tile in storage orientation -> (tm, tn) float32.

    precision: as for `jax.lax.dot_general`; on float32 tiles Triton reads DEFAULT/HIGH as TF32
    and HIGHEST as IEEE float32 (bf16/f16 products are exact in float32 at any precision).
    """
    contract = 1 if spec.transposed else 0
    return jax.lax.dot_general(xt, wt, (((1,), (contract,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def weight_tile(spec: WeightSpec, decode: Decode, wrefs, k0, n0, tk: int, tn: int, dtype):
    """The weight tile for logical rows [k0, k0 + tk), columns [n0, n0 + tn), in storage orientation."""
    if spec.transposed:
        return load_weight_tile(wrefs, spec, decode, n0, k0, tn, tk, dtype)
    return load_weight_tile(wrefs, spec, decode, k0, n0, tk, tn, dtype)


def num_tiles(n: int, t: int) -> int:
    return -(-n // t)


def flatten_x(x, k: int, dtype):
    lead = tuple(x.shape[:-1])
    return x.reshape(math.prod(lead), k).astype(dtype), lead
