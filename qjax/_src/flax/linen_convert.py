"""`qjax.linen.convert` / `merge`: an existing Linen model to its QLoRA version and back."""

from __future__ import annotations

import dataclasses
import inspect
import threading
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta, unfreeze

from qjax._src.adapters import lora as L
from qjax._src.adapters.config import LoraConfig, check_configs
from qjax._src.adapters.tree import is_adapter_path
from qjax._src.core.policy import QuantConfig
from qjax._src.core.qarray import is_quantized
from qjax._src.errors import ConversionWarning, describe, named
from qjax._src.flax import linen_params as LP
from qjax._src.flax import planner as P
from qjax._src.flax import routing as R
from qjax._src.flax.linen_layers import (LayerSpec, dense_call, dense_general_batched_call, einsum_module_call, as_tuple,
                                         dense_general_plan, einsum_plan)
from qjax._src.paths import path_keys, path_str


@dataclasses.dataclass(frozen=True)
class ConversionSpec:
    """What `convert` did: the converted layers and the configs their calls use (static, hashable)."""

    layers: tuple[LayerSpec, ...]
    lora_config: LoraConfig | None
    quant_config: Any  # QuantConfig, a per-path policy (QuantRules) or None; layers hold their own choice
    backend: str = "auto"
    params: tuple[LP.ParamRoute, ...] = ()  # the params converted where they are (linen_params)

    def layer(self, path: str) -> LayerSpec | None:
        return self._by_path.get(path)

    @property
    def _by_path(self) -> dict[str, LayerSpec]:
        return {layer.path: layer for layer in self.layers}

    @property
    def routes(self) -> dict[str, LP.ParamRoute]:
        return {r.path: r for r in self.params}


# ----------------------------------------------------------------------------- interception

_active = threading.local()


def _rel_path(module: nn.Module, root: tuple[str, ...]) -> str | None:
    if module.scope is None:
        return None
    path = tuple(module.scope.path)
    if path[:len(root)] != root:
        return None
    return "/".join(path[len(root):])


def _make_interceptor(spec: ConversionSpec, root: tuple[str, ...]):
    by_path = spec._by_path

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        rel = _rel_path(module, root)
        layer = by_path.get(rel) if rel is not None else None
        if layer is None:
            return next_fun(*args, **kwargs)
        lora = spec.lora_config if layer.lora else None
        quant = (layer.quant_config or spec.quant_config) if layer.quantized else None
        if isinstance(module, nn.Einsum):
            if layer.einsum is None:
                raise TypeError(f"{rel!r} was converted as a Dense layer, but the module called there is an "
                                "nn.Einsum; pass inputs= to qjax.linen.convert so it can trace the layer")
            eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
            return einsum_module_call(module, args[0] if args else kwargs["inputs"], eq, lora=lora, quant=quant,
                                       backend=spec.backend)
        if not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            raise TypeError(f"{rel!r} was converted as a linear layer, but the module called there is a "
                            f"{type(module).__name__}; exclude it (LoraConfig.exclude / QuantConfig.skip)")
        inputs = args[0] if args else kwargs["inputs"]
        batched = isinstance(module, nn.DenseGeneral) and bool(module.batch_dims)
        if batched != (layer.einsum is not None):
            raise TypeError(f"{rel!r} was converted as " + ("a Dense layer, but it is an nn.DenseGeneral with "
                            "batch_dims; pass inputs= to qjax.linen.convert so it can trace the layer" if batched
                            else f"an einsum, but the module called there is a {type(module).__name__}"))
        if batched:
            return dense_general_batched_call(module, inputs, lora=lora, quant=quant, backend=spec.backend)
        general = isinstance(module, nn.DenseGeneral)
        return dense_call(module, inputs, axis=module.axis if general else -1, features=module.features,
                     kernel_init=module.kernel_init, lora=lora, quant=quant, backend=spec.backend,
                     flat_kernel_init=general)

    return interceptor


