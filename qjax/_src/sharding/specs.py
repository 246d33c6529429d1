"""Sharding rules for quantized parameter trees on `jax.sharding` meshes.

A user writes the PartitionSpec they would give the dense kernel (over its logical axes,
`(in, out)` for a Dense kernel); the quantized array derives the specs of its own leaves
(`q.leaf_specs(spec, mesh)`: for a QuantizedArray, codes and absmax split like the dense array
and nested statistics replicated), so that each device holds exactly its slice of them. The
PartitionSpec arithmetic itself lives in `qjax._src.core.partition`; its helpers are re-exported
here for the sharding modules.
"""

from __future__ import annotations

from jax.sharding import NamedSharding

from qjax._src.core.family import QuantizedBase, is_quantized
from qjax._src.core.partition import SpecLike, as_spec, entry_axes, normalize, shard_count

__all__ = ["SpecLike", "as_spec", "entry_axes", "normalize", "quantized_leaf_specs", "quantized_sharding",
           "quantized_sharding_from_spec", "shard_count", "stacked_axes"]


# ----------------------------------------------------------------------------- quantized arrays


def stacked_axes(q: QuantizedBase) -> int:
    """How many leading stacked-layer axes q's leaves carry (`len(q.stack_shape)`), checked."""
    return q.stack_ndim()


def quantized_leaf_specs(q: QuantizedBase, spec: SpecLike, mesh, what: str = "") -> dict:
    """PartitionSpecs of q's leaves for a spec written over q's dense shape (`q.leaf_specs`).

    q: a quantized array (leaves may be ShapeDtypeStructs), possibly stacked: then spec covers
    the stacked axes first, `(L, in, out)`. spec: PartitionSpec (or None: replicated).
    Returns {leaf name: PartitionSpec or None (no leaf)}. Raises ValueError when a split does not
    fit the layout (a block straddling two shards), naming the splits that work.
    """
    return q.leaf_specs(spec, mesh, what)


def quantized_sharding(q: QuantizedBase, sharding: NamedSharding) -> QuantizedBase:
    """The shardings of q's leaves for the sharding a user would give the dense array.

    q: quantized array of logical shape S (leaves may be ShapeDtypeStructs).
    sharding: NamedSharding(mesh, spec) with spec over S (e.g. `(in, out)` of a kernel,
      whatever `q.transposed` is).
    Returns an array of q's family with the same static data whose leaves are NamedShardings
    (None where q has no such leaf): usable as `jax.device_put` target, `jit` in/out
    shardings or an orbax restore target. Raises ValueError when the split does not fit the layout.
    """
    if not is_quantized(q):
        raise TypeError(f"quantized_sharding needs a quantized array, got {type(q).__name__}")
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"quantized_sharding needs a NamedSharding, got {type(sharding).__name__}")
    return quantized_sharding_from_spec(q, sharding.spec, sharding.mesh)


def quantized_sharding_from_spec(q: QuantizedBase, spec: SpecLike, mesh) -> QuantizedBase:
    specs = q.leaf_specs(spec, mesh)
    return q.replace(**{k: (None if s is None else NamedSharding(mesh, s)) for k, s in specs.items()})
