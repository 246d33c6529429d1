"""Numerics of the bitsandbytes blockwise family: decoding codes and statistics to float32.

Shared by `QuantizedArray.decode`, its fused XLA matmul and the kernels' prologues. The functions
read a QuantizedArray's leaves and static data (duck-typed, so this module sits below the class);
every rounding is bitsandbytes' (docs/formats.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.core import formats
from qjax._src.core.codes import lookup, unpack_codes

_F32 = jnp.float32
INV_127 = np.float32(1 / 127)


def round_product(x):
    """x unchanged, but a product stays rounded before a following add.

    XLA's CPU and GPU backends contract `a * b + c` into one FMA (one rounding); bitsandbytes
    rounds the product first. A select on `x == x` sits between the two and blocks the
    contraction (optimization_barrier does not survive XLA's CPU pipeline).
    """
    return jnp.where(x == x, x, jnp.zeros_like(x))


def blocks_of(flat, blocksize: int):
    """(n,) -> (num_blocks, blocksize), zero-padding the last block (zeros change no absmax)."""
    n = flat.shape[0]
    pad = -n % blocksize
    return jnp.pad(flat, (0, pad)).reshape(-1, blocksize), n


def stored(x, transposed: bool):
    """x with its last two axes swapped when `transposed` (logical <-> storage orientation)."""
    return jnp.swapaxes(x, -1, -2) if transposed else x


def int8_absmax_axes(ndim: int, transposed: bool) -> tuple[int, ...]:
    """Axes reduced for per-output-channel int8: all but the logical last axis."""
    keep = ndim - 2 if transposed else ndim - 1
    return tuple(a for a in range(ndim) if a != keep)


def flat_index(shape, origin=None, full_shape=None):
    """Row-major flat index into `full_shape` (default `shape`) of every element of a `shape` array.

    origin: per-axis offsets of this array inside the full one (a shard's position), or None.
    Built from iotas, so on a sharded array it stays sharded (no reshape to 1-D).
    """
    full_shape = tuple(full_shape if full_shape is not None else shape)
    idx = jnp.zeros(shape, jnp.int32)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        pos = jax.lax.broadcasted_iota(jnp.int32, shape, d)
        if origin is not None:
            pos = pos + origin[d]
        idx = idx + pos * stride
        stride *= full_shape[d]
    return idx


def decode_absmax(codes, nested_absmax, offset, index):
    """float32 absmax from double-quantized uint8 codes: `code[c] * nested[index // 256] + offset`.

    index: the flat index of each code in the whole absmax (`flat_index`), which picks its
    nested block; the arithmetic (one rounded product, then the add) is bitsandbytes'.
    """
    values = jnp.take(jnp.asarray(formats.DYNAMIC_CODE), codes.astype(jnp.int32))
    scale = jnp.take(nested_absmax, index // formats.NESTED_BLOCKSIZE)
    return round_product(values * scale) + offset


def absmax_f32(q):
    """The float32 absmax of q (double quantization decoded), shaped like `q.absmax`."""
    if q.nested_absmax is None:
        return q.absmax
    return decode_absmax(q.absmax, q.nested_absmax, q.offset, flat_index(q.absmax.shape))


def values_f32(q, absmax):
    """The dequantized float32 values in storage shape."""
    storage = q.storage_shape
    n = math.prod(storage)
    spec = q.spec
    if spec.is_linear:
        codes = q.packed.astype(_F32)
        if q.blocksize is None:
            scale = jnp.expand_dims(absmax, int8_absmax_axes(len(storage), q.transposed))
            return (codes * scale) * INV_127
        idx, mult = codes, INV_127
    else:
        count = storage[-1] if q.structured else n
        idx, mult = unpack_codes(q.packed, spec.bits, count), None
    if q.structured:
        blocks = idx.reshape(storage[:-1] + (storage[-1] // q.blocksize, q.blocksize))
    else:
        blocks, _ = blocks_of(idx.reshape(-1)[:n], q.blocksize)
    if mult is None:
        vals = lookup(blocks, spec.codebook.code) * absmax[..., None]
    else:
        vals = (blocks * absmax[..., None]) * mult
    return vals.reshape(-1)[:n].reshape(storage)


@functools.partial(jax.jit, static_argnames=("dtype",))
def decode_layer(q, dtype) -> jax.Array:
    """One layer of q dequantized to its logical shape in dtype: `code * absmax` in float32, one rounding."""
    out = values_f32(q, absmax_f32(q)).astype(dtype)
    return stored(out, q.transposed)


def dequantize_storage(q, dtype):
    """q's values in storage orientation (`q.storage_shape`), rounded to dtype.

    The same numbers as `decode_layer(q, dtype)` (transposed back for a transposed q): the
    float32 product `code * absmax`, one rounding. Statistics are decoded once per block.
    """
    return values_f32(q, absmax_f32(q)).astype(dtype)
