"""Parameter-level conversion of Linen models (`routing`): any param a matmul reads, whatever its module.

A converted param keeps its place in the variables: `params/<module>/<name>` holds the quantized base,
its adapters sit beside it (`<module>/lora_a`, or `<module>/<name>_lora/lora_a` when the module holds
several converted params). While a converted model's methods run, `self.param(name, ...)` of such a
param returns a `routing.RoutedWeight` (Flax's `Scope.param` is wrapped once per process; outside a
converted model it does what it always did).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Mapping

import jax.numpy as jnp
from flax.core import scope as flax_scope

from qjax._src.flax import planner as P
from qjax._src.flax import routing as R
from qjax._src.paths import lookup


@dataclasses.dataclass(frozen=True)
class ParamRoute:
    """One routed param of a converted Linen model: its path in `params`, its route, and the name of the
    node holding its adapters (None: its module itself)."""

    path: str
    route: R.Route
    adapters: str | None = None

    @property
    def module(self) -> str:
        return self.path.rpartition("/")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclasses.dataclass(frozen=True)
class _Context:
    root: tuple[str, ...]
    routes: Mapping[str, ParamRoute] | None  # None: discovering (params read as Probes)


class _Stack(threading.local):
    def __init__(self):
        self.items: list[_Context] = []


_stack = _Stack()
_ORIG_PARAM: list = []
_lock = threading.Lock()


class active:
    """Context manager: params read inside are routed by `routes` (None: read as Probes), relative to root."""

    def __init__(self, root: tuple[str, ...], routes: Mapping[str, ParamRoute] | None):
        self.ctx = _Context(tuple(root), routes)

    def __enter__(self):
        _install()
        _stack.items.append(self.ctx)
        return self

    def __exit__(self, *exc):
        _stack.items.pop()


def _install() -> None:
    R.install()
    with _lock:
        if _ORIG_PARAM:
            return
        orig = flax_scope.Scope.param
        _ORIG_PARAM.append(orig)

        def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
            ctx = _stack.items[-1] if _stack.items else None
            path = tuple(self.path)
            if ctx is None or path[:len(ctx.root)] != ctx.root or not self.has_variable("params", name):
                return orig(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
            rel = "/".join(path[len(ctx.root):] + (name,))
            if ctx.routes is None:
                value = orig(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
                if hasattr(value, "shape") and jnp.ndim(value) >= 2 and jnp.issubdtype(value.dtype, jnp.floating):
                    return R.Probe(value, rel, jnp.ndim(value), bound="linen")
                return value
            found = ctx.routes.get(rel)
            if found is None:
                return orig(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
            self.reserve(name, "params")
            return _bound(self, name, found)

        param.__wrapped__ = orig
        param.__doc__ = orig.__doc__
        flax_scope.Scope.param = param


def _bound(scope, name: str, found: ParamRoute) -> R.RoutedWeight:
    stored = scope.get_variable("params", name)
    lora = found.route.lora_config
    adapters = None
    if lora is not None:
        if found.adapters:
            node = scope.get_variable("params", found.adapters) if scope.has_variable("params", found.adapters) else {}
            adapters = {leaf: node.get(leaf) for leaf in lora.variant.leaves()}
        else:
            adapters = {leaf: scope.get_variable("params", leaf) if scope.has_variable("params", leaf) else None
                        for leaf in lora.variant.leaves()}
    key = scope.make_rng("dropout") if lora is not None and lora.dropout > 0 and scope.has_rng("dropout") else None
    return R.RoutedWeight(stored, adapters, key, found.route)


# ----------------------------------------------------------------------------- converting and merging


def convert(params: dict, planned: list[P.Planned], lora_config, keys, backend: str) -> tuple[ParamRoute, ...]:
    """Writes the base and adapters of each routed candidate (handle: (param path, single, roles)) into
    `params` in place; returns their routes."""
    out = []
    for p, key in zip(planned, keys):
        path, single, roles = p.candidate.handle
        parts = path.split("/")
        dense = p.candidate.kernel
        lc = lora_config if p.lora else None
        base, adapters = P.adapter_params(f"params/{path}", p.layout, dense, lc, p.quant_config, key)
        module = lookup(params, parts[:-1])
        module[parts[-1]] = base
        attr = None
        if adapters:
            if single:
                clash = [leaf for leaf in adapters if leaf in module]
                if clash:
                    raise ValueError(f"params/{path}: its module already has {clash}; the adapters cannot be placed "
                                     "beside it")
                module.update(adapters)
            else:
                attr = f"{parts[-1]}_lora"
                module[attr] = dict(adapters)
        route = R.Route(path, tuple(dense.shape), jnp.dtype(dense.dtype), roles, lc, p.quant_config, backend)
        out.append(ParamRoute(path, route, attr))
    return tuple(out)


def merge(params: dict, routes: tuple[ParamRoute, ...], dtype, requantize) -> tuple[ParamRoute, ...]:
    """Folds each routed param's adapters into it in place (dense, or quantized again with `requantize`);
    returns the routes left (the requantized ones)."""
    kept = []
    for found in routes:
        route, parts = found.route, found.path.split("/")
        module = lookup(params, parts[:-1])
        adapters: dict[str, Any] = {}
        if route.lora_config is not None:
            if found.adapters:
                adapters = module.pop(found.adapters)
            else:
                adapters = {leaf: module.pop(leaf) for leaf in route.lora_config.variant.leaves() if leaf in module}
        w = P.merged_kernel(f"params/{found.path}", route.layout, module[parts[-1]], adapters, route.lora_config,
                            dtype)
        if requantize is None:
            module[parts[-1]] = w
        else:
            base, _ = P.adapter_params(f"params/{found.path}", route.layout, w, None, requantize, None)
            module[parts[-1]] = base
            kept.append(ParamRoute(found.path, dataclasses.replace(route, lora_config=None, quant_config=requantize)))
    return tuple(kept)
