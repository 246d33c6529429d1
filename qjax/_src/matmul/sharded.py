"""qmatmul under `jax.shard_map`: each device multiplies its slice of x by its slice of the codes.

Under `jit` on a mesh with Auto axes the plain `qmatmul` (XLA path) is partitioned by XLA
without gathering the codes. This wrapper is for what plain `jit` cannot partition: Pallas
kernels (a bare `pallas_call` is not partitioned) and meshes with Explicit axes (where the
dequantization's reshapes and gathers on sharded operands are rejected).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec

from qjax._src.core.qarray import QuantizedArray, is_quantized
from qjax._src.matmul.qmatmul import explicit_sharding, qmatmul
from qjax._src.core.quantize import decode_absmax, flat_index
from qjax._src.sharding.specs import as_spec, entry_axes, normalize, quantized_leaf_specs, shard_count


def _local_absmax(codes, nested, offset, leaf_spec, full_shape):
    """Decodes this device's slice of double-quantized absmax using its global flat positions."""
    entries = tuple(leaf_spec) + (None,) * (len(full_shape) - len(tuple(leaf_spec)))
    origin = []
    for d, e in enumerate(entries):
        axes = entry_axes(e)
        origin.append(jax.lax.axis_index(axes) * codes.shape[d] if axes else 0)
    return decode_absmax(codes, nested, offset, flat_index(codes.shape, origin, full_shape))


def _weight_spec_from_codes(q: QuantizedArray, packed_spec) -> PartitionSpec:
    """The logical (K, N) spec a QuantizedArray's codes spec comes from (inverse of the layout rule)."""
    entries = tuple(packed_spec) + (None,) * (np.ndim(q.packed) - len(tuple(packed_spec)))
    storage = entries if len(entries) == 2 else (entries[0], None)  # flat codes: leading storage axis
    return as_spec(storage[::-1] if q.transposed else storage)


def qmatmul_sharded(x, q: QuantizedArray, mesh=None, spec=None, *, x_spec=None, **qmatmul_kwargs):
    """x (..., K) @ q (K, N) -> (..., N), computed shard by shard under `jax.shard_map`.

    mesh: a Mesh (Auto or Explicit axes). spec: PartitionSpec of the weight over its logical
    (K, N) axes, as given to `shard_params`. x_spec: PartitionSpec of x (default: replicated
    batch, K split like the weight's K). On a mesh with Explicit axes the shardings are part of
    the arrays' types, and mesh, spec and x_spec default to what the types say. The output is split like x's batch axes and the
    weight's N axis; a split K is reduced with `psum`. The codes are never gathered.
    Extra keyword arguments go to `qmatmul` (compute_dtype, backend, interpret, precision).
    Raises ValueError if x_spec splits K differently from the weight, or reuses N's mesh axes.
    """
    if not is_quantized(q) or q.ndim != 2:
        raise ValueError(f"qmatmul_sharded needs a 2-D QuantizedArray (K, N), got {q!r}")
    if mesh is None or spec is None:
        typed_mesh, packed_spec = explicit_sharding(q.packed)
        if typed_mesh is None:
            raise ValueError("qmatmul_sharded needs mesh= and spec= (the weight's PartitionSpec over (K, N)): "
                             "only arrays on a mesh with Explicit axes carry their sharding in their type")
        mesh = mesh if mesh is not None else typed_mesh
        spec = spec if spec is not None else _weight_spec_from_codes(q, packed_spec)
        if x_spec is None:
            x_spec = explicit_sharding(x)[1]
    k_entry, n_entry = normalize(spec, 2, mesh, f"weight spec for {q!r}")
    if x_spec is None:
        x_spec = PartitionSpec(*([None] * (x.ndim - 1)), k_entry)
    xs = normalize(x_spec, x.ndim, mesh, "x_spec")
    if entry_axes(xs[-1]) != entry_axes(k_entry):
        raise ValueError(f"x_spec={x_spec} splits x's K axis over {xs[-1]!r} but the weight's K axis is split "
                         f"over {k_entry!r}; they must match (reshard x, or change the weight spec)")
    batch_axes = {a for e in xs[:-1] for a in entry_axes(e)}
    clash = batch_axes & set(entry_axes(n_entry))
    if clash:
        raise ValueError(f"x_spec={x_spec} splits x's batch over mesh axes {sorted(clash)} that also split the "
                         f"weight's N axis (spec {spec}); use different mesh axes")
    leaf_specs = quantized_leaf_specs(q, spec, mesh)
    local_shape = (q.shape[0] // shard_count(mesh, k_entry), q.shape[1] // shard_count(mesh, n_entry))
    dq = q.double_quant
    absmax_shape = tuple(np.shape(q.absmax))
    k_axes = entry_axes(k_entry)

    def local(xl, packed, absmax, nested=None, offset=None):
        if dq:
            absmax = _local_absmax(absmax, nested, offset, leaf_specs["absmax"], absmax_shape)
        ql = q.replace(packed=packed, absmax=absmax, nested_absmax=None, offset=None, shape=local_shape)
        y = qmatmul(xl, ql, **qmatmul_kwargs)
        return jax.lax.psum(y, k_axes) if k_axes else y

    rep = PartitionSpec()
    args = (x, q.packed, q.absmax) + ((q.nested_absmax, q.offset) if dq else ())
    in_specs = (as_spec(xs), leaf_specs["packed"], leaf_specs["absmax"]) + ((rep, rep) if dq else ())
    out_spec = as_spec(xs[:-1] + (n_entry,))
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)
    return fn(*args)
