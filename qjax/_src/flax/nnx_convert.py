"""`qjax.nnx.convert` / `merge`: swap the Linear layers of an NNX model for QLoRA layers, in place."""

from __future__ import annotations

import collections
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qjax._src.adapters import lora as L
from qjax._src.adapters.config import LoraConfig, check_configs
from qjax._src.core.policy import QuantConfig
from qjax._src.errors import ConversionWarning, describe
from qjax._src.flax import nnx_params as NP
from qjax._src.flax import planner as P
from qjax._src.flax import routing as R
from qjax._src.paths import path_str
from qjax._src.flax.nnx_layers import BaseParam, QLoRAEinsum, QLoRALinear, QLoRALinearGeneral, QLoRABase, einsum_plan

_LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _find(model, types) -> list[tuple[tuple, Any]]:
    return [(tuple(parts), node) for parts, node in nnx.iter_graph(model) if isinstance(node, types)]


def _check_not_converted(model) -> None:
    nodes = list(nnx.iter_graph(model))
    hits = [p for p, n in nodes if isinstance(n, QLoRABase)] or [p for p, n in nodes if isinstance(n, BaseParam)] \
        or [p for p, _ in NP.routed_modules(model)]
    if hits:
        raise ValueError(f"{path_str(hits[0]) or '<root>'} is already a qjax QLoRA layer: the model is "
                         "already converted (qjax.nnx.merge gives back plain layers)")


def _tuple(x) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _layout(m, where: str) -> P.KernelLayout:
    """The kernel layout of an nnx.Linear / nnx.LinearGeneral / nnx.Einsum; ValueError naming `where` and why not."""
    kernel = m.kernel.get_value()
    if isinstance(m, nnx.Einsum):
        plan = einsum_plan(m, where)
        shape = tuple(m.kernel_shape)
        lead = tuple(kernel.shape[:kernel.ndim - len(shape)])
        return P.KernelLayout(plan.in_shape(shape), plan.out_shape(shape), lead, plan.batch_shape(shape),
                              plan.einsum_str)
    if isinstance(m, nnx.LinearGeneral):
        in_shape, out_shape, axis = _tuple(m.in_features), _tuple(m.out_features), _tuple(m.axis)
        if axis != tuple(range(-len(axis), 0)):
            raise ValueError(f"{where}: nnx.LinearGeneral must contract the trailing axes given as negative numbers "
                             f"(axis={m.axis}, batch_axis={dict(m.batch_axis)}) to be converted")
        batch = tuple(m.batch_axis[k] for k in sorted(m.batch_axis))
        rank = len(batch) + len(in_shape) + len(out_shape)
        return P.KernelLayout(in_shape, out_shape, tuple(kernel.shape[:kernel.ndim - rank]), batch)
    return P.KernelLayout((m.in_features,), (m.out_features,), tuple(kernel.shape[:-2]))


class _NnxFinder:
    """The nnx.Linear / nnx.LinearGeneral / nnx.Einsum submodules of a model, in graph order;
    each candidate's handle is (path parts, module)."""

    layer_kinds = "nnx.Linear / nnx.LinearGeneral / nnx.Einsum"

    def __init__(self, model):
        self.model, self.model_name = model, type(model).__name__

    def candidates(self) -> list[P.Candidate]:
        out = []
        for parts, m in _find(self.model, _LINEAR_TYPES):
            path = path_str(parts)
            try:
                layout, why = _layout(m, path), ""
            except ValueError as e:
                layout, why = None, str(e)
            out.append(P.Candidate(path, path, m.kernel.get_value(), layout, why, handle=(parts, m)))
        return out

    def unconvertible(self) -> list[P.LeftDense]:
        return []


class _ModelFinder:
    """The Flax linear layers (`_NnxFinder`) and, traced on `inputs`, every other float nnx.Param of rank >= 2
    that the model's matmuls read (`nnx_params`): a parameter whose module holds no other such parameter is
    named by the module's path ("layers/0/attn/q_proj"), else by its own ("layers/0/mlp/gate_proj")."""

    layer_kinds = _NnxFinder.layer_kinds

    def __init__(self, model, inputs):
        self.model_name = type(model).__name__
        self.layers = _NnxFinder(model).candidates()
        skip = {id(m.kernel) for _, m in _find(model, _LINEAR_TYPES)}
        found = NP.params(model, skip)
        self.routed: list[P.Candidate] = []
        self._unconvertible: list[P.LeftDense] = []
        if inputs is None:
            for parts, _, _ in found:
                x = NP.node(model, parts).get_value()
                self._unconvertible.append(P.LeftDense(path_str(parts), tuple(x.shape), x.dtype, (
                    "not traced; pass inputs= to qjax.nnx.convert so it can find the matmuls that read it")))
            return
        seen = NP.discover(model, NP.forward_fn(inputs), found)
        per_owner = collections.Counter(owner for parts, owner, _ in found if seen[path_str(parts)].read_by_matmul)
        for parts, owner, rel in found:
            path, f = path_str(parts), seen[path_str(parts)]
            x = NP.node(model, parts).get_value()
            if f.roles is None:
                if f.read_by_matmul:
                    self._unconvertible.append(P.LeftDense(path, tuple(x.shape), x.dtype, f.why))
                continue
            single = per_owner[owner] == 1 and len(owner) > 0
            self.routed.append(P.Candidate(path_str(owner) if single else path, path, x, R.layout_of(x.shape, f.roles),
                                           handle=(owner, rel, single, f.roles), kernel_path=path))

    def candidates(self) -> list[P.Candidate]:
        return list(self.layers) + self.routed

    def unconvertible(self) -> list[P.LeftDense]:
        return list(self._unconvertible)


