"""Sharding rules for quantized parameter trees on `jax.sharding` meshes.

A user writes the PartitionSpec they would give the dense kernel (over its logical axes,
`(in, out)` for a Dense kernel); these functions derive the specs of the packed codes and the
statistics, so that each device holds exactly its slice of the codes and the absmax.

Layout facts used here (see `QuantizedArray`):
- structured storage (storage last axis a multiple of the blocksize, or per-channel int8):
  codes `(..., n * bits / 8)` and absmax `(..., n / blocksize)` keep the storage's leading
  axes, so they take the storage spec as is; splitting the last storage axis needs every
  shard to hold whole blocks (`n / shards` a multiple of the blocksize).
- flat storage: blocks run across rows, so only the leading storage axis can be split, into
  shards of whole rows and whole blocks.
- double quantization: `absmax` holds uint8 codes shaped like the float absmax and takes the
  same spec. `nested_absmax` (one float32 per 256 absmax codes of the *flattened* absmax, so a
  device's slice of the absmax needs nested values from all over it) and `offset` (a scalar)
  are replicated: they are `num_blocks / 256` floats, 1/16384 of the element count at
  blocksize 64, i.e. about 0.05 % of the nf4 codes' bytes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qjax._src.core import formats
from qjax._src.core.qarray import QuantizedArray, _swap_last2, is_quantized, is_structured, leaf_shapes

SpecLike = Any  # PartitionSpec | None


# ----------------------------------------------------------------------------- helpers


def entry_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def shard_count(mesh, entry) -> int:
    return math.prod(mesh.shape[a] for a in entry_axes(entry))


def normalize(spec: SpecLike, ndim: int, mesh, what: str) -> tuple:
    """spec as a tuple of ndim entries (None-padded); checks its length and mesh axis names."""
    if spec is None:
        spec = PartitionSpec()
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"{what}: expected a PartitionSpec or None, got {type(spec).__name__} {spec!r}")
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"{what}: {spec} has {len(entries)} entries for a rank-{ndim} array")
    used = []
    for e in entries:
        for a in entry_axes(e):
            if a not in mesh.shape:
                raise ValueError(f"{what}: mesh axis {a!r} of {spec} is not in the mesh "
                                 f"(axes {tuple(mesh.shape)})")
            if a in used:
                raise ValueError(f"{what}: mesh axis {a!r} is used twice in {spec}")
            used.append(a)
    return entries + (None,) * (ndim - len(entries))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def as_spec(entries) -> PartitionSpec:
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _check_even(dim: int, size: int, shards: int, entry, what: str) -> None:
    if size % shards:
        raise ValueError(f"{what}: axis {dim} of size {size} cannot be split evenly over mesh axes "
                         f"{entry!r} ({shards} shards); shard counts that work: {_divisors(size)}")


# ----------------------------------------------------------------------------- QuantizedArray


def stacked_axes(q: QuantizedArray) -> int:
    """How many leading stacked-layer axes q's children carry (`len(q.stack_shape)`), checked."""
    expected = leaf_shapes(q.shape, q.format, q.blocksize, q.transposed, q.double_quant)["packed"]
    lead = np.ndim(q.packed) - len(expected)
    if lead < 0 or tuple(np.shape(q.packed))[lead:] != tuple(expected):
        raise ValueError(f"{q!r} has codes of shape {tuple(np.shape(q.packed))}, which is neither {expected} "
                         "nor that shape under stacked leading axes")
    return lead


