"""qmatmul under `jax.shard_map`: each device multiplies its slice of x by its slice of the codes.

Under `jit` on a mesh with Auto axes the plain `qmatmul` (XLA path) is partitioned by XLA
without gathering the codes. This wrapper is for what plain `jit` cannot partition: Pallas
kernels (a bare `pallas_call` is not partitioned) and meshes with Explicit axes (where the
dequantization's reshapes and gathers on sharded operands are rejected). Any quantized family
works: it says how its leaves split (`leaf_specs`) and what a device holds (`shard_local`).
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from qjax._src.core.family import QuantizedBase, is_quantized
from qjax._src.core.partition import as_spec, entry_axes, normalize, shard_count
from qjax._src.matmul.qmatmul import explicit_sharding, qmatmul


def qmatmul_sharded(x, q: QuantizedBase, mesh=None, spec=None, *, x_spec=None, **qmatmul_kwargs):
    """x (..., K) @ q (K, N) -> (..., N), computed shard by shard under `jax.shard_map`.

    mesh: a Mesh (Auto or Explicit axes). spec: PartitionSpec of the weight over its logical
    (K, N) axes, as given to `shard_params`. x_spec: PartitionSpec of x (default: replicated
    batch, K split like the weight's K). On a mesh with Explicit axes the shardings are part of
    the arrays' types, and mesh, spec and x_spec default to what the types say (the weight's spec
    is `q.logical_spec` of its leaves' specs). The output is split like x's batch axes and the
    weight's N axis; a split K is reduced with `psum`. The codes are never gathered.
    Extra keyword arguments go to `qmatmul` (compute_dtype, backend, interpret, precision).
    Raises ValueError if x_spec splits K differently from the weight, or reuses N's mesh axes.
    """
    if not is_quantized(q) or q.ndim != 2:
        raise ValueError(f"qmatmul_sharded needs a 2-D quantized array (K, N), got {q!r}")
    leaves = q.leaves()
    if mesh is None or spec is None:
        typed_mesh = explicit_sharding(next(iter(leaves.values())))[0]
        if typed_mesh is None:
            raise ValueError("qmatmul_sharded needs mesh= and spec= (the weight's PartitionSpec over (K, N)): "
                             "only arrays on a mesh with Explicit axes carry their sharding in their type")
        mesh = mesh if mesh is not None else typed_mesh
        spec = spec if spec is not None else q.logical_spec({n: explicit_sharding(a)[1] for n, a in leaves.items()})
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
    leaf_specs = q.leaf_specs(spec, mesh)
    local_shape = (q.shape[0] // shard_count(mesh, k_entry), q.shape[1] // shard_count(mesh, n_entry))
    names = tuple(leaves)
    k_axes = entry_axes(k_entry)

    def local(xl, *local_leaves):
        ql = q.shard_local(dict(zip(names, local_leaves)), leaf_specs, local_shape)
        y = qmatmul(xl, ql, **qmatmul_kwargs)
        return jax.lax.psum(y, k_axes) if k_axes else y

    in_specs = (as_spec(xs),) + tuple(leaf_specs[n] for n in names)
    out_spec = as_spec(xs[:-1] + (n_entry,))
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)
    return fn(x, *leaves.values())
