"""`qjax.nnx.convert` / `merge`: swap the Linear layers of an NNX model for QLoRA layers, in place."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from qjax._src.adapters import lora as L
from qjax._src.matmul import base as B
from qjax._src.flax import select as S
from qjax._src.errors import describe, float_dtype
from qjax._src.adapters.config import LoraConfig, check_configs, check_patterns
from qjax._src.flax.nnx_layers import BaseParam, QLoRAEinsum, QLoRALinear, QLoRALinearGeneral, _QLoRABase, einsum_plan
from qjax._src.core.policy import QuantConfig

_LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _path(parts) -> str:
    return "/".join(str(p) for p in parts)


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
        raise TypeError(f"{_path(parts)} sits in a tuple, which cannot be updated in place; use a list")
    else:
        setattr(parent, key, new)


def _check_not_converted(model) -> None:
    nodes = list(nnx.iter_graph(model))
    hits = [p for p, n in nodes if isinstance(n, _QLoRABase)] or [p for p, n in nodes if isinstance(n, BaseParam)]
    if hits:
        raise ValueError(f"{_path(hits[0]) or '<root>'} is already a qjax QLoRA layer: the model is "
                         "already converted (qjax.nnx.merge gives back plain layers)")


def _in_out(m) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(m, nnx.Einsum):
        plan = B.EinsumPlan(m.einsum_str)
        return plan.in_shape(m.kernel_shape), plan.out_shape(m.kernel_shape)  # of one batch index's matrix
    if isinstance(m, nnx.LinearGeneral):
        return tuple(m.in_features), tuple(m.out_features)
    return (m.in_features,), (m.out_features,)


def _kernel_size(m) -> int:
    return int(jnp.size(m.kernel.get_value()))


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
    `quant_config.config_for("a/b/q_proj/kernel")`: quant_config is a QuantConfig or a per-path
    policy such as `qjax.first_blocks(k, high, low)` (mixed precision; None for a path keeps that
    kernel 16-bit). Layers of stacked (vmapped) modules keep their leading axes.
    lora_config=None quantizes only; quant_config=None is 16-bit LoRA.
    `LoraConfig(init="loftq")`: each layer with adapters and a quantized kernel is initialized by
    `qjax.loftq_init` (scaling folded in, kernels of rank > 2 flattened to (prod(in), prod(out)),
    stacked layers one by one), so the converted model approximates the original one.
    Raises ValueError naming the path for an already converted model, a model without Linear
    layers, a target pattern matching nothing, r larger than a layer's dimensions, or a selected
    einsum that is not a projection (exclude it from LoRA and quantization to leave it alone).
    """
    check_configs(lora_config, quant_config)
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs, got {describe(rngs)}; pass nnx.Rngs(0) or "
                        "nnx.Rngs(params=key)")
    _check_not_converted(model)
    found, unsupported = [], {}
    for parts, m in _find(model, _LINEAR_TYPES):
        if isinstance(m, nnx.Einsum):
            try:
                einsum_plan(m, _path(parts))
            except ValueError as e:
                unsupported[_path(parts)] = (m, str(e))
                continue
        found.append((parts, m))
    if not found and not unsupported:
        raise ValueError(f"{type(model).__name__} has no nnx.Linear / nnx.LinearGeneral / nnx.Einsum layer; "
                         "there is nothing to convert")
    paths = [_path(p) for p, _ in found]
    lora_paths = set(S.select_layers(paths + list(unsupported), lora_config)) if lora_config is not None else set()

    def quant_for(path, m):
        qc = quant_config.config_for(f"{path}/kernel") if quant_config is not None else None
        return qc if qc is not None and _kernel_size(m) >= qc.min_size else None

    for path, (m, why) in unsupported.items():
        if path in lora_paths or quant_for(path, m) is not None:
            raise ValueError(f"{why}. To leave this layer unconverted, exclude it from LoRA (LoraConfig.exclude) "
                             "and from quantization (QuantConfig.skip)")
    plan = []
    for (parts, m), path in zip(found, paths):
        qc = quant_for(path, m)
        quantized = qc is not None
        if path in lora_paths or quantized:
            inp, out = _in_out(m)
            if path in lora_paths:
                L.check_rank(lora_config.r, inp, out, path)
            plan.append((parts, m, path, path in lora_paths, qc if quantized else None))
    if not plan:
        raise ValueError(f"no layer of {type(model).__name__} was selected for LoRA or quantization; "
                         f"its linear layers are {paths}")
    if rngs is None:
        if lora_paths:
            raise ValueError("convert needs rngs (nnx.Rngs) to initialize the LoRA adapters")
        rngs = nnx.Rngs(0)
    for parts, m, path, lora, qc in plan:
        kw = dict(rngs=rngs, backend=backend, where=path)
        lc = lora_config if lora else None
        if isinstance(m, nnx.Einsum):
            new = QLoRAEinsum.from_einsum(m, lc, qc, **kw)
        elif isinstance(m, nnx.LinearGeneral):
            new = QLoRALinearGeneral.from_linear_general(m, lc, qc, **kw)
        else:
            new = QLoRALinear.from_linear(m, lc, qc, **kw)
        _replace(model, parts, new)
    return model


