"""PartitionSpec arithmetic on a mesh: the pieces every quantized family's leaf specs are built from.

Pure functions of specs, shapes and `mesh.shape` (a Mesh or AbstractMesh); nothing is placed.
"""

from __future__ import annotations

import math
from typing import Any

from jax.sharding import PartitionSpec

SpecLike = Any  # PartitionSpec | None


def entry_axes(entry) -> tuple[str, ...]:
    """The mesh axis names of one PartitionSpec entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def shard_count(mesh, entry) -> int:
    """How many shards one PartitionSpec entry splits an axis into on `mesh`."""
    return math.prod(mesh.shape[a] for a in entry_axes(entry))


def normalize(spec: SpecLike, ndim: int, mesh, what: str) -> tuple:
    """spec as a tuple of ndim entries (None-padded); checks its length and mesh axis names.

    Raises TypeError for a spec that is not a PartitionSpec or None, ValueError (naming `what`)
    for too many entries, an axis not in the mesh or an axis used twice.
    """
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


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def as_spec(entries) -> PartitionSpec:
    """A PartitionSpec of `entries` without trailing Nones."""
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def check_even(dim: int, size: int, shards: int, entry, what: str) -> None:
    """Raises ValueError (naming `what`, the axis and the shard counts that work) unless shards divide size."""
    if size % shards:
        raise ValueError(f"{what}: axis {dim} of size {size} cannot be split evenly over mesh axes "
                         f"{entry!r} ({shards} shards); shard counts that work: {divisors(size)}")


def swap_last2(seq: tuple) -> tuple:
    """A shape or spec with its last two entries swapped (a transposed view's storage order)."""
    return tuple(seq[:-2]) + (seq[-1], seq[-2])