def quantized_leaf_specs(q: QuantizedArray, spec: SpecLike, mesh, what: str = "") -> dict:
    """PartitionSpecs of q's children for a spec written over q's logical (dense) shape.

    q: a QuantizedArray (its leaves may be arrays or ShapeDtypeStructs; only static data is read),
      possibly stacked (`stacked_axes`): then spec covers the stacked axes first, `(L, in, out)`.
    spec: PartitionSpec (or None: replicated) over `q.shape`. mesh: a Mesh or AbstractMesh.
    Returns {"packed", "absmax", "nested_absmax", "offset"} -> PartitionSpec or None (no leaf).
    Raises ValueError when a block would straddle two shards, naming the splits that work.
    """
    what = what or repr(q)
    lead = stacked_axes(q)
    if lead:
        entries = normalize(spec, lead + q.ndim, mesh, what)
        for d in range(lead):
            _check_even(d, np.shape(q.packed)[d], shard_count(mesh, entries[d]), entries[d], what)
        one = q.replace(packed=jax.ShapeDtypeStruct(np.shape(q.packed)[lead:], q.packed.dtype))
        inner = quantized_leaf_specs(one, as_spec(entries[lead:]), mesh, what)
        # nested statistics of a stack are per layer, (L, n) and (L,): split like the stacked axes
        return {k: (None if v is None else PartitionSpec(*entries[:lead], *tuple(v)))
                for k, v in inner.items()}
    logical = normalize(spec, q.ndim, mesh, what)
    storage_shape = q.storage_shape
    storage = _swap_last2(logical) if q.transposed else logical
    nested = PartitionSpec() if q.double_quant else None
    out = {"nested_absmax": nested, "offset": nested}

    if q.blocksize is None:  # per-channel int8: codes keep the storage shape, absmax the logical last axis
        for d, (size, e) in enumerate(zip(storage_shape, storage)):
            _check_even(d, size, shard_count(mesh, e), e, what)
        out.update(packed=as_spec(storage), absmax=as_spec(logical[-1:]))
        return out

    bs = q.blocksize
    axis_hint = (" (the storage last axis is the logical axis -2 because the array is stored transposed)"
                 if q.transposed else "")
    if is_structured(storage_shape, q.format, bs):
        for d, (size, e) in enumerate(zip(storage_shape[:-1], storage[:-1])):
            _check_even(d, size, shard_count(mesh, e), e, what)
        n, k = storage_shape[-1], shard_count(mesh, storage[-1])
        if n % (k * bs):
            good_k = [c for c in _divisors(n) if (n // c) % bs == 0]
            good_bs = [b for b in formats.BLOCKSIZES if n % (k * b) == 0]
            raise ValueError(
                f"{what}: splitting the storage last axis (size {n}){axis_hint} over mesh axes "
                f"{storage[-1]!r} ({k} shards) would cut a block of blocksize={bs} in two: a shard of "
                f"{n / k:g} elements is not a whole number of blocks. Shard counts that work with "
                f"blocksize={bs}: {good_k}; blocksizes that work with {k} shards: {good_bs or 'none'}; "
                "or split another axis.")
        out.update(packed=as_spec(storage), absmax=as_spec(storage))
        return out

    # flat storage: contiguous row-major chunks, so only the leading storage axis may be split
    n_total = math.prod(storage_shape)
    bad = [d for d, e in enumerate(storage) if d > 0 and shard_count(mesh, e) > 1]
    k = shard_count(mesh, storage[0])
    last = storage_shape[-1]
    fix_bs = [b for b in formats.BLOCKSIZES if last % b == 0]
    why = (f"its storage is flat (blocks run across rows) because the storage last axis ({last}){axis_hint} "
           f"is not a multiple of blocksize={bs}")
    if bad:
        raise ValueError(f"{what}: cannot split storage axis {bad[0]} over mesh axes {storage[bad[0]]!r}: {why}, "
                         f"so only the leading storage axis can be split. Blocksizes that keep the "
                         f"structure: {fix_bs or 'none'}.")
    if k > 1 and (storage_shape[0] % k or (n_total // k) % bs):
        good_k = [c for c in _divisors(storage_shape[0]) if (n_total // c) % bs == 0]
        raise ValueError(f"{what}: splitting the leading storage axis (size {storage_shape[0]}) over mesh axes "
                         f"{storage[0]!r} ({k} shards) would cut a block of blocksize={bs} in two: {why}. "
                         f"Shard counts that work: {good_k}; blocksizes that keep the structure: "
                         f"{fix_bs or 'none'}.")
    out.update(packed=as_spec(storage[:1]), absmax=as_spec(storage[:1]))
    return out


def quantized_sharding(q: QuantizedArray, sharding: NamedSharding) -> QuantizedArray:
    """The shardings of q's children for the sharding a user would give the dense array.

    q: QuantizedArray of logical shape S (leaves may be ShapeDtypeStructs).
    sharding: NamedSharding(mesh, spec) with spec over S (e.g. `(in, out)` of a kernel,
      whatever `q.transposed` is).
    Returns a QuantizedArray with the same static data whose children are NamedShardings
    (None where q has no such child): usable as `jax.device_put` target, `jit` in/out
    shardings or an orbax restore target. Codes and absmax are split like the dense array;
    nested statistics are replicated. Raises ValueError when a block would straddle shards.
    """
    if not is_quantized(q):
        raise TypeError(f"quantized_sharding needs a QuantizedArray, got {type(q).__name__}")
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"quantized_sharding needs a NamedSharding, got {type(sharding).__name__}")
    return quantized_sharding_from_spec(q, sharding.spec, sharding.mesh)


def quantized_sharding_from_spec(q: QuantizedArray, spec: SpecLike, mesh) -> QuantizedArray:
    specs = quantized_leaf_specs(q, spec, mesh)
    return q.replace(**{k: (None if s is None else NamedSharding(mesh, s)) for k, s in specs.items()})


# ----------------------------------------------------------------------------- LoRA