def convert(model, lora_config: LoraConfig | None = LoraConfig(), quant_config: QuantConfig | None = QuantConfig(),
            rngs: nnx.Rngs | None = None, *, inputs=None, strict: bool = False, backend: str = "auto"):
    """QLoRA-converts `model` in place: its Flax linear layers and (with `inputs`) every other parameter its
    matmuls read. Returns the model.

    inputs: example positional args for `model(*inputs)` (a tuple, or one array), or a callable f(model)
    that runs one forward pass. With them, every float nnx.Param of rank >= 2 outside the Flax linear
    layers is traced (abstractly, no compute): one that only matmuls read (`jnp.einsum`, `@`, `jnp.dot`,
    `jnp.matmul`, `jnp.tensordot`, `lax.dot_general`, after `astype` / transposes / integer indexing
    of per-expert axes) inside the methods of the module holding it is converted where it is: its
    Variable becomes a `BaseParam` with the quantized base, its adapters `LoRAParam`s beside it
    (`lora_a` / `lora_b` on that module, or on `<module>.<name>_lora` when the module holds several
    such parameters), and while that module's methods run the parameter reads as a
    `RoutedWeight` whose matmuls compute base + adapter delta. The module keeps its class (a subclass
    that binds the parameter), attributes and methods. Such a parameter is selected by its module's
    path ("layers/0/attn/q_proj": PEFT names like "q_proj" match it) or, when its module holds several,
    by its own ("layers/0/mlp/gate_proj"); QuantConfig patterns see its own path ("…/q_proj/w").
    Never silent: every parameter that feeds a matmul and is left untouched (not selected, too small,
    also read by another operation, or not traced for lack of inputs) is listed with path, shape,
    dtype and why in a `qjax.ConversionWarning`, or raised as ValueError with strict=True.
 An nnx.Einsum's in axes are the kernel axes its equation contracts (kernel
    order), its out axes those it produces (output order); kernel axes shared by input and output
    (per-expert / per-head batched matmuls, and nnx.LinearGeneral's batch_axis) are batch axes:
    one quantized (prod(in), prod(out)) matrix and one adapter pair per batch index.

    A layer at path "a/b/q_proj" gets adapters when `lora_config` selects it ("all-linear": every
    layer but an output head; otherwise target_modules patterns matched in full or against the
    trailing names; minus exclude) and its kernel is quantized with
    `quant_config.config_for("a/b/q_proj/kernel")`, as in qjax.linen.convert: quant_config is a
    QuantConfig or a per-path policy such as `qjax.first_blocks(k, high, low)` (mixed precision; None
    for a path keeps that kernel 16-bit). Layers of stacked (vmapped) modules keep their leading axes.
    lora_config=None quantizes only; quant_config=None is 16-bit LoRA.
    `LoraConfig(init="loftq")`: each layer with adapters and a quantized kernel is initialized by
    `qjax.loftq_init` (scaling folded in, kernels of rank > 2 flattened to (prod(in), prod(out)),
    stacked layers one by one), so the converted model approximates the original one.
    Raises ValueError naming the path for an already converted model, a model without Linear
    layers, a target pattern matching nothing, r larger than a layer's dimensions, or a selected
    layer that cannot be converted (an einsum that is not a projection, a LinearGeneral contracting
    other than its trailing axes: exclude it from LoRA and quantization to leave it alone);
    TypeError for a selected layer with a non-float kernel.
    """
    check_configs(lora_config, quant_config)
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs, got {describe(rngs)}; pass nnx.Rngs(0) or "
                        "nnx.Rngs(params=key)")
    _check_not_converted(model)
    finder = _ModelFinder(model, inputs)
    planned = P.plan(finder, lora_config, quant_config)
    left = P.left_dense(finder, planned, lora_config, quant_config)
    if left and strict:
        raise ValueError(_left_message(model, left))
    if rngs is None:
        if any(p.lora for p in planned):
            raise ValueError("convert needs rngs (nnx.Rngs) to initialize the LoRA adapters")
        rngs = nnx.Rngs(0)
    routed = {id(c) for c in finder.routed}
    for p in planned:
        if id(p.candidate) in routed:
            continue
        parts, m = p.candidate.handle
        kw = dict(rngs=rngs, backend=backend, where=p.path)
        lc = lora_config if p.lora else None
        NP.replace(model, parts, _qlora_class(m)(m, lc, p.quant_config, **kw))
    NP.convert(model, [p for p in planned if id(p.candidate) in routed], lora_config, rngs, backend)
    if inputs is not None and routed:
        _verify(model, inputs)
    if left:
        warnings.warn(ConversionWarning(_left_message(model, left)), stacklevel=2)
    return model


