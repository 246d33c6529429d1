"""QuantizedArray: the bitsandbytes blockwise family (nf4/fp4/nf3/nf2/int8, per-channel int8).

Packed codes plus statistics as a pytree of arrays, stored exactly as bitsandbytes stores them.
Everything that depends on the format lives here or in the modules this one uses
(`formats`, `blockwise`, `blockwise_matmul`): callers ask the array.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from qjax._src.core import blockwise, blockwise_matmul, formats, partition
from qjax._src.core.family import QuantizedBase, dtype_name, is_quantized, parse_dtype, register_family, static_field

__all__ = ["QuantizedArray", "is_quantized", "is_structured", "leaf_shapes", "num_blocks"]


def is_structured(storage_shape: tuple[int, ...], blocksize: int | None) -> bool:
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
    storage = partition.swap_last2(tuple(shape)) if transposed else tuple(shape)
    bits = formats.get_format(fmt).bits
    n = math.prod(storage)
    if blocksize is None:  # per-channel int8: codes keep the shape, one absmax per logical column
        packed, absmax = storage, (shape[-1],)
    elif is_structured(storage, blocksize):
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


@register_family("bitsandbytes")
class QuantizedArray(QuantizedBase):
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
    format: str = static_field("nf4")
    blocksize: int | None = static_field(64)
    shape: tuple[int, ...] = static_field(())
    dtype: Any = static_field(np.dtype("float32"))
    transposed: bool = static_field(False)

    # ------------------------------------------------------------------ layout

    @property
    def spec(self) -> formats.Format:
        """The storage format (bits, codebook)."""
        return formats.get_format(self.format)

    @property
    def format_label(self) -> str:
        return self.format

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def is_llm_int8(self) -> bool:
        return self.spec.is_llm_int8(self.blocksize)

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """The shape whose row-major flattening the blocks and codes follow."""
        return partition.swap_last2(self.shape) if self.transposed else self.shape

    @property
    def structured(self) -> bool:
        """True when codes and statistics keep the storage shape's leading axes."""
        return is_structured(self.storage_shape, self.blocksize)

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.storage_shape, self.blocksize)

    def leaf_shapes(self) -> dict:
        shapes = leaf_shapes(self.shape, self.format, self.blocksize, self.transposed, self.double_quant)
        dtypes = {"packed": np.int8 if self.spec.is_linear else np.uint8,
                  "absmax": np.uint8 if self.double_quant else np.float32,
                  "nested_absmax": np.float32, "offset": np.float32}
        return {k: (None if s is None else (s, dtypes[k])) for k, s in shapes.items()}

    @property
    def T(self) -> "QuantizedArray":
        """The transpose of the last two axes; a view that moves no bytes."""
        if self.ndim < 2:
            raise ValueError(f"QuantizedArray.T needs rank >= 2, got shape={self.shape}")
        if self.blocksize is None:
            raise ValueError(f"{self!r}: per-channel int8 scales belong to the output (last) axis, so its "
                             "transpose is not a view; dequantize it or quantize the transpose instead")
        return self.replace(shape=partition.swap_last2(self.shape), transposed=not self.transposed)

    def static_problems(self) -> str:
        if self.format not in formats.FORMATS:
            return f"format={self.format!r} is not one of {sorted(formats.FORMATS)}"
        general = super().static_problems()  # shape, transposed
        if general:
            return general
        if self.blocksize is None and (not self.spec.is_linear or not self.shape):
            return (f"blocksize=None (per channel) needs format 'int8' and rank >= 1, got format={self.format!r} "
                    f"shape={self.shape}")
        if self.blocksize is not None and self.blocksize not in formats.BLOCKSIZES:
            return f"blocksize={self.blocksize!r} is not one of {list(formats.BLOCKSIZES)}"
        return ""

    # ------------------------------------------------------------------ compute

    def decode(self, dtype) -> jax.Array:
        return blockwise.decode_layer(self, dtype)

    def xla_matmul(self, x, dtype, *, precision=None, adjoint: bool = False) -> jax.Array:
        return blockwise_matmul.xla_qmatmul(x, self, dtype, precision, adjoint)

    def kernel_problems(self) -> list[str]:
        problems = []
        if self.ndim != 2:
            problems.append(f"q must be 2-D (K, N), got shape={self.shape}")
        if not self.spec.kernel:
            kernel_formats = [f.name for f in formats.FORMATS.values() if f.kernel]
            problems.append(f"format {self.format!r} is not one of {kernel_formats}")
        if self.blocksize is None:
            problems.append("per-channel int8 (blocksize=None) has no kernel; use backend='xla'")
        elif self.ndim == 2 and not self.structured:
            problems.append(f"the flat layout (storage shape {self.storage_shape}: its last axis is not a multiple "
                            f"of blocksize={self.blocksize}, so blocks cross rows) has no kernel; use backend='xla'")
        return problems

    # ------------------------------------------------------------------ sharding

    def layer_leaf_specs(self, entries: tuple, mesh, what: str) -> dict:
        """Codes and absmax split like the dense array, nested statistics replicated.

        Structured storage (the storage last axis a multiple of the blocksize, or per-channel
        int8): codes `(..., n * bits / 8)` and absmax `(..., n / blocksize)` keep the storage's
        leading axes, so they take the storage spec as is; splitting the last storage axis needs
        every shard to hold whole blocks. Flat storage: blocks run across rows, so only the
        leading storage axis can be split, into shards of whole rows and whole blocks.
        Double quantization: `absmax` holds uint8 codes shaped like the float absmax and takes
        the same spec; `nested_absmax` (one float32 per 256 absmax codes of the *flattened*
        absmax, so a device's slice needs nested values from all over it) and `offset` are
        replicated: about 0.05 % of the nf4 codes' bytes at blocksize 64.
        """
        count = lambda e: partition.shard_count(mesh, e)  # noqa: E731
        storage_shape = self.storage_shape
        storage = partition.swap_last2(entries) if self.transposed else entries
        nested = PartitionSpec() if self.double_quant else None
        out = {"nested_absmax": nested, "offset": nested}

        if self.blocksize is None:  # per-channel int8: codes keep the storage shape, absmax the logical last axis
            for d, (size, e) in enumerate(zip(storage_shape, storage)):
                partition.check_even(d, size, count(e), e, what)
            out.update(packed=partition.as_spec(storage), absmax=partition.as_spec(entries[-1:]))
            return out

        bs = self.blocksize
        axis_hint = (" (the storage last axis is the logical axis -2 because the array is stored transposed)"
                     if self.transposed else "")
        if self.structured:
            for d, (size, e) in enumerate(zip(storage_shape[:-1], storage[:-1])):
                partition.check_even(d, size, count(e), e, what)
            n, k = storage_shape[-1], count(storage[-1])
            if n % (k * bs):
                good_k = [c for c in partition.divisors(n) if (n // c) % bs == 0]
                good_bs = [b for b in formats.BLOCKSIZES if n % (k * b) == 0]
                raise ValueError(
                    f"{what}: splitting the storage last axis (size {n}){axis_hint} over mesh axes "
                    f"{storage[-1]!r} ({k} shards) would cut a block of blocksize={bs} in two: a shard of "
                    f"{n / k:g} elements is not a whole number of blocks. Shard counts that work with "
                    f"blocksize={bs}: {good_k}; blocksizes that work with {k} shards: {good_bs or 'none'}; "
                    "or split another axis.")
            out.update(packed=partition.as_spec(storage), absmax=partition.as_spec(storage))
            return out

        # flat storage: contiguous row-major chunks, so only the leading storage axis may be split
        n_total = math.prod(storage_shape)
        bad = [d for d, e in enumerate(storage) if d > 0 and count(e) > 1]
        k = count(storage[0])
        last = storage_shape[-1]
        fix_bs = [b for b in formats.BLOCKSIZES if last % b == 0]
        why = (f"its storage is flat (blocks run across rows) because the storage last axis ({last}){axis_hint} "
               f"is not a multiple of blocksize={bs}")
        if bad:
            raise ValueError(f"{what}: cannot split storage axis {bad[0]} over mesh axes {storage[bad[0]]!r}: {why}, "
                             f"so only the leading storage axis can be split. Blocksizes that keep the "
                             f"structure: {fix_bs or 'none'}.")
        if k > 1 and (storage_shape[0] % k or (n_total // k) % bs):
            good_k = [c for c in partition.divisors(storage_shape[0]) if (n_total // c) % bs == 0]
            raise ValueError(f"{what}: splitting the leading storage axis (size {storage_shape[0]}) over mesh axes "
                             f"{storage[0]!r} ({k} shards) would cut a block of blocksize={bs} in two: {why}. "
                             f"Shard counts that work: {good_k}; blocksizes that keep the structure: "
                             f"{fix_bs or 'none'}.")
        out.update(packed=partition.as_spec(storage[:1]), absmax=partition.as_spec(storage[:1]))
        return out

    def shard_local(self, leaves: dict, leaf_specs: dict, shape: tuple[int, ...]) -> "QuantizedArray":
        """This device's slice; double-quantized absmax is decoded here from its global flat positions."""
        absmax = leaves["absmax"]
        if self.double_quant:
            full_shape = tuple(np.shape(self.absmax))
            spec = tuple(leaf_specs["absmax"])
            entries = spec + (None,) * (len(full_shape) - len(spec))
            origin = [jax.lax.axis_index(partition.entry_axes(e)) * absmax.shape[d] if partition.entry_axes(e) else 0
                      for d, e in enumerate(entries)]
            absmax = blockwise.decode_absmax(absmax, leaves["nested_absmax"], leaves["offset"],
                                             blockwise.flat_index(absmax.shape, origin, full_shape))
        return self.replace(packed=leaves["packed"], absmax=absmax, nested_absmax=None, offset=None,
                            shape=tuple(shape))

    def logical_spec(self, leaf_specs: dict) -> PartitionSpec:
        """The (K, N) spec the codes' spec comes from (the inverse of `layer_leaf_specs`)."""
        packed_spec = tuple(leaf_specs["packed"] or ())
        entries = packed_spec + (None,) * (np.ndim(self.packed) - len(packed_spec))
        storage = entries if len(entries) == 2 else (entries[0], None)  # flat codes: leading storage axis
        return partition.as_spec(storage[::-1] if self.transposed else storage)

    # ------------------------------------------------------------------ checkpoints

    def metadata(self) -> dict:
        """The static data as JSON; no "family" key, so the metadata of checkpoints written
        before families existed reads back as a QuantizedArray."""
        return {"format": self.format, "blocksize": self.blocksize, "shape": list(self.shape),
                "dtype": dtype_name(self.dtype), "transposed": bool(self.transposed),
                "double_quant": self.double_quant}

    @classmethod
    def from_metadata(cls, meta: dict, leaves: dict) -> "QuantizedArray":
        return cls(packed=leaves.get("packed"), absmax=leaves.get("absmax"),
                   nested_absmax=leaves.get("nested_absmax"), offset=leaves.get("offset"),
                   format=meta["format"], blocksize=meta["blocksize"], shape=tuple(meta["shape"]),
                   dtype=parse_dtype(meta["dtype"]), transposed=bool(meta["transposed"]))

    def __repr__(self) -> str:
        nested = ", double_quant" if self.nested_absmax is not None else ""
        t = ", transposed" if self.transposed else ""
        try:
            stacked = f", stack_shape={self.stack_shape}" if self.stack_shape else ""
        except (TypeError, ValueError, IndexError):  # static data or leaves that do not fit (check_leaves says)
            stacked = ", inconsistent leaves"
        return (f"QuantizedArray(format={self.format!r}, shape={self.shape}{stacked}, "
                f"dtype={np.dtype(self.dtype).name}, blocksize={self.blocksize}{nested}{t})")