def merge(model, dtype=None, *, requantize: QuantConfig | None = None):
    """Folds `scaling * A @ B` into every QLoRA layer's kernel in place; returns the model.

    Each layer becomes a plain nnx.Linear / nnx.LinearGeneral / nnx.Einsum with the dense merged kernel in
    `dtype` (default: the original kernel dtype), or, with `requantize`, a QLoRA layer without
    adapters whose merged kernel is quantized again. Raises TypeError for a non-float dtype or a
    requantize that is not a QuantConfig, ValueError for adapters that do not fit their layer.
    """
    L.check_merge_args(dtype, requantize)
    found = _find(model, _QLoRABase)
    if not found:
        raise ValueError(f"{type(model).__name__} holds no qjax QLoRA layer; nothing to merge")
    for parts, m in found:
        w = m.merged_kernel(dtype)
        bias = m.bias.get_value() if m.bias is not None else None
        general = isinstance(m, QLoRALinearGeneral)
        if isinstance(m, QLoRAEinsum):
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
            cls = (QLoRAEinsum.from_einsum if isinstance(m, QLoRAEinsum) else
                   QLoRALinearGeneral.from_linear_general if general else QLoRALinear.from_linear)
            new = cls(new, None, requantize, rngs=nnx.Rngs(0), backend=m.backend, where=_path(parts))
        _replace(model, parts, new)
    return model


def prepare_for_kbit_training(model, *, remat=None, dtype=jnp.float32):
    """PEFT's prepare_model_for_kbit_training for an NNX model, in place; returns the model.

    Casts every bfloat16/float16 `nnx.Param` that is not a base kernel (norm scales, biases,
    embeddings, the head) to `dtype` (the adapters are float32 already). `remat`: patterns of module
    paths (as in LoraConfig.target_modules, e.g. "blocks/*" or "layers") whose `__call__` is wrapped
    in `nnx.remat`, so their activations are recomputed in the backward pass.
    Raises TypeError for a non-module, a remat that is not patterns, or a non-float dtype (before
    casting anything); ValueError for remat patterns that match no module.
    """
    from qjax._src.flax.kbit import upcast_half_params

    if not isinstance(model, nnx.Module):
        raise TypeError(f"qjax.nnx.prepare_for_kbit_training takes an nnx.Module, got {type(model).__name__}; "
                        "for Linen variables use qjax.prepare_for_kbit_training(variables)")
    patterns = check_patterns(remat, "remat") if remat else ()
    float_dtype(dtype, "dtype")  # before anything is cast
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, nnx.Param) and not isinstance(node, BaseParam):
            value = node.get_value()
            new = upcast_half_params(value, dtype)
            if new is not value:
                node.set_value(new)
    if patterns:
        hits = [(parts, node) for parts, node in nnx.iter_graph(model)
                if isinstance(node, nnx.Module) and parts
                and any(S._pattern_hits(_path(parts), p) for p in patterns)]
        if not hits:
            raise ValueError(f"prepare_for_kbit_training: remat patterns {list(patterns)} match no module")
        for _, node in hits:
            _remat_module(node)
    return model


def _remat_module(module) -> None:
    cls = type(module)
    if getattr(cls, "_qjax_remat", False):
        return
    original = cls.__call__

    @nnx.remat
    def call(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    module.__class__ = type(cls.__name__, (cls,), {"__call__": lambda self, *a, **k: call(self, *a, **k),
                                                    "_qjax_remat": True, "__module__": cls.__module__})
