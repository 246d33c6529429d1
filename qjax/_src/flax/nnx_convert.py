"""`qjax.nnx.convert` / `merge`: swap the Linear layers of an NNX model for QLoRA layers, in place."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from qjax._src.adapters import lora as L
from qjax._src.adapters.config import LoraConfig, check_configs
from qjax._src.core.policy import QuantConfig
from qjax._src.errors import describe
from qjax._src.flax import planner as P
from qjax._src.paths import path_str
from qjax._src.flax.nnx_layers import BaseParam, QLoRAEinsum, QLoRALinear, QLoRALinearGeneral, QLoRABase, einsum_plan

_LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _find(model, types) -> list[tuple[tuple, Any]]:
    return [(tuple(parts), node) for parts, node in nnx.iter_graph(model) if isinstance(node, types)]


def _node(model, parts):
    for p in parts:
        model = model[p] if isinstance(model, (list, tuple, dict, nnx.List, nnx.Dict)) else getattr(model, p)
    return model


def _replace(model, parts, new) -> None:
    parent = _node(model, parts[:-1])
    key = parts[-1]
    if isinstance(parent, (list, dict, nnx.List, nnx.Dict)):
        parent[key] = new
    elif isinstance(parent, tuple):
        raise TypeError(f"{path_str(parts)} sits in a tuple, which cannot be updated in place; use a list")
    else:
        setattr(parent, key, new)


def _check_not_converted(model) -> None:
    nodes = list(nnx.iter_graph(model))
    hits = [p for p, n in nodes if isinstance(n, QLoRABase)] or [p for p, n in nodes if isinstance(n, BaseParam)]
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


def convert(model, lora_config: LoraConfig | None = LoraConfig(), quant_config: QuantConfig | None = QuantConfig(),
            rngs: nnx.Rngs | None = None, *, backend: str = "auto"):
    """Replaces the matching nnx.Linear / nnx.LinearGeneral / nnx.Einsum submodules of `model` in place.

    Returns the model. An nnx.Einsum's in axes are the kernel axes its equation contracts (kernel
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
    planned = P.plan(_NnxFinder(model), lora_config, quant_config)
    if rngs is None:
        if any(p.lora for p in planned):
            raise ValueError("convert needs rngs (nnx.Rngs) to initialize the LoRA adapters")
        rngs = nnx.Rngs(0)
    for p in planned:
        parts, m = p.candidate.handle
        kw = dict(rngs=rngs, backend=backend, where=p.path)
        lc = lora_config if p.lora else None
        _replace(model, parts, _qlora_class(m)(m, lc, p.quant_config, **kw))
    return model


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
    if not found:
        raise ValueError(f"{type(model).__name__} holds no qjax QLoRA layer; nothing to merge")
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
        _replace(model, parts, new)
    return model
