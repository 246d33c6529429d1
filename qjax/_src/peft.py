"""PEFT LoRA adapter files both ways: adapter_model.safetensors + adapter_config.json.

qjax adapters are `lora_a` (in, r) and `lora_b` (r, out) with output `x @ A @ B * scaling`
(rank > 2 adapters of DenseGeneral / Einsum layers are flattened to those);
PEFT stores torch Linear weights `lora_A.weight` (r, in) and `lora_B.weight` (out, r) under
"base_model.model.<module>.", so each is the transpose of the other. Module names go through
a `NameMap` (default: Hugging Face Llama names). Stacked adapters of scanned / vmapped layers
(`lora_a (L, *in, r)`, `lora_b (L, r, *out)`) are one PEFT module per layer. Per-expert adapters of
batched einsums (`lora_a (E, *in, r)`, `lora_b (E, r, *out)`) are refused (ValueError naming the module
and shapes): their leading axis looks like a layer stack, but PEFT has no Linear module for them.
"""

from __future__ import annotations

import json
import os

import numpy as np

from qjax._src import adapters as ad
from qjax._src.lora_config import LoraConfig
from qjax._src.names import LLAMA, NameMap

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Writes {name: array} (numpy or jax, bfloat16 included) to a .safetensors file atomically."""
    import jax.numpy as jnp
    from safetensors.flax import save_file
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_safetensors(path) -> dict[str, np.ndarray]:
    """{name: numpy array} of a .safetensors file (bfloat16 as ml_dtypes.bfloat16)."""
    from safetensors.flax import load_file
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    try:
        return {k: np.asarray(v) for k, v in load_file(path).items()}
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def _flat2d_shape(shape, leaf: str) -> tuple[int, int]:
    """lora_a (*in, r) -> (prod(in), r); lora_b (r, *out) -> (r, prod(out))."""
    if leaf == "lora_a":
        return (int(np.prod(shape[:-1])), shape[-1])
    return (shape[0], int(np.prod(shape[1:])))


def _flat2d(x: np.ndarray, leaf: str) -> np.ndarray:
    return np.reshape(x, _flat2d_shape(x.shape, leaf))


def _module_name(path) -> str:
    return "/".join(map(str, path))


def _layers(path, a_shape, b_shape, stacked_module: str, nnx: bool) -> list[tuple[tuple, int | None]]:
    """The PEFT modules of one adapter as [(Flax module path, index in its stack)].

    A plain adapter is [(path, None)]. A stack of L layers (lora_a (L, *in, r), lora_b (L, r, *out))
    is one module per layer i < L: the path's component named `stacked_module` becomes
    `{stacked_module}_{i}` (Linen, like `layers_0`) or `{stacked_module}/{i}` (NNX, like `layers/0`).
    Raises ValueError for nested stacks or a path without exactly one such component.
    """
    lead = ad.stacked_axes(a_shape, b_shape)
    if lead == 0:
        return [(path, None)]
    what = (f"module {_module_name(path)!r} has stacked adapters (lora_a shape={tuple(a_shape)}, "
            f"lora_b shape={tuple(b_shape)})")
    experts = ("; if they are per-expert adapters (a batched einsum or DenseGeneral batch_dims: lora_a "
               "(*experts, *in, r)), they have no PEFT Linear module and cannot be exported: exclude that "
               "layer from LoRA (LoraConfig.exclude) to export the others")
    if lead > 1:
        raise ValueError(f"{what} with {lead} stacked axes (nested scans, or experts); PEFT files take one "
                         "stacked layer axis, unstack the outer ones first" + experts)
    j, why_not = ad.stack_component(path, stacked_module, nnx)
    if j is None:
        raise ValueError(what + why_not + experts)
    return [(ad.layer_path(path, j, i, stacked_module, nnx), i) for i in range(a_shape[0])]


def save_peft_adapter(directory, variables_or_model, lora_config: LoraConfig, *, name_map: NameMap = LLAMA,
                      stacked_module: str = "layers", base_model_name_or_path: str | None = None,
                      task_type: str | None = None, dtype=None) -> dict[str, str]:
    """Writes the adapters as a PEFT LoRA adapter that `peft.PeftModel.from_pretrained` loads.

    directory: created if needed; gets adapter_model.safetensors and adapter_config.json.
    variables_or_model: Linen variables, `nnx.State` or NNX module with `lora_a`/`lora_b` leaves.
    lora_config: gives r, lora_alpha, lora_dropout, use_rslora.
    name_map: Flax module path -> torch module name (see `NameMap`).
    stacked_module: name of the scanned / vmapped module (a Flax path component) whose stacked
      adapters (`lora_a (L, *in, r)`, `lora_b (L, r, *out)`) get one PEFT module per layer: layer i
      of `params/layers/self_attn/q_proj` is `params/layers_{i}/self_attn/q_proj` (Linen variables;
      `layers/{i}/...` for an NNX module or state), which `LLAMA` names `model.layers.{i}.self_attn.q_proj`.
      The default "layers" is what Hugging Face and the default name maps call the decoder layers.
    dtype: dtype of the stored tensors (default: the adapters' own).
    task_type: PEFT task type, e.g. "CAUSAL_LM" for a transformers model (None: a plain PeftModel).
    Adapters of DenseGeneral / Einsum layers (`lora_a (*in, r)`, `lora_b (r, *out)`) are stored
    flattened, `(r, prod(in))` / `(prod(out), r)`: the torch Linear whose weight is the flattened
    kernel (Hugging Face's q_proj for a (d_model, heads, head_dim) kernel); `load_peft_adapter`
    reshapes them back.
    Returns {flax module path (per layer for stacks): torch module name}. Raises ValueError for a
    rank that is not lora_config.r, two modules with one torch name, nested stacks or a stack
    whose path does not hold `stacked_module` exactly once.
    """
    groups = ad.modules(ad.flat_adapters(variables_or_model))
    nnx = ad.is_nnx(variables_or_model)
    tensors, names = {}, {}
    for path, pair in groups.items():
        a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
        layers = _layers(path, a.shape, b.shape, stacked_module, nnx)
        if a.shape[-1] != lora_config.r:
            raise ValueError(f"module {_module_name(path)!r} has rank {a.shape[-1]}, lora_config.r={lora_config.r}")
        for layer_path, i in layers:
            la, lb = (a, b) if i is None else (a[i], b[i])
            la, lb = _flat2d(la, "lora_a"), _flat2d(lb, "lora_b")
            name = name_map.to_torch(_module_name(layer_path))
            if f"{PREFIX}{name}.lora_A.weight" in tensors:
                other = next(p for p, n in names.items() if n == name)
                raise ValueError(f"modules {other!r} and {_module_name(layer_path)!r} both map to torch "
                                 f"module {name!r}")
            names[_module_name(layer_path)] = name
            if dtype is not None:
                la, lb = la.astype(dtype), lb.astype(dtype)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(la.T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lb.T)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.r, "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
        "use_rslora": lora_config.use_rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names.values()}),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }
    os.makedirs(directory, exist_ok=True)
    save_safetensors(os.path.join(directory, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    tmp = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(directory, CONFIG_NAME))
    return names


def read_peft_config(directory) -> LoraConfig:
    """The qjax LoraConfig of a PEFT adapter directory (r, lora_alpha, lora_dropout, use_rslora, targets).

    Raises ValueError for a non-LoRA adapter or PEFT features qjax adapters do not have
    (DoRA, per-module rank/alpha patterns, fan_in_fan_out, trained biases).
    """
    f = os.path.join(os.fspath(directory), CONFIG_NAME)
    try:
        with open(f) as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"no PEFT adapter config at {f!r}") from None
    except ValueError as e:
        raise ValueError(f"{f!r} is not valid JSON (truncated or corrupted?): {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{f!r} is a {cfg.get('peft_type')!r} adapter; qjax reads LoRA adapters only")
    unsupported = [k for k in ("rank_pattern", "alpha_pattern") if cfg.get(k)]
    unsupported += [k for k in ("use_dora", "fan_in_fan_out") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    if unsupported:
        raise ValueError(f"{f!r} uses PEFT features qjax adapters do not support: {unsupported}")
    targets = cfg.get("target_modules") or "all-linear"
    if isinstance(targets, str) and targets != "all-linear":
        targets = ("re:" + targets,)  # PEFT: a string is a full-match regex
    elif not isinstance(targets, str):
        targets = tuple(f"*{t}" for t in targets)
    return LoraConfig(r=int(cfg["r"]), alpha=cfg["lora_alpha"], dropout=float(cfg.get("lora_dropout") or 0.0),
                      target_modules=targets, use_rslora=bool(cfg.get("use_rslora", False)))


def load_peft_adapter(directory, variables_or_model, lora_config: LoraConfig | None = None, *,
                      name_map: NameMap = LLAMA, stacked_module: str = "layers"):
    """Reads a PEFT LoRA adapter into the `lora_a`/`lora_b` leaves of a converted model.

    directory: holds adapter_config.json and adapter_model.safetensors (as PEFT saves them).
    variables_or_model: the converted model (Linen variables: a new tree is returned; NNX
      module: updated in place). Every one of its adapters must be in the file and vice versa.
    lora_config: when given, r, alpha and use_rslora must match the file's.
    name_map, stacked_module: as for `save_peft_adapter`; the per-layer modules of a stacked
      adapter are read and stacked back into `lora_a (L, *in, r)`, `lora_b (L, r, *out)`.
    Weights are cast to the dtype of the model's adapters. Raises ValueError naming modules
    missing on either side, shape mismatches (another rank or model size) and config mismatches.
    """
    peft_cfg = read_peft_config(directory)
    if lora_config is not None:
        diff = [f"{k}: file {getattr(peft_cfg, k)!r}, given {getattr(lora_config, k)!r}"
                for k in ("r", "alpha", "use_rslora") if getattr(peft_cfg, k) != getattr(lora_config, k)]
        if diff:
            raise ValueError(f"PEFT adapter {os.fspath(directory)!r} does not match lora_config: " + "; ".join(diff))
    tensors = load_safetensors(os.path.join(os.fspath(directory), WEIGHTS_NAME))
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    groups = ad.modules(ad.flat_adapters(variables_or_model))
    nnx = ad.is_nnx(variables_or_model)
    new, problems, used = {}, [], set()
    for path, pair in groups.items():
        layers = _layers(path, np.shape(pair["lora_a"]), np.shape(pair["lora_b"]), stacked_module, nnx)
        for leaf, torch_leaf in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            shape, values = tuple(np.shape(pair[leaf])), []
            for layer_path, i in layers:
                where = f"{_module_name(layer_path)}/{leaf}"
                key = f"{PREFIX}{name_map.to_torch(_module_name(layer_path))}.{torch_leaf}.weight"
                if key not in tensors:
                    problems.append(f"{where}: {key!r} is not in the file")
                    continue
                used.add(key)
                value = tensors[key].T
                want = shape if i is None else shape[1:]
                if value.shape == _flat2d_shape(want, leaf):
                    value = np.reshape(value, want)  # a DenseGeneral / Einsum layer's flattened Linear
                if value.shape != want:
                    problems.append(f"{where}: file has shape={value.shape} (as {leaf}), model has shape={want}"
                                    + ("" if i is None else f" (layer {i} of {_module_name(path)!r}, shape={shape})"))
                    continue
                values.append(value)
            if len(values) == len(layers):
                value = values[0] if layers[0][1] is None else np.stack(values)
                new[path + (leaf,)] = value.astype(pair[leaf].dtype)
    extra = sorted(k for k in tensors if k not in used)
    if extra:
        problems.append(f"file tensors with no adapter in the model: {extra[:10]}"
                        + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
    if problems:
        shown = problems[:20] + ([f"and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"PEFT adapter {os.fspath(directory)!r} does not fit this model:\n  " + "\n  ".join(shown))
    import jax.numpy as jnp
    return ad.replace_adapters(variables_or_model, {p: jnp.asarray(v) for p, v in new.items()})
