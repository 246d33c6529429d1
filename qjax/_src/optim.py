"""optax helpers for QLoRA training: adapters_only(tx), split_adapters / merge_adapters, and
skip_nonfinite(tx) / raise_if_nonfinite(opt_state) against NaN/Inf steps.

An adapter leaf is one whose key path names a leaf of a registered adapter variant (LoRA's
`lora_a` / `lora_b`, see `qjax.register_variant`; Linen params, NNX states and plain dicts alike);
pass `is_adapter(path_str) -> bool` to choose otherwise. Of those, the leaves no variant trains
get zero updates. QuantizedArrays count as one frozen leaf each.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qjax._src.adapters.variant import adapter_names, trainable_names
from qjax._src.errors import named
from qjax._src.paths import path_str
from qjax._src.core.qarray import is_quantized


def is_adapter_path(path: str) -> bool:
    """True when a "/"-joined key path has a component naming a registered adapter leaf (`lora_a`, ...)."""
    names = adapter_names()
    return any(part in names for part in path.split("/"))


def _trained(flat: dict[str, Any]) -> dict[str, Any]:
    """The entries of a {path: leaf} dict that are not adapter leaves no registered variant trains."""
    frozen = adapter_names() - trainable_names()
    return {name: x for name, x in flat.items() if not any(part in frozen for part in name.split("/"))}


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
    """The inner transformation's state over the trained adapter leaves alone, keyed by path."""

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

    init(params): `tx.init` of the adapter leaves only, so the state is adapter-sized; raises
    ValueError when params hold no adapter leaf (an unconverted model).
    update(updates, state, params): `updates` may be the whole tree (frozen leaves as float0 from
    `jax.grad(..., allow_int=True)`, as zeros, or anything) or hold the adapter leaves alone. The
    returned updates have the structure of `params` when given (otherwise of `updates`), with
    exact zeros in each frozen leaf's own dtype, so `optax.apply_updates(params, updates)` leaves
    every frozen leaf (integer codes bit for bit) as it was.
    Put gradient clipping and schedules inside: `adapters_only(optax.chain(clip, adamw(schedule)))`.
    Adapter leaves that no registered variant trains (a variant's fixed buffers) get zero updates
    and no state, as `optax.partition` with `optax.set_to_zero` would give them; the state is `tx`'s
    over the trained leaves alone, keyed by path, the layout resume checkpoints have always had.
    """

    def init_fn(params):
        flat = _flat(params, is_adapter)
        if not flat:
            names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_leaf)[0]]
            rule = (f"leaves whose path has a component named {' or '.join(map(repr, sorted(adapter_names())))}"
                    if is_adapter is is_adapter_path else f"leaves for which is_adapter={is_adapter!r} is True")
            raise ValueError(f"adapters_only: found no adapter leaves ({rule}) among the {len(names)} leaves of "
                             f"params ({names[:5]}{' ...' if len(names) > 5 else ''}); the optimizer would train "
                             "nothing. Convert the model first (qjax.linen.convert / qjax.nnx.convert) and pass its "
                             "params, or pass is_adapter=")
        return AdaptersOnlyState(tx.init(_trained(flat)))

    def update_fn(updates, state, params=None):
        flat_u = _trained(_flat(updates, is_adapter))
        flat_p = _trained(_flat(params, is_adapter)) if params is not None else None
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
            if name in new_u and leaf is not None and not is_quantized(leaf):
                return new_u[name]
            return _zeros_like(leaf)

        return jax.tree_util.tree_map_with_path(fill, like, is_leaf=_is_leaf), AdaptersOnlyState(inner)

    def state_keys(state):
        """The trained adapter paths at init: the keys of the first per-leaf dict in tx's state (None: none)."""
        for sub in jax.tree_util.tree_leaves(state.inner, is_leaf=lambda x: isinstance(x, dict)):
            if isinstance(sub, dict):
                return set(sub)
        return None

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- non-finite steps


class SkipNonfiniteState(NamedTuple):
    """State of `skip_nonfinite`: the inner state and int32 step counters (scalars).

    count: updates seen. notfinite_count: consecutive skipped updates up to the last one (0 after
    a finite step). total_notfinite: skipped updates in all.
    """

    inner: optax.OptState
    count: jax.Array
    notfinite_count: jax.Array
    total_notfinite: jax.Array


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _all_finite(tree) -> jax.Array:
    """True when every float leaf of tree is free of NaN and Inf (integer and float0 leaves ignored)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if _is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _select(ok, new, old):
    """new where ok, else old, leaf by leaf (non-array and float0 leaves: new)."""
    def pick(n, o):
        if not _is_array(n) or np.dtype(n.dtype) == jax.dtypes.float0:
            return n
        return jnp.where(ok, n, o)
    return jax.tree_util.tree_map(pick, new, old)


def _integer_leaves(tree) -> list[str]:
    """'path (shape=... dtype=...)' of the integer, bool and float0 array leaves of tree."""
    return [named(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if _is_array(x) and not jnp.issubdtype(x.dtype, jnp.inexact)]


def skip_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`tx` whose updates are skipped, whole, on any step with a NaN or Inf.

    A step is bad when a float leaf of the incoming updates (gradients) or of `tx`'s outgoing
    updates is not finite; it returns exact zeros (in each leaf's dtype) and the inner state
    unchanged (so `tx`'s own step count and schedules do not advance), so
    `optax.apply_updates(params, updates)` leaves the params as they were. Finite steps return
    `tx`'s updates and state bit for bit. Unlike `optax.apply_if_finite`, a bad update is never
    let through: call `raise_if_nonfinite(opt_state, max_consecutive)` on the host after each step
    (or every few) to stop a run that does not recover. Works under `jax.jit` and composes with
    `adapters_only` either way round, `optax.chain`, clipping and schedules. Integer and float0
    leaves (a QuantizedArray's codes, `jax.grad(..., allow_int=True)`) are not checked.
    State: SkipNonfiniteState. Raises TypeError, naming the leaves, when `tx` fails on integer or
    float0 leaves (a plain optax optimizer over a QLoRA tree: wrap it in `adapters_only`).
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        zero = jnp.zeros([], jnp.int32)
        return SkipNonfiniteState(tx.init(params), zero, zero, zero)

    def update_fn(updates, state, params=None, **extra_args):
        try:
            new_updates, new_inner = tx.update(updates, state.inner, params, **extra_args)
        except TypeError as e:
            frozen = _integer_leaves(updates)
            if not frozen:
                raise
            raise TypeError(f"the optimizer cannot update integer / float0 leaves ({len(frozen)}: "
                            f"{', '.join(frozen[:3])}{' ...' if len(frozen) > 3 else ''}): these are frozen "
                            "QuantizedArray codes. Train the adapters only: wrap the optimizer in "
                            f"qjax.optim.adapters_only(...). (The optimizer raised: {str(e).splitlines()[0]})") from e
        ok = _all_finite(updates) & _all_finite(new_updates)
        zeros = jax.tree_util.tree_map(lambda u: jnp.zeros_like(u) if _is_array(u) else u, new_updates)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        return _select(ok, new_updates, zeros), SkipNonfiniteState(
            _select(ok, new_inner, state.inner), state.count + 1, (state.notfinite_count + bad) * bad,
            state.total_notfinite + bad)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _host_int(x) -> int:
    return int(np.asarray(x.get_value() if hasattr(x, "get_value") else x))


def raise_if_nonfinite(opt_state, max_consecutive: int = 5) -> int:
    """Host-side stop for `skip_nonfinite`: raises once more than `max_consecutive` steps in a row were bad.

    opt_state: any optimizer state holding a SkipNonfiniteState (nested in chains, `adapters_only`,
    or an `nnx.Optimizer`, which may be passed itself). Reads three int32 scalars from the device.
    Returns the number of steps skipped in all (for logging). Raises FloatingPointError naming the
    step numbers (the params are those after the last finite step, fit to save) and ValueError when
    opt_state holds no SkipNonfiniteState.
    """
    if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, (int, np.integer)) or max_consecutive < 0:
        raise ValueError(f"max_consecutive must be an int >= 0, got {max_consecutive!r}")
    tree = getattr(opt_state, "opt_state", opt_state)  # an nnx.Optimizer
    found = [s for s in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, SkipNonfiniteState))
             if isinstance(s, SkipNonfiniteState)]
    if not found:
        raise ValueError(f"raise_if_nonfinite: the {type(opt_state).__name__} holds no SkipNonfiniteState; build "
                         "the optimizer with qjax.optim.skip_nonfinite(tx)")
    total = 0
    for s in found:
        count, bad, total_bad = _host_int(s.count), _host_int(s.notfinite_count), _host_int(s.total_notfinite)
        total += total_bad
        if bad > max_consecutive:
            raise FloatingPointError(
                f"{bad} consecutive optimizer steps (steps {count - bad + 1} to {count}) had NaN/Inf gradients or "
                f"updates, more than max_consecutive={max_consecutive}; skip_nonfinite skipped them ({total_bad} "
                f"skipped in all), so the params and optimizer state are those after step {count - bad}. Lower the "
                "learning rate, clip gradients (optax.clip_by_global_norm), or check the loss and the batches")
    return total