def _wrap_method(cls, name: str):
    original = getattr(cls, name)

    def method(self, *args, **kwargs):
        spec = type(self)._qjax_spec
        root = tuple(self.scope.path) if self.scope is not None else ()
        key = (id(spec), root)
        stack = getattr(_active, "keys", None)
        if stack is None:
            stack = _active.keys = []
        if key in stack:  # a wrapped method calling another one: already intercepting
            return original(self, *args, **kwargs)
        stack.append(key)
        try:
            with nn.intercept_methods(_make_interceptor(spec, root)), LP.active(root, spec.routes):
                return original(self, *args, **kwargs)
        finally:
            stack.pop()

    method.__name__ = name
    method.__qualname__ = f"QLoRA{cls.__qualname__}.{name}"
    method.__doc__ = original.__doc__
    return method


def _public_methods(cls) -> list[str]:
    fields = {f.name for f in dataclasses.fields(cls)}
    names: list[str] = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name, value in vars(klass).items():
            if not inspect.isfunction(value) or name in names or name in fields or name == "setup":
                continue
            if name == "__call__" or not name.startswith("_"):
                names.append(name)
    return names


def _converted_class(cls, spec: ConversionSpec):
    ns = {"_qjax_spec": spec, "_qjax_base_class": cls, "__module__": cls.__module__,
          "__qualname__": f"QLoRA{cls.__qualname__}"}
    for name in _public_methods(cls):
        ns[name] = _wrap_method(cls, name)
    return type(f"QLoRA{cls.__name__}", (cls,), ns)


def _instantiate(cls, model: nn.Module) -> nn.Module:
    kwargs = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.init and f.name not in ("parent", "name")}
    return cls(**kwargs)


def is_converted(model) -> bool:
    return hasattr(type(model), "_qjax_spec")


# ----------------------------------------------------------------------------- discovery


def _get(tree, path: Sequence[str]):
    """tree[path[0]][path[1]]...; ValueError naming the path and what the tree holds where it stops."""
    for i, k in enumerate(path):
        if not isinstance(tree, Mapping) or k not in tree:
            held = sorted(map(str, tree))[:8] if isinstance(tree, Mapping) else describe(tree)
            raise ValueError(f"params/{'/'.join(path)}: the variables have no {k!r} at "
                             f"params/{'/'.join(path[:i]) or ''} (it holds {held}); were they made for another model?")
        tree = tree[k]
    return tree


def _set(tree, path: Sequence[str], value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _params_paths(params) -> list[tuple[str, Any]]:
    """(module path, kernel) of every "kernel" leaf of the params tree."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        parts = path_str(path).split("/")
        if parts[-1] == "kernel":
            out.append(("/".join(parts[:-1]), leaf))
    return out


def _check_not_converted(model, params):
    if is_converted(model):
        raise ValueError(f"{type(model).__name__} is already converted by qjax.linen.convert; convert the "
                         "original model (qjax.linen.merge gives it back)")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        if is_adapter_path(path_keys(path)):  # quantized kernels are welcome (a bitsandbytes import), adapters not
            raise ValueError(f"params/{path_str(path)} is already a QLoRA leaf (adapter); the variables are already "
                             "converted")


def _is_key(x) -> bool:
    """A typed jax key or a raw uint32 (2,) one (jax.random.PRNGKey)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                                  or (dtype == jnp.uint32 and tuple(x.shape) == (2,)))