def _left_message(model, left) -> str:
    return (f"qjax.nnx.convert left {len(left)} parameter(s) of {type(model).__name__} that feed a matmul "
            "untouched (no adapters, no quantized base):\n  " + "\n  ".join(map(str, left)))


def _verify(model, inputs) -> None:
    """One abstract pass of the converted model: every routed parameter is read as it was traced."""
    graphdef, state = nnx.split(model)
    forward = NP.forward_fn(inputs)
    def run(s):
        forward(nnx.merge(graphdef, s))

    try:
        jax.eval_shape(run, state)
    except Exception as e:
        raise ValueError(f"the converted {type(model).__name__} fails on the inputs it was traced with: "
                         f"{type(e).__name__}: {e}") from e


def _qlora_class(m):
    """The constructor of the QLoRA layer replacing the plain layer m (it quantizes m's kernel, makes
    the adapters and keeps m's bias)."""
    if isinstance(m, nnx.Einsum):
        return QLoRAEinsum.from_einsum
    if isinstance(m, nnx.LinearGeneral):
        return QLoRALinearGeneral.from_linear_general
    return QLoRALinear.from_linear


def merge(model, dtype=None, *, requantize: QuantConfig | None = None):
    """Folds `scaling * A @ B` into every QLoRA layer's kernel in place; returns the model.

    Each layer becomes a plain nnx.Linear / nnx.LinearGeneral / nnx.Einsum with the dense merged kernel in
    `dtype` (default: the original kernel dtype), or, with `requantize`, a QLoRA layer without
    adapters whose merged kernel is quantized again. Raises TypeError for a non-float dtype or a
    requantize that is not a QuantConfig, ValueError for adapters that do not fit their layer.
    """
    L.check_merge_args(dtype, requantize)
    found = _find(model, QLoRABase)
    if not found and not NP.routed_modules(model):
        raise ValueError(f"{type(model).__name__} holds no qjax QLoRA layer; nothing to merge")
    NP.merge(model, dtype, requantize)
    for parts, m in found:
        einsum = isinstance(m, QLoRAEinsum)
        layout = P.KernelLayout(m.in_shape, m.out_shape, m.lead, m.batch, m.einsum_str if einsum else None)
        names = m.lora_config.variant.leaves() if m.lora_config is not None else ()
        adapters = {name: getattr(m, name).get_value() for name in names if getattr(m, name, None) is not None}
        w = P.merged_kernel(path_str(parts), layout, m.kernel.get_value(), adapters, m.lora_config, dtype)
        bias = m.bias.get_value() if m.bias is not None else None
        general = isinstance(m, QLoRALinearGeneral)
        if einsum:
            new = nnx.Einsum(m.einsum_str, m.kernel_shape, m.bias_shape, dtype=m.dtype, param_dtype=w.dtype,
                             precision=m.precision, kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
            if bias is not None:
                bias = jnp.reshape(bias, m.lead + tuple(m.bias_shape))
        elif general:
            new = nnx.LinearGeneral(m.in_features, m.out_features, axis=m.axis, batch_axis=m.batch_axis,
                                    use_bias=bias is not None,
                                    dtype=m.dtype, param_dtype=w.dtype, precision=m.precision,
                                    kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
        else:
            new = nnx.Linear(m.in_features, m.out_features, use_bias=bias is not None, dtype=m.dtype,
                             param_dtype=w.dtype, precision=m.precision,
                             kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
        new.kernel = nnx.Param(w)
        if bias is not None:
            new.bias = nnx.Param(bias)
        if requantize is not None:
            new = _qlora_class(new)(new, None, requantize, rngs=nnx.Rngs(0), backend=m.backend, where=path_str(parts))
        NP.replace(model, parts, new)
    return model
