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
from qjax._src.matmul import base as B
from qjax._src.flax import select as S
from qjax._src.flax.linen_layers import (LayerSpec, _call, _dense_general_batched_call, _einsum_module_call, _tuple,
                                  dense_general_plan, einsum_plan)
from qjax._src.errors import describe, named
from qjax._src.adapters.config import LoraConfig, check_configs
from qjax._src.core.policy import QuantConfig
from qjax._src.paths import path_str
from qjax._src.core.qarray import is_quantized


@dataclasses.dataclass(frozen=True)
class ConversionSpec:
    """What `convert` did: the converted layers and the configs their calls use (static, hashable)."""

    layers: tuple[LayerSpec, ...]
    lora_config: LoraConfig | None
    quant_config: Any  # QuantConfig, a per-path policy (QuantRules) or None; layers hold their own choice
    backend: str = "auto"

    def layer(self, path: str) -> LayerSpec | None:
        return self._by_path.get(path)

    @property
    def _by_path(self) -> dict[str, LayerSpec]:
        return {layer.path: layer for layer in self.layers}


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
            return _einsum_module_call(module, args[0] if args else kwargs["inputs"], eq, lora=lora, quant=quant,
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
            return _dense_general_batched_call(module, inputs, lora=lora, quant=quant, backend=spec.backend)
        general = isinstance(module, nn.DenseGeneral)
        return _call(module, inputs, axis=module.axis if general else -1, features=module.features,
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
            with nn.intercept_methods(_make_interceptor(spec, root)):
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
        name = path_str(path)
        if is_quantized(leaf) or name.rsplit("/", 1)[-1] in ("lora_a", "lora_b"):
            raise ValueError(f"params/{name} is already a QLoRA leaf ({'QuantizedArray' if is_quantized(leaf) else 'adapter'}); "
                             "the variables are already converted")


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


def _trace_layers(model, variables, inputs, method, params) -> tuple[list[LayerSpec], dict[str, str]]:
    """Every Dense/DenseGeneral/Einsum call of one abstract forward pass, with its exact shapes.

    Returns (layers, {path: why} of the einsums that cannot be converted).
    """
    found: dict[str, LayerSpec] = {}
    unsupported: dict[str, str] = {}

    def stored_lead(rel, rank):
        stored = _get(params, rel.split("/") + ["kernel"]) if rel else params["kernel"]
        return tuple(stored.shape[:stored.ndim - rank])

    def einsum_spec(rel, plan, shape):
        return LayerSpec(rel, plan.in_shape(shape), plan.out_shape(shape), stored_lead(rel, len(shape)),
                         einsum=plan.einsum_str, batch=plan.batch_shape(shape))

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Einsum):
            rel = _rel_path(module, ())
            try:
                plan, shape = einsum_plan(module, args[1] if len(args) > 1 else kwargs.get("einsum_str"))
            except ValueError as e:
                unsupported.setdefault(rel, str(e))
                return next_fun(*args, **kwargs)
            found.setdefault(rel, einsum_spec(rel, plan, shape))
        elif context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
            rel = _rel_path(module, ())
            x = args[0] if args else kwargs["inputs"]
            if isinstance(module, nn.DenseGeneral) and module.batch_dims:
                try:
                    plan, shape = dense_general_plan(module, x.shape)
                except ValueError as e:
                    unsupported.setdefault(rel, str(e))
                    return next_fun(*args, **kwargs)
                found.setdefault(rel, einsum_spec(rel, plan, shape))
                return next_fun(*args, **kwargs)
            if isinstance(module, nn.DenseGeneral):
                axis = tuple(a % x.ndim for a in _tuple(module.axis))
                features = _tuple(module.features)
            else:
                axis, features = (x.ndim - 1,), (module.features,)
            in_shape = tuple(x.shape[a] for a in axis)
            found.setdefault(rel, LayerSpec(rel, in_shape, tuple(features),
                                            stored_lead(rel, len(in_shape) + len(features))))
        return next_fun(*args, **kwargs)

    args = inputs if isinstance(inputs, tuple) else (inputs,)
    rngs = {"dropout": jax.random.key(0), "params": jax.random.key(0)}
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, *args, method=method, mutable=True, rngs=rngs), variables)
    return list(found.values()), unsupported