def _check_fits(model, params, inputs, method) -> None:
    """Raises ValueError listing the params that `model` called on `inputs` creates but `params` lacks,
    or holds with another shape or a non-float dtype where the model creates a float one."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
    want = jax.eval_shape(lambda: meta.unbox(model.init(rngs, *args, method=method))).get("params", {})
    have = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]}
    missing, wrong = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
        name = path_str(path)
        got = have.get(name)
        if got is None:
            missing.append(f"params/{name}")
        elif tuple(got.shape) != tuple(leaf.shape) or (jnp.issubdtype(leaf.dtype, jnp.inexact)
                                                        and not jnp.issubdtype(got.dtype, jnp.inexact)):
            wrong.append(f"{named('params/' + name, got)} where it creates shape={tuple(leaf.shape)} "
                         f"dtype={jnp.dtype(leaf.dtype).name}")
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} params it creates are missing ({', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}; the variables' params hold {sorted(have)[:6]}"
                         f"{' ...' if len(have) > 6 else ''})")
        if wrong:
            parts.append(f"{len(wrong)} do not fit: " + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
        raise ValueError(f"the variables do not fit {type(model).__name__} called on the given inputs: "
                         + "; ".join(parts) + ". Pass the variables of this model (model.init) and inputs of "
                         "the shapes it is trained on")


class _LinenFinder:
    """The layers of a Linen model: traced from one abstract forward pass on `inputs`, or (without inputs)
    read off the params tree, every rank-2 `kernel` taken as an (in, out) Dense."""

    layer_kinds = "nn.Dense / nn.DenseGeneral / nn.Einsum"

    def __init__(self, model, variables, inputs, method, explicit: bool):
        self.model, self.variables, self.inputs, self.method = model, variables, inputs, method
        self.params, self.explicit = variables["params"], explicit
        self.model_name = type(model).__name__

    def candidates(self) -> list[P.Candidate]:
        if not hasattr(self, "_found"):
            self._unconvertible: list[P.LeftDense] = []
            self._found = self._traced() if self.inputs is not None else self._from_params()
        return list(self._found)

    def unconvertible(self) -> list[P.LeftDense]:
        self.candidates()
        return list(self._unconvertible)

    def _other_params(self, layers: list[P.Candidate]) -> list[tuple[str, Any]]:
        """(path, value) of the float params of rank >= 2 that are not the kernel of a found layer."""
        kernels = {f"{c.path}/kernel" if c.path else "kernel" for c in layers}
        out = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.params, is_leaf=is_quantized)[0]:
            name = path_str(path)
            if name not in kernels and not is_quantized(leaf) and jnp.ndim(leaf) >= 2 \
                    and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                out.append((name, leaf))
        return out

    def _routed(self, layers: list[P.Candidate], seen) -> list[P.Candidate]:
        """The params outside `layers` that only matmuls read (Probes of the traced pass), as candidates."""
        others = self._other_params(layers)
        found = seen([name for name, _ in others])
        per_module = {}
        for name, _ in others:
            if found[name].read_by_matmul:
                module = name.rpartition("/")[0]
                per_module[module] = per_module.get(module, 0) + 1
        out = []
        for name, leaf in others:
            f = found[name]
            if f.roles is None:
                if f.read_by_matmul:
                    self._unconvertible.append(P.LeftDense(name, tuple(leaf.shape), leaf.dtype, f.why))
                continue
            roles = (R.LEAD,) * (jnp.ndim(leaf) - len(f.roles)) + f.roles
            module = name.rpartition("/")[0]
            single = per_module.get(module) == 1 and module != ""
            out.append(P.Candidate(module if single else name, f"params/{name}", leaf, R.layout_of(leaf.shape, roles),
                                   handle=(name, single, roles), kernel_path=name))
        return out

    def _kernel(self, rel: str):
        return _get(self.params, rel.split("/") + ["kernel"]) if rel else self.params["kernel"]

    def _candidate(self, rel: str, layout: P.KernelLayout | None, why: str = "") -> P.Candidate:
        return P.Candidate(rel, f"params/{rel}", self._kernel(rel), layout, why)

    def _traced(self) -> list[P.Candidate]:
        """Every Dense/DenseGeneral/Einsum call of one abstract forward pass, with its exact shapes."""
        found: dict[str, P.KernelLayout] = {}
        unsupported: dict[str, str] = {}

        def lead(rel, rank):
            stored = self._kernel(rel)
            return tuple(stored.shape[:stored.ndim - rank])

        def einsum_layout(rel, plan, shape):
            return P.KernelLayout(plan.in_shape(shape), plan.out_shape(shape), lead(rel, len(shape)),
                            plan.batch_shape(shape), plan.einsum_str)

        def record(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and isinstance(module, nn.Einsum):
                rel = _rel_path(module, ())
                try:
                    plan, shape = einsum_plan(module, args[1] if len(args) > 1 else kwargs.get("einsum_str"))
                except ValueError as e:
                    unsupported.setdefault(rel, str(e))
                    return next_fun(*args, **kwargs)
                found.setdefault(rel, einsum_layout(rel, plan, shape))
            elif context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
                rel = _rel_path(module, ())
                x = args[0] if args else kwargs["inputs"]
                if isinstance(module, nn.DenseGeneral) and module.batch_dims:
                    try:
                        plan, shape = dense_general_plan(module, x.shape)
                    except ValueError as e:
                        unsupported.setdefault(rel, str(e))
                        return next_fun(*args, **kwargs)
                    found.setdefault(rel, einsum_layout(rel, plan, shape))
                    return next_fun(*args, **kwargs)
                if isinstance(module, nn.DenseGeneral):
                    axis = tuple(a % x.ndim for a in as_tuple(module.axis))
                    features = as_tuple(module.features)
                else:
                    axis, features = (x.ndim - 1,), (module.features,)
                in_shape = tuple(x.shape[a] for a in axis)
                found.setdefault(rel, P.KernelLayout(in_shape, tuple(features),
                                                     lead(rel, len(in_shape) + len(features))))
            return next_fun(*args, **kwargs)

        args = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
        rngs = {"dropout": jax.random.key(0), "params": jax.random.key(0)}
        # quantized kernels (a bitsandbytes import) trace as the dense arrays they stand for: abstract, no memory
        dense = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(tuple(x.stack_shape) + tuple(x.shape), x.dtype)
                                       if is_quantized(x) else x, self.variables, is_leaf=is_quantized)
        with R.recording() as seen, LP.active((), None), nn.intercept_methods(record):
            try:
                jax.eval_shape(lambda v: self.model.apply(v, *args, method=self.method, mutable=True, rngs=rngs),
                               dense)
            except (TypeError, ValueError) as e:
                if "Probe" not in str(e):
                    raise
                raise R.trace_failed(self.model_name, e) from e
            layers = ([self._candidate(rel, layout) for rel, layout in found.items()]
                      + [self._candidate(rel, None, why) for rel, why in unsupported.items() if rel not in found])
            return layers + self._routed(layers, seen)

    def _from_params(self) -> list[P.Candidate]:
        """Every rank-2 kernel of the params tree as an (in, out) Dense; warns (or, with explicit LoRA
        targets, raises) for the kernels of other ranks, which it cannot tell apart."""
        found, skipped = [], []
        for path, kernel in _params_paths(self.params):
            if kernel.ndim == 2:
                layout = P.KernelLayout((kernel.shape[0],), (kernel.shape[1],))
                found.append(P.Candidate(path, f"params/{path}", kernel, layout))
            else:
                skipped.append(f"{path} {tuple(kernel.shape)}")
        if skipped:
            msg = (f"kernels of rank != 2 ({', '.join(skipped)}) may be DenseGeneral, scanned or conv layers; "
                   "pass inputs=(example args,) to qjax.linen.convert so it can trace which they are")
            if self.explicit:
                raise ValueError("cannot tell the in/out axes of " + msg)
            warnings.warn("not converted: " + msg, stacklevel=5)  # convert's caller (via planner.plan)
        for name, leaf in self._other_params(found):
            if name.rpartition("/")[2] != "kernel":  # kernels of rank != 2 were warned about above
                self._unconvertible.append(P.LeftDense(name, tuple(leaf.shape), leaf.dtype, (
                    "not traced; pass inputs= to qjax.linen.convert so it can find the matmuls that read it")))
        return found


# ----------------------------------------------------------------------------- convert / merge


def _layer_spec(p: P.Planned) -> LayerSpec:
    layout = p.layout
    return LayerSpec(p.path, layout.in_shape, layout.out_shape, layout.lead, lora=p.lora,
                     quantized=p.quant_config is not None, einsum=layout.einsum, batch=layout.batch,
                     quant_config=p.quant_config)


def _layout(layer: LayerSpec) -> P.KernelLayout:
    return P.KernelLayout(layer.in_shape, layer.out_shape, layer.lead, layer.batch, layer.einsum)


def convert(model: nn.Module, variables, lora_config: LoraConfig | None = LoraConfig(),
            quant_config: QuantConfig | None = QuantConfig(), rng=None, *, inputs=None, method=None,
            strict: bool = False, backend: str = "auto"):
    """Turns a Linen model into its QLoRA version: its nn.Dense / nn.DenseGeneral / nn.Einsum layers and
    (traced with `inputs`) every other param its matmuls read.

    Params of other modules (a model's own Einsum / DenseGeneral classes, per-expert weights): with
    `inputs`, every float param of rank >= 2 outside the Flax layers that the model reads with
    `self.param` only for matmuls (`jnp.einsum`, `@`, `jnp.dot`, `jnp.matmul`, `jnp.tensordot`,
    `lax.dot_general`, after `astype` / `jnp.asarray` / transposes / integer indexing of per-expert
    axes) is converted where it is: `params/<module>/<name>` becomes the quantized base, the adapters
    sit beside it (`<module>/lora_a`, or `<module>/<name>_lora/lora_a` when the module holds several
    such params), and while the converted model runs, `self.param` returns a `RoutedWeight` whose
    matmuls compute base + adapter delta. Such a param is selected by its module's path (PEFT names
    such as "q_proj" match it) or, when its module holds several, by its own; QuantConfig patterns
    see its own path ("…/q_proj/w"). Never silent: every param that feeds a matmul and is left
    untouched (not selected, too small, also read by another operation, or not traced without
    inputs) is listed with path, shape, dtype and why in a `qjax.ConversionWarning`, or raised as
    ValueError with strict=True.

    model: the original (unbound) module. variables: its variables ({"params": ...}).
    lora_config: which layers get adapters (None: none, quantization only); its target_modules /
      exclude patterns match module paths such as "layers_0/attn/q_proj" (qjax._src.flax.select).
    quant_config: how kernels are quantized: a QuantConfig, or a per-path policy such as
      `qjax.QuantRules` / `qjax.first_blocks(k, high, low)` (mixed precision). A layer's kernel is
      quantized with `quant_config.config_for("<module path>/kernel")`, as in qjax.nnx.convert
      (patterns written for the older "params/<module path>/kernel" form keep working); None: kept
      16-bit, as are kernels smaller than that config's min_size. quant_config=None: 16-bit LoRA.
    rng: jax key for the adapters' A matrices.
    With `LoraConfig(init="loftq")` every layer that gets adapters and a quantized kernel is
    initialized by `qjax.loftq_init` (rank r, loftq_iter iterations, scaling folded in): the
    converted model approximates the original instead of the quantized base. Kernels of rank > 2
    are flattened to (prod(in), prod(out)) for it; stacked (scanned) layers are done one by one.
    Layers whose kernel stays dense get the default init (there is no quantization error).
    inputs: optional example positional args (a tuple, or one array) for `model.apply`. With them the
      layers are found by tracing one abstract forward pass (exact: DenseGeneral axes, scanned
      layers, Einsum/Conv told apart). Without them, every rank-2 `kernel` in the params is taken as
      an (in, out) Dense and other kernels are left alone (with a warning).
    method: the method `inputs` are for (default __call__). backend: qmatmul backend.
    Returns (qlora_model, qlora_variables): qlora_model is an instance of a subclass of the model's
    class (same fields and methods); qlora_variables has, at every converted layer, `kernel` as a
    2-D QuantizedArray (prod(in), prod(out)) (with the stacked axes of scanned layers leading) and
    float32 `lora_a` (*in, r) / `lora_b` (r, *out). An nn.Einsum's in axes are the kernel axes it
    contracts (kernel order), its out axes those it produces (output order); it is found only by
    tracing (inputs=). Kernel axes shared by input and output (per-expert einsums, nn.DenseGeneral's
    batch_dims) are batch axes: the kernel is a stack over them (after any scanned axes) of
    (prod(in), prod(out)) QuantizedArrays, lora_a (*batch, *in, r), lora_b (*batch, r, *out).
    Raises ValueError (naming paths) for an already converted model or variables, a model with no
    Dense layers, a target pattern that matches nothing, r larger than a layer's dimensions, or a
    selected einsum that is not a projection (with its equation and kernel shape; exclude it from
    LoRA and quantization to leave it alone); TypeError for a selected layer with a non-float kernel.
    """
    check_configs(lora_config, quant_config)
    variables = unfreeze(variables)
    params = variables.get("params")
    if not params:
        raise ValueError("variables has no 'params' collection to convert")
    _check_not_converted(model, params)
    if inputs is not None:
        _check_fits(model, params, inputs, method)
    explicit = lora_config is not None and lora_config.target_modules != "all-linear"
    finder = _LinenFinder(model, variables, inputs, method, explicit)
    planned = P.plan(finder, lora_config, quant_config)
    left = P.left_dense(finder, planned, lora_config, quant_config)
    if left and strict:
        raise ValueError(_left_message(model, left))
    if any(p.lora for p in planned) and rng is None:
        raise ValueError("convert needs rng (a jax key) to initialize the LoRA adapters")
    if rng is not None and not _is_key(rng):
        raise TypeError(f"rng must be a jax key such as jax.random.key(0), got {describe(rng)}")
    keys = jax.random.split(rng, len(planned)) if rng is not None else [None] * len(planned)
    layers, routed, routed_keys = [], [], []
    for p, key in zip(planned, keys):
        if isinstance(p.candidate.handle, tuple):
            routed.append(p)
            routed_keys.append(key)
            continue
        layers.append(p)
        base, adapters = P.adapter_params(p.candidate.where, p.layout, p.candidate.kernel,
                                          lora_config if p.lora else None, p.quant_config, key)
        where = p.path.split("/")
        for name, value in {"kernel": base, **adapters}.items():
            _set(params, where + [name], value)
    routes = LP.convert(params, routed, lora_config, routed_keys, backend)
    conv = ConversionSpec(tuple(_layer_spec(p) for p in layers), lora_config, quant_config, backend, routes)
    qmodel = _instantiate(_converted_class(type(model), conv), model)
    if routes:
        _verify(qmodel, variables, inputs, method)
    if left:
        warnings.warn(ConversionWarning(_left_message(model, left)), stacklevel=2)
    return qmodel, variables


def _left_message(model, left) -> str:
    return (f"qjax.linen.convert left {len(left)} param(s) of {type(model).__name__} that feed a matmul untouched "
            "(no adapters, no quantized base):\n  " + "\n  ".join(map(str, left)))


def _verify(model, variables, inputs, method) -> None:
    """One abstract pass of the converted model: every routed param is read as it was traced."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    rngs = {"dropout": jax.random.key(0), "params": jax.random.key(0)}
    try:
        jax.eval_shape(lambda v: model.apply(v, *args, method=method, mutable=True, rngs=rngs), variables)
    except Exception as e:
        raise ValueError(f"the converted {type(model).__name__} fails on the inputs it was traced with: "
                         f"{type(e).__name__}: {e}") from e


