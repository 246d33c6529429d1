"""Sharding whole parameter trees: resolve spec trees, place arrays, quantize sharded, optimizer state."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qjax._src.core.policy import QuantConfig, path_str, quantize_tree, warn_unmatched_patterns
from qjax._src.core.qarray import is_quantized
from qjax._src.core.quantize import check_flag, check_report
from qjax._src.sharding.lora import lora_sharding, shape_of
from qjax._src.sharding.specs import as_spec, normalize, quantized_sharding_from_spec


def _is_spec_leaf(x) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def resolve_specs(tree, spec):
    """A spec tree matching `tree` (QuantizedArrays as leaves) from a spec tree or a callable.

    spec: a pytree of PartitionSpecs (None: replicated) with tree's structure, or a callable
    `(path, leaf) -> PartitionSpec | None`, path a "a/b/kernel" string as in QuantConfig.
    """
    if callable(spec) and not isinstance(spec, PartitionSpec):
        return jax.tree_util.tree_map_with_path(lambda p, x: spec(path_str(p), x), tree, is_leaf=is_quantized)
    if isinstance(spec, PartitionSpec):
        raise TypeError("shard_params needs a spec tree or a callable; for one spec everywhere pass "
                        "`lambda path, leaf: spec`")
    return spec


def params_sharding(tree, mesh, spec, *, lora: bool | str = True):
    """The sharding tree for a (partly) quantized params tree on `mesh`.

    tree: params pytree; leaves arrays, ShapeDtypeStructs or QuantizedArrays.
    spec: pytree of PartitionSpecs over the dense shapes, or a callable `(path, leaf) ->
      PartitionSpec` (see `resolve_specs`). lora: derive lora_a / lora_b specs from their
      sibling kernel (`lora_sharding`), overriding what spec says for them; "split_rank" also
      splits the rank axes (`lora_sharding(..., split_rank=True)`); False keeps spec's.
    Returns a pytree like `tree` of NamedShardings (QuantizedArray nodes hold a sharding per child).
    """
    specs = resolve_specs(tree, spec)
    if lora:
        specs = lora_sharding(specs, tree, split_rank=(lora == "split_rank"))

    def one(s, x, path=""):
        if is_quantized(x):
            return quantized_sharding_from_spec(x, s, mesh)
        ndim = len(shape_of(x) or ())
        entries = normalize(s, ndim, mesh, f"parameter {path or '?'} shape={shape_of(x)}")
        return NamedSharding(mesh, as_spec(entries))

    try:
        flat_specs, treedef = jax.tree_util.tree_flatten(specs, is_leaf=_is_spec_leaf)
        leaves = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the spec tree does not match the params tree: {e}") from None
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec_leaf)[0]]
    out = []
    for s, x, p in zip(flat_specs, leaves, paths):
        if is_quantized(x):
            try:
                out.append(one(s, x))
            except ValueError as e:
                raise ValueError(f"parameter {p}: {e}") from None
        else:
            out.append(one(s, x, p))
    return jax.tree_util.tree_unflatten(treedef, out)


def shard_params(tree, mesh, spec, *, lora: bool | str = True):
    """`tree` placed on `mesh`: each device gets its slice of every array and of the packed codes.

    See `params_sharding` for spec and lora. Works for Auto and Explicit mesh axes.
    """
    return jax.device_put(tree, params_sharding(tree, mesh, spec, lora=lora))


def quantize_params_sharded(params, mesh, spec, config=None, *, check_finite: bool = True):
    """`quantize_params` run shard by shard under `jit`: no device holds a whole dense weight.

    params: dense params tree (arrays, ideally already sharded by `spec`: build them with
    `jit(init, out_shardings=params_sharding(...))` or restore them onto that sharding).
    spec: as in `params_sharding`, over the dense shapes; the dense inputs and the quantized
    outputs both follow it (adapters derived from their kernels). config: QuantConfig or
    QuantRules (default QuantConfig()).
    check_finite: after the jitted call, read every leaf's NaN/Inf count (one small transfer) and
      raise ValueError naming the leaves (path, shape, dtype) that hold NaN/Inf or overflow.
    Returns the quantized tree, sharded. With double quantization the per-weight absmax mean
    (torch's summation order) reads all of one weight's float32 absmax (1/64 of its dense
    float32 bytes at blocksize 64), so that array is gathered; the codes never are.
    Warns like `quantize_params` for patterns that match no parameter.
    """
    config = config if config is not None else QuantConfig()
    check = check_flag(check_finite, "check_finite")

    blocks = {}

    def fn(p):
        reports = {}

        def keep(name, x, report, n):
            reports[name], blocks[name] = report, n

        return quantize_tree(p, config, keep), reports

    abstract_out, abstract_reports = jax.eval_shape(fn, params)
    warn_unmatched_patterns(config, params, abstract_out)
    specs = resolve_specs(params, spec)
    in_sh = params_sharding(params, mesh, specs)
    out_sh = params_sharding(abstract_out, mesh, specs)
    report_sh = {name: NamedSharding(mesh, PartitionSpec()) for name in abstract_reports}
    # a no-op for inputs already sharded so; otherwise each device receives only its slice
    params = jax.device_put(params, in_sh)
    out, reports = jax.jit(fn, out_shardings=(out_sh, report_sh))(params)
    if check and reports:
        names = list(reports)
        table = np.asarray(jax.device_get(jax.numpy.stack([reports[n] for n in names])))  # the one sync
        leaves = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        for name, row in zip(names, table):
            check_report(row, f"parameter {name!r}", leaves[name], blocks[name])
    return out


def with_sharding_constraint(tree, mesh, spec):
    """`jax.lax.with_sharding_constraint` for arrays, QuantizedArrays or trees of them.

    spec: a PartitionSpec over the dense shape (for a single array or QuantizedArray), or a
    spec tree / callable as in `params_sharding`. Use it inside `jit` to say where a sharded
    weight is gathered: constraining an FSDP-stored kernel `P("data", "model")` to its compute
    layout `P(None, "model")` right before `qmatmul` makes XLA all-gather the packed codes
    (4 bits a weight) instead of the dequantized weight it would otherwise pick.
    """
    if spec is None or isinstance(spec, PartitionSpec):
        if is_quantized(tree):
            return jax.lax.with_sharding_constraint(tree, quantized_sharding_from_spec(tree, spec, mesh))
        if hasattr(tree, "shape"):
            entries = normalize(spec, len(tree.shape), mesh, f"array shape={tuple(tree.shape)}")
            return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, as_spec(entries)))
    return jax.lax.with_sharding_constraint(tree, params_sharding(tree, mesh, spec, lora=False))


def optimizer_sharding(optimizer, params, shardings, mesh=None):
    """Shardings for `optimizer.init(params)`: every copy of a params leaf in the state (adam's mu
    and nu, ...) sharded like that leaf, other fields (step counts) replicated.

    optimizer: an optax GradientTransformation (`qjax.optim.adapters_only` included, whose state
    is keyed by "/"-joined paths). params: the (trainable) params tree, arrays or
    ShapeDtypeStructs. shardings: their shardings (e.g. from `params_sharding`).
    A state leaf is a copy of the params leaf whose key path ends its own (or whose path string
    is its last key) with the same shape.
    Use as `jax.jit(optimizer.init, out_shardings=optimizer_sharding(...))(params)`: a plain
    jitted init leaves its zeros on one device.
    """
    from qjax._src.paths import path_keys

    if mesh is None:
        mesh = next(s.mesh for s in jax.tree_util.tree_leaves(shardings) if isinstance(s, NamedSharding))
    abstract = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    sh_leaves = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    shapes = {path_keys(p): shape_of(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    by_path = {path_keys(p): (shapes.get(path_keys(p)), s) for p, s in sh_leaves}
    by_str = {"/".join(map(str, k)): v for k, v in by_path.items()}

    def one(path, leaf):
        keys = path_keys(path)
        hits = [by_path.get(keys[i:]) for i in range(len(keys))] + [by_str.get(str(keys[-1])) if keys else None]
        for hit in hits:
            if hit is not None and hit[0] == shape_of(leaf):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract)