def _params_layers(params, explicit: bool) -> tuple[list[LayerSpec], dict[str, str]]:
    """Layers read off the params tree: every rank-2 kernel is a (in, out) Dense."""
    layers, skipped = [], []
    for path, kernel in _params_paths(params):
        if kernel.ndim == 2:
            layers.append(LayerSpec(path, (kernel.shape[0],), (kernel.shape[1],)))
        else:
            skipped.append(f"{path} {tuple(kernel.shape)}")
    if skipped:
        msg = (f"kernels of rank != 2 ({', '.join(skipped)}) may be DenseGeneral, scanned or conv layers; "
               "pass inputs=(example args,) to qjax.linen.convert so it can trace which they are")
        if explicit:
            raise ValueError("cannot tell the in/out axes of " + msg)
        warnings.warn("not converted: " + msg, stacklevel=3)
    return layers, {}


# ----------------------------------------------------------------------------- convert / merge


def _quantize(spec: LayerSpec, kernel, quant_config):
    if spec.einsum is not None:
        return B.quantize_einsum_kernel(B.EinsumPlan(spec.einsum), kernel, quant_config, lead=len(spec.lead))
    return B.quantize_kernel(kernel, len(spec.in_shape), quant_config, lead=len(spec.lead))


def _loftq(spec: LayerSpec, kernel, lora_config: LoraConfig, quant_config: QuantConfig):
    """(q, lora_a, lora_b) of one layer (stacked layers one by one) by LoftQ."""
    if spec.einsum is not None:
        plan = B.EinsumPlan(spec.einsum)
        return L.loftq_kernel(B.permute_einsum_kernel(plan, kernel, len(spec.lead)), len(plan.in_labels),
                              lora_config, quant_config, lead=len(spec.lead) + len(spec.batch))
    return L.loftq_kernel(kernel, len(spec.in_shape), lora_config, quant_config, lead=len(spec.lead))


def _merged(layer: LayerSpec, kernel, a, b, scaling: float, dtype):
    """The merged dense kernel of one converted layer in the original module's layout (*lead, ...)."""
    if layer.einsum is not None:
        plan = B.EinsumPlan(layer.einsum)
        fn = lambda k, a, b: L.einsum_merged_kernel(  # noqa: E731
            plan, k, a, b, kernel_shape=plan.kernel_shape(layer.in_shape, layer.out_shape, layer.batch), scaling=scaling,
            dtype=dtype)
    else:
        fn = lambda k, a, b: L.merged_kernel(k, a, b, in_shape=layer.in_shape, out_shape=layer.out_shape,  # noqa: E731
                                             scaling=scaling, dtype=dtype)
    return B.vmap_lead(fn, len(layer.lead))(kernel, a, b)