def merge(qlora_model: nn.Module, qlora_variables, dtype=None, *, requantize: QuantConfig | None = None):
    """Folds `scaling * A @ B` into each converted kernel: PEFT's `merge_and_unload`.

    Returns (model, variables): the original model class with plain dense kernels
    (*lead, *in, *out) in `dtype` (default: each kernel's original dtype) and no adapters; with
    `requantize`, a converted model without adapters whose merged kernels are quantized again.
    Raises ValueError naming the layer path and shapes when qlora_variables do not fit the
    conversion (a missing layer, a kernel or adapter of another shape or rank, missing adapters);
    TypeError for a non-float dtype or a requantize that is not a QuantConfig.
    """
    if not is_converted(qlora_model):
        raise ValueError(f"{type(qlora_model).__name__} is not a model converted by qjax.linen.convert")
    L.check_merge_args(dtype, requantize)
    spec: ConversionSpec = type(qlora_model)._qjax_spec
    variables = unfreeze(qlora_variables)
    params = variables["params"]
    for layer in spec.layers:
        node = _get(params, layer.path.split("/"))
        kernel = _get(params, layer.path.split("/") + ["kernel"])
        lora_config = spec.lora_config if layer.lora else None
        names = lora_config.variant.leaves() if lora_config is not None else ()
        adapters = {name: node.pop(name) for name in names if name in node}
        node["kernel"] = P.merged_kernel(f"params/{layer.path}", _layout(layer), kernel, adapters, lora_config, dtype)
    routes = LP.merge(params, spec.params, dtype, requantize)
    base_cls = type(qlora_model)._qjax_base_class
    model = _instantiate(base_cls, qlora_model)
    if requantize is None:
        return model, variables
    layers = tuple(dataclasses.replace(s, lora=False, quantized=True, quant_config=requantize) for s in spec.layers)
    for layer in layers:
        where = layer.path.split("/") + ["kernel"]
        base, _ = P.adapter_params(f"params/{layer.path}", _layout(layer), _get(params, where), None, requantize, None)
        _set(params, where, base)
    conv = ConversionSpec(layers, None, requantize, spec.backend, routes)
    return _instantiate(_converted_class(base_cls, conv), model), variables
