"""Finding adapters in a variables tree or an NNX model, and putting them back.

Adapters are the leaves named by a registered adapter variant (`variant.adapter_names`: LoRA's
`lora_a` (*in, r) and `lora_b` (r, *out), with the leading axes of stacked layers, then those of
per-expert layers, first); their module is the path above them, and the set of leaf names there
tells its variant. Works over plain nested dicts (Linen variables), `nnx.State`, and NNX modules
(read with `nnx.state`, written with `nnx.update`), without importing the Flax modules that
create them.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from qjax._src.paths import path_keys, set_in
from qjax._src.core.qarray import is_quantized
from qjax._src.adapters.variant import LoRA, adapter_names, variant_for

Path = tuple  # of str (dict keys / attribute names) and int (sequence indices)


def is_nnx_module(x) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, nnx.Module)


def is_nnx(variables_or_model) -> bool:
    """An NNX module or `nnx.State`: its layer lists are paths `layers/0`, Linen's are `layers_0`."""
    return is_nnx_module(variables_or_model) or hasattr(variables_or_model, "to_pure_dict")


def stack_component(path, stacked_module: str, nnx: bool) -> tuple[int | None, str]:
    """Where the scanned / vmapped module `stacked_module` sits in a module path.

    Returns (index of its component, "") or (None, why not, a clause to append to a sentence
    about the module): the name is absent or repeated, or (NNX) a list index follows it
    (`layers/0`: one layer of a list, not a stack).
    """
    hits = [j for j, k in enumerate(path) if str(k) == stacked_module]
    if len(hits) != 1:
        return None, (f" and {len(hits)} path components named stacked_module={stacked_module!r}; it must name "
                      "the scanned / vmapped module, once in the path")
    j = hits[0]
    if nnx and j + 1 < len(path) and str(path[j + 1]).isdigit():
        return None, (f", but its path already indexes {stacked_module!r} (one layer of a list), so its leading "
                      "axis is not a stack of layers")
    return j, ""


def layer_path(path, j: int, i: int, stacked_module: str, nnx: bool) -> tuple:
    """Layer i's module path: component j (the stack) becomes `{stacked_module}_{i}` (Linen, as
    unscanned Linen models name layers) or `{stacked_module}/{i}` (NNX)."""
    path = tuple(path)
    return path[:j + 1] + (i,) + path[j + 1:] if nnx else path[:j] + (f"{stacked_module}_{i}",) + path[j + 1:]


def is_adapter_path(path) -> bool:
    """True when a key path (a tuple of keys) ends in a registered variant's adapter leaf name."""
    return bool(path) and str(path[-1]) in adapter_names()


def as_tree(variables_or_model) -> Any:
    """The tree to read: the module's `nnx.state` adapters as a pure dict, or the tree itself."""
    if is_nnx_module(variables_or_model):
        from flax import nnx
        return _to_pure(nnx.state(variables_or_model, lambda path, _: is_adapter_path(path)))
    if hasattr(variables_or_model, "to_pure_dict"):  # nnx.State
        return _to_pure(variables_or_model)
    return variables_or_model


def _to_pure(state):
    from flax import nnx
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def flat_adapters(variables_or_model) -> dict[Path, Any]:
    """{path: array} for every adapter leaf (`is_adapter_path`), in tree order.

    Raises ValueError when there is none (naming what was searched).
    """
    tree = as_tree(variables_or_model)
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    out = {path_keys(p): x for p, x in leaves if is_adapter_path(path_keys(p))}
    if not out:
        raise ValueError(f"found no adapters (leaves named {tuple(sorted(adapter_names()))}) in the given "
                         f"{type(variables_or_model).__name__}; convert the model to QLoRA first")
    return out


def modules(flat: dict[Path, Any]) -> dict[Path, dict[str, Any]]:
    """Groups adapters by module path: {module_path: {leaf name: array}} (LoRA: {"lora_a": A, "lora_b": B}).

    Raises ValueError for a module whose leaf names are not exactly one registered variant's
    (e.g. only one of LoRA's pair) or whose shapes do not fit that variant's layout.
    """
    groups: dict[Path, dict[str, Any]] = {}
    for path, x in flat.items():
        groups.setdefault(path[:-1], {})[str(path[-1])] = x
    for mod, leaves in groups.items():
        name = "/".join(map(str, mod))
        variant = variant_for(leaves, f"module {name!r}")
        if variant.layout({k: np.shape(v) for k, v in leaves.items()}) is None:
            shapes = ", ".join(f"{k} shape={np.shape(v)}" for k, v in leaves.items())
            raise ValueError(f"module {name!r}: {shapes} do not fit the {variant.name!r} adapter's layout "
                             f"{dict(variant.axes)}" + (" (they do not chain as (*lead, *in, r) @ (*lead, r, *out))"
                                                        if variant is LoRA else ""))
    return groups


def stacked_axes(leaves: dict[str, Any]) -> int | None:
    """How many leading axes one module's adapter leaves share ({leaf name: array or shape}).

    0 for a plain layer, k when the first k axes are stacked: layers of scanned / vmapped
    modules, or the batch axes of a per-expert (batched einsum) layer, which the shapes cannot
    tell apart. None when the shapes fit no layout of the module's variant. When several k fit (a
    stack of as many layers or experts as the rank), the largest is taken.
    """
    shapes = {k: tuple(v) if isinstance(v, tuple) else np.shape(v) for k, v in leaves.items()}
    layout = variant_for(shapes).layout(shapes)
    return None if layout is None else len(layout.lead)


def nest(flat: dict[Path, Any]) -> dict:
    """{("a", "b"): x} -> {"a": {"b": x}} (keys made str, as orbax stores them)."""
    out: dict = {}
    for path, x in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(str(k), {})
        node[str(path[-1])] = x
    return out


def replace_adapters(variables_or_model, new: dict[Path, Any]):
    """A copy of the tree with the adapters at `new`'s paths replaced (an NNX model: in place)."""
    if is_nnx_module(variables_or_model):
        from flax import nnx
        model = variables_or_model
        state = nnx.state(model, lambda path, _: is_adapter_path(path))
        pure = _to_pure(state)
        for path, x in new.items():
            set_in(pure, path, x)
        if hasattr(nnx, "replace_by_pure_dict"):
            nnx.replace_by_pure_dict(state, pure)
        else:
            state.replace_by_pure_dict(pure)
        nnx.update(model, state)
        return model

    def visit(path, x):
        return new.get(path_keys(path), x)

    return jax.tree_util.tree_map_with_path(visit, variables_or_model, is_leaf=is_quantized)
