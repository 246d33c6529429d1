"""PEFT LoRA adapter files both ways: adapter_model.safetensors + adapter_config.json.

qjax adapters are `lora_a` (in, r) and `lora_b` (r, out) with output `x @ A @ B * scaling`;
PEFT stores torch Linear weights `lora_A.weight` (r, in) and `lora_B.weight` (out, r) under
"base_model.model.<module>.", so each is the transpose of the other. Module names go through
a `NameMap` (default: Hugging Face Llama names).
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


def _module_name(path) -> str:
    return "/".join(map(str, path))


def save_peft_adapter(directory, variables_or_model, lora_config: LoraConfig, *, name_map: NameMap = LLAMA,
                      base_model_name_or_path: str | None = None, task_type: str | None = None,
                      dtype=None) -> dict[str, str]:
    """Writes the adapters as a PEFT LoRA adapter that `peft.PeftModel.from_pretrained` loads.

    directory: created if needed; gets adapter_model.safetensors and adapter_config.json.
    variables_or_model: Linen variables, `nnx.State` or NNX module with `lora_a`/`lora_b` leaves.
    lora_config: gives r, lora_alpha, lora_dropout, use_rslora.
    name_map: Flax module path -> torch module name (see `NameMap`).
    dtype: dtype of the stored tensors (default: the adapters' own).
    task_type: PEFT task type, e.g. "CAUSAL_LM" for a transformers model (None: a plain PeftModel).
    Returns {flax module path: torch module name}. Raises ValueError for adapters of rank > 2
    (DenseGeneral-style kernels have no PEFT Linear equivalent) or a rank that is not lora_config.r.
    """
    groups = ad.modules(ad.flat_adapters(variables_or_model))
    tensors, names = {}, {}
    for path, pair in groups.items():
        a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"module {_module_name(path)!r} has lora_a shape={a.shape}, lora_b shape={b.shape}; "
                             "PEFT files hold 2-D Linear adapters only")
        if a.shape[1] != lora_config.r:
            raise ValueError(f"module {_module_name(path)!r} has rank {a.shape[1]}, lora_config.r={lora_config.r}")
        name = name_map.to_torch(_module_name(path))
        names[_module_name(path)] = name
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
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
                      name_map: NameMap = LLAMA):
    """Reads a PEFT LoRA adapter into the `lora_a`/`lora_b` leaves of a converted model.

    directory: holds adapter_config.json and adapter_model.safetensors (as PEFT saves them).
    variables_or_model: the converted model (Linen variables: a new tree is returned; NNX
      module: updated in place). Every one of its adapters must be in the file and vice versa.
    lora_config: when given, r, alpha and use_rslora must match the file's.
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
    flat = ad.flat_adapters(variables_or_model)
    groups = ad.modules(flat)
    new, problems, used = {}, [], set()
    for path, pair in groups.items():
        name = name_map.to_torch(_module_name(path))
        for leaf, torch_leaf in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            key = f"{PREFIX}{name}.{torch_leaf}.weight"
            if key not in tensors:
                problems.append(f"{_module_name(path)}/{leaf}: {key!r} is not in the file")
                continue
            used.add(key)
            value = tensors[key].T
            want = tuple(np.shape(pair[leaf]))
            if value.shape != want:
                problems.append(f"{_module_name(path)}/{leaf}: file has shape={value.shape} (as {leaf}), "
                                f"model has shape={want}")
                continue
            new[path + (leaf,)] = np.asarray(value).astype(pair[leaf].dtype)
    extra = sorted(k for k in tensors if k not in used)
    if extra:
        problems.append(f"file tensors with no adapter in the model: {extra[:10]}"
                        + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
    if problems:
        raise ValueError(f"PEFT adapter {os.fspath(directory)!r} does not fit this model:\n  " + "\n  ".join(problems))
    import jax.numpy as jnp
    return ad.replace_adapters(variables_or_model, {p: jnp.asarray(v) for p, v in new.items()})
