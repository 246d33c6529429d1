"""Parameter-level conversion of NNX models (`routing`): any `nnx.Param` a matmul reads, whatever its class.

A converted parameter stays an attribute of its module ("owner"): its Variable becomes a `BaseParam`
holding the quantized base, the adapters become `LoRAParam`s beside it (`owner.lora_a`, or
`owner.<name>_lora.lora_a` when the owner holds several converted parameters), and the owner's class
becomes a subclass whose public methods bind the parameter (it reads as a `routing.RoutedWeight`)
while they run. Everything else about the module (attributes, methods, call signature) is the user's.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qjax._src.flax import planner as P
from qjax._src.flax import routing as R
from qjax._src.flax.nnx_layers import BaseParam, LoRAParam
from qjax._src.paths import path_str


@dataclasses.dataclass(frozen=True)
class Entry:
    """One routed parameter of an owner module: rel (its attribute path there), route (None while
    discovering), adapters (the attribute holding its adapters; None: the owner itself)."""

    rel: tuple
    route: R.Route | None = None
    adapters: str | None = None


class LoRAAdapters(nnx.Module):
    """The adapters of one parameter of a module that holds several converted parameters."""


def node(root, parts):
    """root[parts[0]][parts[1]]... over modules (attributes) and nnx.List / nnx.Dict / list / dict items."""
    for p in parts:
        root = root[p] if isinstance(root, (list, tuple, dict, nnx.List, nnx.Dict)) else getattr(root, p)
    return root


def replace(root, parts, value) -> None:
    """Sets node(root, parts) to value in place; TypeError where it sits in a tuple."""
    parent, key = node(root, parts[:-1]), parts[-1]
    if isinstance(parent, (list, dict, nnx.List, nnx.Dict)):
        parent[key] = value
    elif isinstance(parent, tuple):
        raise TypeError(f"{path_str(parts)} sits in a tuple, which cannot be updated in place; use a list")
    else:
        setattr(parent, key, value)


def is_routed(module) -> bool:
    return "_qjax_routes" in vars(module)


def routed_modules(model) -> list[tuple[tuple, Any]]:
    return [(tuple(parts), m) for parts, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and is_routed(m)]


# ----------------------------------------------------------------------------- binding


def _adapters(module, e: Entry) -> dict | None:
    lora = e.route.lora_config
    if lora is None:
        return None
    holder = getattr(module, e.adapters) if e.adapters else module
    out = {}
    for leaf in lora.variant.leaves():
        v = getattr(holder, leaf, None)
        out[leaf] = v.get_value() if isinstance(v, nnx.Variable) else None
    return out


def _dropout_key(module, lora):
    drop = getattr(module, "lora_dropout", None)
    if lora is None or lora.dropout == 0 or not isinstance(drop, nnx.Dropout) or drop.deterministic:
        return None
    rngs = drop.rngs
    if rngs is None:
        return None
    return rngs[drop.rng_collection]() if isinstance(rngs, nnx.Rngs) else rngs()


def _swap(var, value):
    """Sets a Variable's value for the length of one method call and returns the old one. Not through
    `set_value`: that refuses a Variable created outside the current trace (a model called under
    `jax.checkpoint` / `lax.scan` closures), and the old value is always put back (`_binding`)."""
    if "_raw_value" in getattr(type(var), "__slots__", ()) or hasattr(var, "_raw_value"):
        old = var._raw_value
        object.__setattr__(var, "_raw_value", value)
        return old
    old = var.get_value()
    var.set_value(value)
    return old


def _bind(module) -> list:
    """Sets each routed parameter of `module` to what its methods read; returns [(variable, stored value)]."""
    out = []
    for e in module._qjax_routes:
        var = node(module, e.rel)
        stored = var.get_value()
        if isinstance(stored, R.Probe):
            if stored.bound:
                continue
            bound = stored.bind(type(module).__name__)
        elif isinstance(stored, R.RoutedWeight):
            continue
        else:
            bound = R.RoutedWeight(stored, _adapters(module, e), _dropout_key(module, e.route.lora_config), e.route)
        out.append((var, _swap(var, bound)))
    return out


def _binding(original: Callable) -> Callable:
    def method(self, *args, **kwargs):
        bound = _bind(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            for var, stored in reversed(bound):
                _swap(var, stored)

    method.__name__, method.__qualname__, method.__doc__ = original.__name__, original.__qualname__, original.__doc__
    method.__wrapped__ = original
    return method


_CLASSES: dict[type, type] = {}


def routed_class(cls: type) -> type:
    """The subclass of `cls` whose public methods (and __call__) bind the routed parameters."""
    if "_qjax_base_class" in vars(cls):
        return cls
    if cls not in _CLASSES:
        ns = {"_qjax_base_class": cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
              "__doc__": cls.__doc__}
        seen: set[str] = set()
        for klass in cls.__mro__:
            if klass in (nnx.Module, object) or klass.__module__.startswith("flax."):
                break
            for name, value in vars(klass).items():
                if name in seen or not inspect.isfunction(value) or (name.startswith("_") and name != "__call__"):
                    continue
                seen.add(name)
                ns[name] = _binding(value)
        _CLASSES[cls] = type(cls.__name__, (cls,), ns)
    return _CLASSES[cls]


def set_routes(module, entries: tuple[Entry, ...]) -> None:
    """Makes `module` an owner of `entries` (or a plain module again, with entries ())."""
    if entries:
        module._qjax_routes = tuple(entries)
        module.__class__ = routed_class(type(module))
    else:
        if is_routed(module):
            del module._qjax_routes
        module.__class__ = vars(type(module)).get("_qjax_base_class", type(module))


# ----------------------------------------------------------------------------- finding


def _is_candidate(v) -> bool:
    if not isinstance(v, nnx.Param) or isinstance(v, nnx.LoRAParam):
        return False
    x = v.get_value()
    return hasattr(x, "shape") and jnp.ndim(x) >= 2 and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def params(model, skip: set[int]) -> list[tuple[tuple, tuple, tuple]]:
    """(parameter path, owner path, path within the owner) of every float nnx.Param of rank >= 2 whose
    Variable is not in `skip` (ids: the kernels of Flax layers the class-based path converts)."""
    nodes = {tuple(parts): n for parts, n in nnx.iter_graph(model)}
    out = []
    for parts, v in nodes.items():
        if id(v) in skip or not _is_candidate(v):
            continue
        k = len(parts) - 1
        while k > 0 and not isinstance(nodes.get(parts[:k]), nnx.Module):
            k -= 1
        out.append((parts, parts[:k], parts[k:]))
    return out


def discover(model, forward: Callable, found: list[tuple[tuple, tuple, tuple]]) -> dict[str, R.Found]:
    """One abstract pass of `forward(model)` with every parameter of `found` read as a Probe; {path: Found}."""
    graphdef, state = nnx.split(model)
    owners: dict[tuple, list] = {}
    for parts, owner, rel in found:
        owners.setdefault(owner, []).append(Entry(rel))

    def run(state):
        m = nnx.merge(graphdef, state)
        for parts, _, _ in found:
            var = node(m, parts)
            var.set_value(R.Probe(var.get_value(), path_str(parts), len(var.get_value().shape)))
        for owner, entries in owners.items():
            set_routes(node(m, owner), tuple(entries))
        forward(m)

    with R.recording() as seen:
        try:
            jax.eval_shape(run, state)
        except Exception as e:
            raise R.trace_failed(type(model).__name__, e) from e
        return seen([path_str(parts) for parts, _, _ in found])


def forward_fn(inputs) -> Callable:
    """inputs: a tuple of positional args (or one array) for model(*inputs), or a callable f(model)."""
    if callable(inputs):
        return inputs
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return lambda m: m(*args)


# ----------------------------------------------------------------------------- converting and merging


def convert(model, planned: list[P.Planned], lora_config, rngs, backend: str) -> None:
    """Applies `planned` routed candidates (handle: (owner path, rel, single, roles)) to `model` in place."""
    from qjax._src.adapters import lora as L
    entries: dict[tuple, list[Entry]] = {}
    for p in planned:
        owner_parts, rel, single, roles = p.candidate.handle
        owner = node(model, owner_parts)
        var = node(owner, rel)
        dense = var.get_value()
        lc = lora_config if p.lora else None
        key = rngs.params() if lc is not None and not L.wants_loftq(lc, p.quant_config) else None
        base, adapters = P.adapter_params(p.candidate.where, p.layout, dense, lc, p.quant_config, key)
        replace(owner, rel, BaseParam(base))
        attr = None
        if adapters:
            holder = owner
            if not single:
                attr = "_".join(map(str, rel)) + "_lora"
                holder = LoRAAdapters()
                setattr(owner, attr, holder)
            for leaf, value in adapters.items():
                if getattr(holder, leaf, None) is not None:
                    raise ValueError(f"{p.candidate.where}: its module already has an attribute {leaf!r}; the "
                                     "adapters cannot be placed beside it")
                setattr(holder, leaf, LoRAParam(value))
            if lc.dropout > 0 and getattr(owner, "lora_dropout", None) is None:
                owner.lora_dropout = nnx.Dropout(lc.dropout, rngs=rngs)
        route = R.Route(p.candidate.where, tuple(dense.shape), jnp.dtype(dense.dtype), roles, lc, p.quant_config,
                        backend)
        entries.setdefault(owner_parts, []).append(Entry(rel, route, attr))
    for owner_parts, es in entries.items():
        owner = node(model, owner_parts)
        set_routes(owner, tuple(getattr(owner, "_qjax_routes", ())) + tuple(es))


def merge(model, dtype, requantize, backend_default: str = "auto") -> int:
    """Folds the adapters of every routed parameter into a dense one (or requantizes it); returns how many."""
    n = 0
    for parts, owner in routed_modules(model):
        kept = []
        for e in owner._qjax_routes:
            route, var = e.route, node(owner, e.rel)
            adapters = _adapters(owner, e)
            w = P.merged_kernel(route.path, route.layout, var.get_value(), adapters or {}, route.lora_config, dtype)
            if route.lora_config is not None:
                if e.adapters:
                    delattr(owner, e.adapters)
                else:
                    for leaf in route.lora_config.variant.leaves():
                        if hasattr(owner, leaf):
                            delattr(owner, leaf)
            if requantize is None:
                replace(owner, e.rel, nnx.Param(w))
            else:
                base, _ = P.adapter_params(route.path, route.layout, w, None, requantize, None)
                replace(owner, e.rel, BaseParam(base))
                kept.append(Entry(e.rel, dataclasses.replace(route, lora_config=None, quant_config=requantize)))
            n += 1
        if getattr(owner, "lora_dropout", None) is not None and isinstance(owner.lora_dropout, nnx.Dropout):
            delattr(owner, "lora_dropout")
        set_routes(owner, tuple(kept))
    return n
