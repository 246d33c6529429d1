"""optax helpers for adapter-only training: adapters_only(tx), split_adapters / merge_adapters.

An adapter leaf is one whose key path names `lora_a` or `lora_b` (Linen params, NNX states and
plain dicts alike); pass `is_adapter(path_str) -> bool` to choose otherwise. QuantizedArrays count
as one frozen leaf each.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qjax._src.adapters import ADAPTER_NAMES
from qjax._src.policy import path_str
from qjax._src.qarray import is_quantized


def is_adapter_path(path: str) -> bool:
    """True when a "/"-joined key path has a `lora_a` or `lora_b` component."""
    return any(part in ADAPTER_NAMES for part in path.split("/"))


def _is_leaf(x) -> bool:
    return x is None or is_quantized(x)


def _flat(tree, is_adapter) -> dict[str, Any]:
    """{path: leaf} of the adapter leaves of tree (array leaves only; None placeholders skipped)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]:
        name = path_str(path)
        if leaf is not None and not is_quantized(leaf) and is_adapter(name):
            out[name] = leaf
    return out


def split_adapters(tree, is_adapter: Callable[[str], bool] = is_adapter_path):
    """(adapters, rest): two trees shaped like `tree`, each holding None where the other has a leaf.

    Differentiate the adapters alone with
    `jax.grad(lambda a: loss(merge_adapters(a, rest)))(adapters)`; the frozen rest (integer codes
    included) never meets autodiff.
    """
    def pick(want):
        return lambda p, x: x if x is not None and (not is_quantized(x) and is_adapter(path_str(p))) == want \
            else None
    adapters = jax.tree_util.tree_map_with_path(pick(True), tree, is_leaf=_is_leaf)
    rest = jax.tree_util.tree_map_with_path(pick(False), tree, is_leaf=_is_leaf)
    return adapters, rest


def merge_adapters(adapters, rest):
    """The inverse of `split_adapters`: each leaf taken from whichever tree holds it."""
    return jax.tree_util.tree_map(lambda a, r: r if a is None else a, adapters, rest, is_leaf=_is_leaf)


class AdaptersOnlyState(NamedTuple):
    """The inner transformation's state over the adapter leaves alone, keyed by path."""

    inner: optax.OptState


def _zeros_like(x):
    if is_quantized(x):
        return jax.tree_util.tree_map(jnp.zeros_like, x)
    if x is None:
        return None
    if np.dtype(x.dtype) == jax.dtypes.float0:
        return x
    return jnp.zeros(jnp.shape(x), x.dtype)


def adapters_only(tx: optax.GradientTransformation,
                  is_adapter: Callable[[str], bool] = is_adapter_path) -> optax.GradientTransformation:
    """`tx` applied to the adapter leaves; zero updates and no state at all for everything else.

    init(params): `tx.init` of the adapter leaves only, so the state is adapter-sized.
    update(updates, state, params): `updates` may be the whole tree (frozen leaves as float0 from
    `jax.grad(..., allow_int=True)`, as zeros, or anything) or hold the adapter leaves alone. The
    returned updates have the structure of `params` when given (otherwise of `updates`), with
    exact zeros in each frozen leaf's own dtype, so `optax.apply_updates(params, updates)` leaves
    every frozen leaf (integer codes bit for bit) as it was.
    Put gradient clipping and schedules inside: `adapters_only(optax.chain(clip, adamw(schedule)))`.
    """

    def init_fn(params):
        return AdaptersOnlyState(tx.init(_flat(params, is_adapter)))

    def update_fn(updates, state, params=None):
        flat_u = _flat(updates, is_adapter)
        flat_p = _flat(params, is_adapter) if params is not None else None
        expected = state_keys(state)
        if expected is not None and set(flat_u) != expected:
            missing = sorted(expected - set(flat_u))
            extra = sorted(set(flat_u) - expected)
            raise ValueError(f"adapters_only: the updates' adapter leaves differ from those at init: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")
        new_u, inner = tx.update(flat_u, state.inner, flat_p)
        like = params if params is not None else updates

        def fill(path, leaf):
            name = path_str(path)
            if leaf is not None and not is_quantized(leaf) and is_adapter(name):
                return new_u[name]
            return _zeros_like(leaf)

        return jax.tree_util.tree_map_with_path(fill, like, is_leaf=_is_leaf), AdaptersOnlyState(inner)

    def state_keys(state):
        for sub in jax.tree_util.tree_leaves(state.inner, is_leaf=lambda x: isinstance(x, dict)):
            if isinstance(sub, dict):
                return set(sub)
        return None

    return optax.GradientTransformation(init_fn, update_fn)
