"""Lowering one branch of `jax.lax.platform_dependent` for its own platform only.

`platform_dependent(x, cuda=kernel, default=xla)` keeps, per lowering platform, only that
platform's branch, but lowers a kept branch's operations for *every* platform of the module: in
a `jax.export(..., platforms=["cpu", "cuda"])` the CUDA branch's `pallas_call` would also be
lowered for the CPU, which raises ("Only interpret mode is supported on CPU backend").
`on_platform(platform, fn, *args)` stages fn as one primitive whose lowering narrows the module's
platforms to `platform`, so the kernel is lowered for CUDA alone and the CPU takes its own branch.
"""

from __future__ import annotations

import jax
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import batching, mlir

_on_platform_p = Primitive("qjax_on_platform")
_on_platform_p.multiple_results = True


def on_platform(platform: str, fn, *args):
    """fn(*args) (pytrees in and out), lowered for `platform` only: use inside that platform's branch."""
    flat, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(lambda *leaves: fn(*jax.tree.unflatten(tree, leaves)),
                                       return_shape=True)(*flat)
    outs = _on_platform_p.bind(*flat, jaxpr=closed, platform=platform)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _lower(ctx, *args, jaxpr, platform):
    narrowed = ctx.replace(module_context=ctx.module_context.replace(platforms=(platform,)))
    return mlir.lower_fun(jaxpr_as_fun(jaxpr), multiple_results=True)(narrowed, *args)


def _batch(args, dims, *, jaxpr, platform):
    outs = on_platform(platform, jax.vmap(jaxpr_as_fun(jaxpr), in_axes=tuple(dims)), *args)
    return outs, [0] * len(outs)


_on_platform_p.def_impl(lambda *args, jaxpr, platform: jaxpr_as_fun(jaxpr)(*args))
_on_platform_p.def_abstract_eval(lambda *avals, jaxpr, platform: jaxpr.out_avals)
mlir.register_lowering(_on_platform_p, _lower)
batching.primitive_batchers[_on_platform_p] = _batch