def convert(model: nn.Module, variables, lora_config: LoraConfig | None = LoraConfig(),
            quant_config: QuantConfig | None = QuantConfig(), rng=None, *, inputs=None, method=None,
            backend: str = "auto"):
    """Turns a Linen model built from nn.Dense / nn.DenseGeneral / nn.Einsum layers into its QLoRA version.

    model: the original (unbound) module. variables: its variables ({"params": ...}).
    lora_config: which layers get adapters (None: none, quantization only).
    quant_config: how kernels are quantized: a QuantConfig, or a per-path policy such as
      `qjax.QuantRules` / `qjax.first_blocks(k, high, low)` (mixed precision). A layer's kernel is
      quantized with `quant_config.config_for("params/<module path>/kernel")` (None: kept 16-bit,
      as are kernels smaller than that config's min_size). quant_config=None: 16-bit LoRA.
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
    LoRA and quantization to leave it alone).
    """
    check_configs(lora_config, quant_config)
    variables = unfreeze(variables)
    params = variables.get("params")
    if not params:
        raise ValueError("variables has no 'params' collection to convert")
    _check_not_converted(model, params)
    explicit = lora_config is not None and lora_config.target_modules != "all-linear"
    if inputs is not None:
        _check_fits(model, params, inputs, method)
    layers, unsupported = (_trace_layers(model, variables, inputs, method, params) if inputs is not None
                           else _params_layers(params, explicit))
    if not layers and not unsupported:
        raise ValueError(f"{type(model).__name__} has no nn.Dense / nn.DenseGeneral / nn.Einsum layer with a kernel "
                         "in its params; there is nothing to convert")
    paths = [layer.path for layer in layers] + list(unsupported)
    lora_paths = set(S.select_layers(paths, lora_config)) if lora_config is not None else set()

    def quant_for(path):
        qc = quant_config.config_for(f"params/{path}/kernel") if quant_config is not None else None
        return qc if qc is not None and int(jnp.size(_get(params, path.split("/") + ["kernel"]))) >= qc.min_size \
            else None

    for path, why in unsupported.items():
        if path in lora_paths or quant_for(path) is not None:
            raise ValueError(f"{why}. To leave this layer unconverted, exclude it from LoRA (LoraConfig.exclude) "
                             "and from quantization (QuantConfig.skip)")
    specs = []
    for layer in layers:
        qc = quant_for(layer.path)
        quantized = qc is not None
        if layer.path in lora_paths:
            L.check_rank(lora_config.r, layer.in_shape, layer.out_shape, f"params/{layer.path}")
        if layer.path in lora_paths or quantized:
            specs.append(dataclasses.replace(layer, lora=layer.path in lora_paths, quantized=quantized,
                                             quant_config=qc if quantized else None))
    if not specs:
        raise ValueError(f"no layer of {type(model).__name__} was selected for LoRA or quantization; "
                         f"its linear layers are {paths}")
    if any(s.lora for s in specs) and rng is None:
        raise ValueError("convert needs rng (a jax key) to initialize the LoRA adapters")
    if rng is not None and not _is_key(rng):
        raise TypeError(f"rng must be a jax key such as jax.random.key(0), got {describe(rng)}")
    keys = jax.random.split(rng, len(specs)) if rng is not None else [None] * len(specs)
    for spec, key in zip(specs, keys):
        where = spec.path.split("/")
        kernel = _get(params, where + ["kernel"])
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise TypeError(f"{named(f'params/{spec.path}/kernel', kernel)} is not a float kernel; only float "
                            "kernels can be quantized or get adapters (exclude this layer or load float weights)")
        if spec.lora and spec.quantized and lora_config.init == "loftq":
            try:
                q, a, b = _loftq(spec, kernel, lora_config, spec.quant_config)
            except (TypeError, ValueError) as e:
                raise type(e)(f"params/{spec.path}/kernel: {e}") from None
            _set(params, where + ["kernel"], q)
            _set(params, where + ["lora_a"], a)
            _set(params, where + ["lora_b"], b)
            continue
        if spec.quantized:
            try:
                q = _quantize(spec, kernel, spec.quant_config)
            except (TypeError, ValueError) as e:
                raise type(e)(f"params/{spec.path}/kernel: {e}") from None
            _set(params, where + ["kernel"], q)
        if spec.lora:
            a, b = L.init_adapters(key, spec.in_shape, spec.out_shape, lora_config.r, lora_config.init,
                                   lead=spec.lead + spec.batch)
            _set(params, where + ["lora_a"], a)
            _set(params, where + ["lora_b"], b)
    conv = ConversionSpec(tuple(specs), lora_config, quant_config, backend)
    return _instantiate(_converted_class(type(model), conv), model), variables


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
    scaling = spec.lora_config.scaling if spec.lora_config is not None else 0.0
    for layer in spec.layers:
        where = layer.path.split("/")
        node = _get(params, where)
        kernel = _get(params, where + ["kernel"])
        a, b = node.pop("lora_a", None), node.pop("lora_b", None)
        dense_shape = layer.lead + (B.EinsumPlan(layer.einsum).kernel_shape(layer.in_shape, layer.out_shape, layer.batch)
                                    if layer.einsum is not None else layer.in_shape + layer.out_shape)
        L.check_layer(f"params/{layer.path}", kernel, a, b, in_shape=layer.in_shape, out_shape=layer.out_shape,
                      stack=layer.lead + layer.batch, r=spec.lora_config.r if layer.lora else None,
                      dense_shape=dense_shape)
        node["kernel"] = _merged(layer, kernel, a, b, scaling, dtype or B.kernel_dtype(kernel))
    base_cls = type(qlora_model)._qjax_base_class
    model = _instantiate(base_cls, qlora_model)
    if requantize is None:
        return model, variables
    layers = tuple(dataclasses.replace(s, lora=False, quantized=True, quant_config=requantize) for s in spec.layers)
    for layer in layers:
        where = layer.path.split("/") + ["kernel"]
        _set(params, where, _quantize(layer, _get(params, where), requantize))
    conv = ConversionSpec(layers, None, requantize, spec.backend)
    return _instantiate(_converted_class(base_cls, conv), model), variables
