"""QuantizedArray: packed codes plus statistics as a pytree of arrays."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from qjax._src.core import formats


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedArray:
    """A blockwise-quantized array, stored exactly as bitsandbytes stores it.

    Children (the only pytree leaves) are arrays:
      packed:        uint8 codes as a big-endian bit stream: two 4-bit codes a byte with the
                     first in the high nibble, four 2-bit codes a byte, eight 3-bit codes in
                     three bytes (int8 codes for the "int8" format).
      absmax:        float32 per-block absmax, or uint8 codes of it when double-quantized.
      nested_absmax: float32 (ceil(num_blocks / 256),) absmax of the absmax codes, or None.
      offset:        float32 () mean subtracted from absmax before nesting, or None.

    Static aux data: `format`, `blocksize` (None: one absmax per output channel, int8 only),
    the logical `shape` and original `dtype`, and `transposed`: True when the data is stored
    with its last two axes swapped (torch's `(out, in)` order for a logical `(in, out)` kernel).

    Storage is row-major over `storage_shape`. When its last axis is a multiple of the
    blocksize the leaves keep the array's structure (codes `(..., n / 2)`, absmax
    `(..., n / blocksize)`), so they shard along the same axes as the dense array; otherwise
    they are flat, with blocks running across rows as in bitsandbytes.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    format: str = dataclasses.field(metadata={"static": True}, default="nf4")
    blocksize: int | None = dataclasses.field(metadata={"static": True}, default=64)
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True}, default=())
    dtype: Any = dataclasses.field(metadata={"static": True}, default=np.dtype("float32"))
    transposed: bool = dataclasses.field(metadata={"static": True}, default=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """The shape whose row-major flattening the blocks and codes follow."""
        return _swap_last2(self.shape) if self.transposed else self.shape

    @property
    def structured(self) -> bool:
        """True when codes and statistics keep the storage shape's leading axes."""
        return is_structured(self.storage_shape, self.format, self.blocksize)

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.storage_shape, self.blocksize)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes of stacked layers (`jax.vmap` of quantize, scanned models); () for one array.

        `shape` is one layer's logical shape; the children carry these extra leading axes.
        """
        expected = leaf_shapes(self.shape, self.format, self.blocksize, self.transposed)["packed"]
        return tuple(np.shape(self.packed))[: np.ndim(self.packed) - len(expected)]

    @property
    def T(self) -> "QuantizedArray":
        """The transpose of the last two axes; a view that moves no bytes."""
        if self.ndim < 2:
            raise ValueError(f"QuantizedArray.T needs rank >= 2, got shape={self.shape}")
        if self.blocksize is None:
            raise ValueError(f"{self!r}: per-channel int8 scales belong to the output (last) axis, so its "
                             "transpose is not a view; dequantize it or quantize the transpose instead")
        return dataclasses.replace(self, shape=_swap_last2(self.shape), transposed=not self.transposed)

    @property
    def nbytes(self) -> int:
        """Bytes of every leaf: codes, statistics and nested statistics (all stacked layers)."""
        return sum(_leaf_nbytes(x) for x in jax.tree_util.tree_leaves(self))

    def replace(self, **changes) -> "QuantizedArray":
        return dataclasses.replace(self, **changes)

    def _as_dense(self, *_, **__):
        raise TypeError(
            f"a QuantizedArray (shape={self.shape} dtype={np.dtype(self.dtype).name}, {self.format}) was used "
            "as a dense array: convert the model with qjax.linen.convert / qjax.nnx.convert, multiply "
            "with qjax.qmatmul(x, q), or dequantize it first (qjax.dequantize / qjax.dequantize_params)")

    # A model that was not converted gets that TypeError instead of an error deep inside jax, numpy or
    # flax: jnp.asarray / jnp.dot / `@` / flax's promote_dtype call __jax_array__, and lax ops look it
    # up with getattr while abstractifying (a property, so the lookup itself raises); numpy calls
    # __array__; nnx.Linear reads `kernel[...]`.
    __jax_array__ = property(_as_dense)
    __array__ = _as_dense
    __getitem__ = _as_dense

    def __repr__(self) -> str:
        nested = ", double_quant" if self.nested_absmax is not None else ""
        t = ", transposed" if self.transposed else ""
        try:
            stacked = f", stack_shape={self.stack_shape}" if self.stack_shape else ""
        except (TypeError, ValueError, IndexError):  # static data or leaves that do not fit (check_leaves says)
            stacked = ", inconsistent leaves"
        return (f"QuantizedArray(format={self.format!r}, shape={self.shape}{stacked}, "
                f"dtype={np.dtype(self.dtype).name}, blocksize={self.blocksize}{nested}{t})")


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["packed", "absmax", "nested_absmax", "offset"],
    meta_fields=["format", "blocksize", "shape", "dtype", "transposed"],
)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def _swap_last2(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:-2]) + (shape[-1], shape[-2])


def _leaf_nbytes(x: Any) -> int:
    return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


def is_structured(storage_shape: tuple[int, ...], fmt: str, blocksize: int | None) -> bool:
    """Codes keep the leading axes when whole blocks tile the last axis (always for per-channel)."""
    if blocksize is None or not storage_shape:
        return True
    return storage_shape[-1] % blocksize == 0


def num_blocks(storage_shape: tuple[int, ...], blocksize: int | None) -> int:
    if blocksize is None:
        return storage_shape[-1] if storage_shape else 1
    return -(-math.prod(storage_shape) // blocksize)


def leaf_shapes(shape: tuple[int, ...], fmt: str, blocksize: int | None, transposed: bool = False,
                double_quant: bool = False) -> dict[str, tuple[int, ...] | None]:
    """Shapes of the children of a QuantizedArray with the given static data."""
    storage = _swap_last2(tuple(shape)) if transposed else tuple(shape)
    bits = formats.get_format(fmt).bits
    n = math.prod(storage)
    if blocksize is None:  # per-channel int8: codes keep the shape, one absmax per logical column
        packed, absmax = storage, (shape[-1],)
    elif is_structured(storage, fmt, blocksize):
        packed = storage[:-1] + (storage[-1] * bits // 8,)
        absmax = storage[:-1] + (storage[-1] // blocksize,)
    else:
        packed = (-(-n * bits // 8),)
        absmax = (num_blocks(storage, blocksize),)
    nested = offset = None
    if double_quant:
        nested = (-(-math.prod(absmax) // formats.NESTED_BLOCKSIZE),)
        offset = ()
    return {"packed": packed, "absmax": absmax, "nested_absmax": nested, "offset": offset}


def check_leaves(q: QuantizedArray, where: str = "", stacked: bool = False) -> None:
    """Raises ValueError if the children's shapes or dtypes disagree with the static data.

    stacked: also accept leaves that all carry the same extra leading axes (`q.stack_shape`).
    """
    prefix = f"{where}: " if where else ""
    static = _static_problems(q)
    if static:
        raise ValueError(f"{prefix}QuantizedArray has invalid static data: {static}")
    expected = leaf_shapes(q.shape, q.format, q.blocksize, q.transposed, q.double_quant)
    code_dtype = np.int8 if q.format == "int8" else np.uint8
    dtypes = {"packed": code_dtype, "absmax": np.uint8 if q.double_quant else np.float32,
              "nested_absmax": np.float32, "offset": np.float32}
    stack = ()
    if stacked and hasattr(q.packed, "shape"):
        lead = len(np.shape(q.packed)) - len(expected["packed"])
        stack = tuple(np.shape(q.packed))[:max(lead, 0)]
    problems = []
    for name, shape in expected.items():
        leaf = getattr(q, name)
        if shape is None:
            if leaf is not None:
                problems.append(f"{name} should be None")
            continue
        if leaf is None:
            problems.append(f"{name} is missing")
            continue
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            problems.append(f"{name} is a {type(leaf).__name__}, not an array")
            continue
        shape = stack + tuple(shape)
        if tuple(np.shape(leaf)) != shape or np.dtype(leaf.dtype) != dtypes[name]:
            problems.append(f"{name} has shape={tuple(np.shape(leaf))} dtype={np.dtype(leaf.dtype).name}, "
                            f"expected shape={shape} dtype={np.dtype(dtypes[name]).name}")
    if problems:
        raise ValueError(f"{prefix}{q!r} has inconsistent leaves: " + "; ".join(problems))


def _static_problems(q: QuantizedArray) -> str:
    """What is wrong with q's static data (format, blocksize, shape, transposed), or ""."""
    if q.format not in formats.FORMATS:
        return f"format={q.format!r} is not one of {sorted(formats.FORMATS)}"
    shape = q.shape
    if not isinstance(shape, tuple) or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return f"shape={shape!r} is not a tuple of ints >= 0"
    if q.blocksize is None and (q.format != "int8" or not shape):
        return f"blocksize=None (per channel) needs format 'int8' and rank >= 1, got format={q.format!r} shape={shape}"
    if q.blocksize is not None and q.blocksize not in formats.BLOCKSIZES:
        return f"blocksize={q.blocksize!r} is not one of {list(formats.BLOCKSIZES)}"
    if q.transposed and len(shape) < 2:
        return f"transposed=True needs rank >= 2, got shape={shape}"
    return ""
