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
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qjax._src.core import formats
from qjax._src.core.policy import QuantConfig, path_str, quantize_tree, warn_unmatched_patterns
from qjax._src.core.qarray import QuantizedArray, _swap_last2, is_quantized, is_structured, leaf_shapes
from qjax._src.core.quantize import check_flag, check_report

SpecLike = Any  # PartitionSpec | None
LORA_A, LORA_B, KERNEL = "lora_a", "lora_b", "kernel"


# ----------------------------------------------------------------------------- helpers


def _entry_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _shards(mesh, entry) -> int:
    return math.prod(mesh.shape[a] for a in _entry_axes(entry))


def _normalize(spec: SpecLike, ndim: int, mesh, what: str) -> tuple:
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
        for a in _entry_axes(e):
            if a not in mesh.shape:
                raise ValueError(f"{what}: mesh axis {a!r} of {spec} is not in the mesh "
                                 f"(axes {tuple(mesh.shape)})")
            if a in used:
                raise ValueError(f"{what}: mesh axis {a!r} is used twice in {spec}")
            used.append(a)
    return entries + (None,) * (ndim - len(entries))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _spec(entries) -> PartitionSpec:
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
        entries = _normalize(spec, lead + q.ndim, mesh, what)
        for d in range(lead):
            _check_even(d, np.shape(q.packed)[d], _shards(mesh, entries[d]), entries[d], what)
        one = q.replace(packed=jax.ShapeDtypeStruct(np.shape(q.packed)[lead:], q.packed.dtype))
        inner = quantized_leaf_specs(one, _spec(entries[lead:]), mesh, what)
        # nested statistics of a stack are per layer, (L, n) and (L,): split like the stacked axes
        return {k: (None if v is None else PartitionSpec(*entries[:lead], *tuple(v)))
                for k, v in inner.items()}
    logical = _normalize(spec, q.ndim, mesh, what)
    storage_shape = q.storage_shape
    storage = _swap_last2(logical) if q.transposed else logical
    nested = PartitionSpec() if q.double_quant else None
    out = {"nested_absmax": nested, "offset": nested}

    if q.blocksize is None:  # per-channel int8: codes keep the storage shape, absmax the logical last axis
        for d, (size, e) in enumerate(zip(storage_shape, storage)):
            _check_even(d, size, _shards(mesh, e), e, what)
        out.update(packed=_spec(storage), absmax=_spec(logical[-1:]))
        return out

    bs = q.blocksize
    axis_hint = (" (the storage last axis is the logical axis -2 because the array is stored transposed)"
                 if q.transposed else "")
    if is_structured(storage_shape, q.format, bs):
        for d, (size, e) in enumerate(zip(storage_shape[:-1], storage[:-1])):
            _check_even(d, size, _shards(mesh, e), e, what)
        n, k = storage_shape[-1], _shards(mesh, storage[-1])
        if n % (k * bs):
            good_k = [c for c in _divisors(n) if (n // c) % bs == 0]
            good_bs = [b for b in formats.BLOCKSIZES if n % (k * b) == 0]
            raise ValueError(
                f"{what}: splitting the storage last axis (size {n}){axis_hint} over mesh axes "
                f"{storage[-1]!r} ({k} shards) would cut a block of blocksize={bs} in two: a shard of "
                f"{n / k:g} elements is not a whole number of blocks. Shard counts that work with "
                f"blocksize={bs}: {good_k}; blocksizes that work with {k} shards: {good_bs or 'none'}; "
                "or split another axis.")
        out.update(packed=_spec(storage), absmax=_spec(storage))
        return out

    # flat storage: contiguous row-major chunks, so only the leading storage axis may be split
    n_total = math.prod(storage_shape)
    bad = [d for d, e in enumerate(storage) if d > 0 and _shards(mesh, e) > 1]
    k = _shards(mesh, storage[0])
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
    out.update(packed=_spec(storage[:1]), absmax=_spec(storage[:1]))
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
    return _quantized_sharding(q, sharding.spec, sharding.mesh)


def _quantized_sharding(q: QuantizedArray, spec: SpecLike, mesh) -> QuantizedArray:
    specs = quantized_leaf_specs(q, spec, mesh)
    return q.replace(**{k: (None if s is None else NamedSharding(mesh, s)) for k, s in specs.items()})


# ----------------------------------------------------------------------------- LoRA


def _lora_specs(kernel_spec, k_ndim: int, a_ndim: int, b_ndim: int, where: str, split_rank: bool = False,
                lead: int | None = None):
    """(A spec, B spec) from the kernel's spec: A (lead..., in..., r) like `in`, B (lead..., r, out...) like `out`.

    lead: stacked-layer axes present in all three (split like the kernel's); None: inferred from
    the ranks. A kernel of rank lead + 2 with more adapter axes is a flattened `(prod(in),
    prod(out))` kernel (qjax.linen's DenseGeneral): its `in` / `out` entries go to the first
    `in` / `out` axis of the adapters, which row-major flattening splits the same way.
    split_rank: also split A's rank axis over the kernel's `out` mesh axes and B's over its `in`
    mesh axes, so each adapter (and its optimizer state) is split over every axis its kernel uses.
    """
    if lead is None:
        lead = a_ndim + b_ndim - 2 - k_ndim
    n_in, n_out = a_ndim - 1 - lead, b_ndim - 1 - lead
    ks = tuple(kernel_spec) + (None,) * (k_ndim - len(tuple(kernel_spec)))
    if lead < 0 or n_in < 1 or n_out < 1 or k_ndim - lead not in (n_in + n_out, 2):
        raise ValueError(f"{where}: LoRA shapes of rank {a_ndim} (lora_a) and {b_ndim} (lora_b) do not "
                         f"factor a rank-{k_ndim} kernel as (lead..., in..., out...)")
    if k_ndim - lead == n_in + n_out:
        ins, outs = ks[lead:lead + n_in], ks[lead + n_in:]
    else:  # flattened kernel
        ins = (ks[lead],) + (None,) * (n_in - 1)
        outs = (ks[lead + 1],) + (None,) * (n_out - 1)

    def merged(entries):
        axes = tuple(a for e in entries for a in _entry_axes(e))
        return None if not axes else (axes[0] if len(axes) == 1 else axes)

    a_rank = merged(outs) if split_rank else None
    b_rank = merged(ins) if split_rank else None
    return _spec(ks[:lead] + ins + (a_rank,)), _spec(ks[:lead] + (b_rank,) + outs)


def _shape(x) -> tuple[int, ...] | None:
    if x is None:
        return None
    return tuple(x.shape) if hasattr(x, "shape") else None


def lora_sharding(specs, params=None, *, split_rank: bool = False):
    """Spec tree with every `lora_a` / `lora_b` spec derived from its sibling `kernel` spec.

    specs: nested dicts (a Linen params tree's layout) of PartitionSpecs over dense shapes.
    params: the matching params tree (arrays, QuantizedArrays or ShapeDtypeStructs), used to
      find which kernel axes are `in` and which are `out` for kernels of any rank: lora_a is
      `(lead..., in..., r)` and lora_b `(lead..., r, out...)` (lead: stacked-layer axes).
      Without it, the kernel is taken as `(in, out)` with leading axes stacked.
    split_rank: False (default): the rank axis is replicated, so `x @ A @ B` needs no
      resharding of the adapters, but each adapter is split over only one of its kernel's mesh
      axes. True: A's rank axis is also split over the kernel's `out` mesh axes and B's over its
      `in` axes (FSDP over the adapters and their optimizer state; r must divide evenly).
    Returns a new spec tree: lora_a split like the kernel's `in` axes, lora_b like its `out` axes.
    """
    def walk(s, p, where):
        if not isinstance(s, Mapping):
            return s
        out = {k: walk(v, (p or {}).get(k) if isinstance(p, Mapping) else None, f"{where}/{k}".lstrip("/"))
               for k, v in s.items()}
        if KERNEL in s and (LORA_A in s or LORA_B in s):
            kspec = s[KERNEL] if s[KERNEL] is not None else PartitionSpec()
            pk = p.get(KERNEL) if isinstance(p, Mapping) else None
            pa = p.get(LORA_A) if isinstance(p, Mapping) else None
            pb = p.get(LORA_B) if isinstance(p, Mapping) else None
            lead = None
            if pk is not None and pa is not None and pb is not None:
                k_nd, a_nd, b_nd = len(_shape(pk) or ()), len(_shape(pa)), len(_shape(pb))
                if is_quantized(pk):  # logical shape of one layer, plus its stacked axes
                    lead = stacked_axes(pk)
                    k_nd += lead
            else:
                k_nd = max(len(tuple(kspec)), 2)
                a_nd = b_nd = k_nd
            a, b = _lora_specs(kspec, k_nd, a_nd, b_nd, where or "params", split_rank, lead)
            if LORA_A in s:
                out[LORA_A] = a
            if LORA_B in s:
                out[LORA_B] = b
        return type(s)(out) if not isinstance(s, dict) else out

    return walk(specs, params, "")


# ----------------------------------------------------------------------------- trees


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
            return _quantized_sharding(x, s, mesh)
        ndim = len(_shape(x) or ())
        entries = _normalize(s, ndim, mesh, f"parameter {path or '?'} shape={_shape(x)}")
        return NamedSharding(mesh, _spec(entries))

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
            return jax.lax.with_sharding_constraint(tree, _quantized_sharding(tree, spec, mesh))
        if hasattr(tree, "shape"):
            entries = _normalize(spec, len(tree.shape), mesh, f"array shape={tuple(tree.shape)}")
            return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, _spec(entries)))
    return jax.lax.with_sharding_constraint(tree, params_sharding(tree, mesh, spec, lora=False))


def optimizer_sharding(optimizer, params, shardings, mesh=None):
    """Shardings for `optimizer.init(params)`: every copy of the params tree in the state
    (adam's mu and nu, ...) sharded like the params, other fields (step counts) replicated.

    optimizer: an optax GradientTransformation. params: the (trainable) params tree, arrays
    or ShapeDtypeStructs. shardings: their shardings (e.g. from `params_sharding`).
    Use as `jax.jit(optimizer.init, out_shardings=optimizer_sharding(...))(params)`: a plain
    jitted init leaves its zeros on one device.
    """
    import optax

    if mesh is None:
        mesh = next(s.mesh for s in jax.tree_util.tree_leaves(shardings) if isinstance(s, NamedSharding))
    abstract = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract, shardings,
                                 transform_non_params=lambda _: replicated)
