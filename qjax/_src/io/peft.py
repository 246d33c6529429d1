"""PEFT LoRA adapter files both ways: adapter_model.safetensors + adapter_config.json.

Each adapter leaf is written as its variant says (`AdapterVariant.peft_names` / `to_peft`): LoRA's
`lora_a` (in, r) and `lora_b` (r, out) with output `x @ A @ B * scaling` (rank > 2 adapters of
DenseGeneral / Einsum layers are flattened to those) are PEFT's torch Linear weights
`lora_A.weight` (r, in) and `lora_B.weight` (out, r) under "base_model.model.<module>.", so each is
the transpose of the other. Module names go through
a `NameMap` (default: Hugging Face Llama names). Stacked adapters of scanned / vmapped layers
(`lora_a (L, *in, r)`, `lora_b (L, r, *out)`) are one PEFT module per layer. Per-expert adapters of
batched einsums (`lora_a (E, *in, r)`, `lora_b (E, r, *out)`) are refused (ValueError naming the module
and shapes): their leading axis looks like a layer stack, but PEFT has no Linear module for them.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re

import numpy as np

from qjax._src.adapters import tree as ad
from qjax._src.errors import describe, float_dtype, named
from qjax._src.adapters.config import LoraConfig
from qjax._src.adapters.variant import variant_for
from qjax._src.io.names import LLAMA, NameMap

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Writes {name: array} (numpy or jax, bfloat16 included) to a .safetensors file atomically.

    Raises TypeError naming the key of a value that is not a numeric array.
    """
    import jax.numpy as jnp
    from safetensors.flax import save_file
    path = os.fspath(path)
    bad = [f"{k!r} ({describe(v)})" for k, v in tensors.items()
           if not hasattr(v, "dtype") or not (np.issubdtype(np.dtype(v.dtype), np.number)
                                             or np.dtype(v.dtype).name in ("bool", "bfloat16"))]
    if bad:
        raise TypeError(f"safetensors holds numeric arrays only; {path!r} would get " + ", ".join(bad[:10]))
    tmp = path + ".tmp"
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_safetensors(path) -> dict[str, np.ndarray]:
    """{name: numpy array} of a .safetensors file (bfloat16 as ml_dtypes.bfloat16)."""
    from safetensors.flax import load_file
    path = os.fspath(path)
    if not os.path.exists(path):
        pickled = os.path.splitext(path)[0] + ".bin"
        hint = (f"; {pickled!r} exists (PyTorch's pickle format, which qjax does not read): save it again with "
                "safe_serialization=True") if os.path.exists(pickled) else ""
        raise FileNotFoundError(f"no safetensors file at {path!r}{hint}")
    try:
        return {k: np.asarray(v) for k, v in load_file(path).items()}
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def _raise_float_problems(what: str, items) -> None:
    """Checks (name, array) pairs that must be float adapters without NaN / Inf, naming every bad one.

    Integer or bool tensors would be cast to float silently (TypeError), NaN / Inf ones poison every
    output (ValueError).
    """
    wrong, bad = [], []
    for name, x in items:
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
            wrong.append(f"{named(name, x)}: adapters are float tensors")
            continue
        n_nan, n_inf = (int(np.count_nonzero(f(x.astype(np.float32)))) for f in (np.isnan, np.isinf))
        if n_nan or n_inf:
            bad.append(f"{named(name, x)} holds {n_nan} NaN and {n_inf} Inf values of {x.size}")
    for problems, error in ((wrong, TypeError), (bad, ValueError)):
        if problems:
            more = f" and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise error(f"{what}: " + "; ".join(problems[:10]) + more)


def _config_str(cfg: LoraConfig) -> str:
    return f"r={cfg.r}, alpha={cfg.alpha}, use_rslora={cfg.use_rslora} (scaling {cfg.scaling:g})"


def layer_lora_configs(variables_or_model) -> dict[tuple, LoraConfig]:
    """{module path (as str keys): LoraConfig} of the layers of an NNX module that record theirs.

    qjax's NNX QLoRA layers keep `lora_config` as an attribute and apply its scaling; Linen variables,
    an `nnx.State` and hand-written LoRA modules record none (empty dict / missing paths).
    """
    if not ad.is_nnx_module(variables_or_model):
        return {}
    from flax import nnx
    return {tuple(map(str, path)): m.lora_config for path, m in nnx.iter_modules(variables_or_model)
            if isinstance(getattr(m, "lora_config", None), LoraConfig)}


def scaling_problems(saved: LoraConfig, variables_or_model, lora_config: LoraConfig | None, source: str,
                     fix: str | None = None) -> list[str]:
    """Why the model would not apply the scaling `saved` records to the adapters it loads (empty: it would).

    saved: the LoraConfig of the file (`source` names it in messages; `fix` replaces the advice to
    convert the model with it). The model's scaling is the LoraConfig its NNX QLoRA layers record,
    else the caller's lora_config; a layer with neither (Linen variables, an nnx.State) cannot be
    checked, and loading it is refused.
    """
    recorded = layer_lora_configs(variables_or_model)
    wrong: dict[tuple, tuple[LoraConfig, list[str]]] = {}
    unknown = []
    for path in ad.modules(ad.flat_adapters(variables_or_model)):
        cfg = recorded.get(tuple(map(str, path)), lora_config)
        if cfg is None:
            unknown.append(_module_name(path))
        elif not math.isclose(cfg.scaling, saved.scaling, rel_tol=1e-6):
            wrong.setdefault((cfg.r, cfg.alpha, cfg.use_rslora), (cfg, []))[1].append(_module_name(path))
    fix = fix or f"convert the model with the {source}'s r / alpha / use_rslora"
    problems = [f"modules {mods[:3]}{f' and {len(mods) - 3} more' if len(mods) > 3 else ''} apply "
                f"{_config_str(cfg)} in the model, but the {source} records {_config_str(saved)} (the LoRA "
                f"term would be {cfg.scaling / saved.scaling:.4g}x what it should be): {fix}"
                for cfg, mods in wrong.values()]
    if unknown:
        problems.append(f"the LoRA scaling the model applies to {unknown[:3]}{' ...' if len(unknown) > 3 else ''} is "
                        "not recorded in Linen variables, an nnx.State or a hand-written LoRA module, so the "
                        f"{source}'s cannot be checked against it: pass lora_config=<the LoraConfig the model was "
                        f"converted with> (the {source} has {_config_str(saved)})")
    return problems


def _module_name(path) -> str:
    return "/".join(map(str, path))


def _layers(path, leaves: dict, stacked_module: str, nnx: bool) -> list[tuple[tuple, int | None]]:
    """The PEFT modules of one adapter ({leaf: array}) as [(Flax module path, index in its stack)].

    A plain adapter is [(path, None)]. A stack of L layers (lora_a (L, *in, r), lora_b (L, r, *out))
    is one module per layer i < L: the path's component named `stacked_module` becomes
    `{stacked_module}_{i}` (Linen, like `layers_0`) or `{stacked_module}/{i}` (NNX, like `layers/0`).
    Raises ValueError for nested stacks or a path without exactly one such component.
    """
    lead = ad.stacked_axes(leaves)
    if lead == 0:
        return [(path, None)]
    shapes = ", ".join(f"{k} shape={tuple(np.shape(v))}" for k, v in leaves.items())
    what = f"module {_module_name(path)!r} has stacked adapters ({shapes})"
    experts = ("; if they are per-expert adapters (a batched einsum or DenseGeneral batch_dims: lora_a "
               "(*experts, *in, r)), they have no PEFT Linear module and cannot be exported: exclude that "
               "layer from LoRA (LoraConfig.exclude) to export the others")
    if lead > 1:
        raise ValueError(f"{what} with {lead} stacked axes (nested scans, or experts); PEFT files take one "
                         "stacked layer axis, unstack the outer ones first" + experts)
    j, why_not = ad.stack_component(path, stacked_module, nnx)
    if j is None:
        raise ValueError(what + why_not + experts)
    n = np.shape(next(iter(leaves.values())))[0]
    return [(ad.layer_path(path, j, i, stacked_module, nnx), i) for i in range(n)]


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
    rank that is not lora_config.r, NNX layers that apply another scaling than lora_config's, NaN /
    Inf adapters (or values `dtype` cannot hold), two modules with one torch name, nested stacks or a
    stack whose path does not hold `stacked_module` exactly once; TypeError when lora_config is not a
    LoraConfig or dtype is not a float dtype.
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a qjax.LoraConfig, got {type(lora_config).__name__}")
    if dtype is not None:
        float_dtype(dtype)  # PEFT adapters are float tensors
    groups = ad.modules(ad.flat_adapters(variables_or_model))
    wrong = scaling_problems(lora_config, variables_or_model, lora_config, "lora_config passed",
                             fix="pass the LoraConfig the model was converted with")
    if wrong:
        raise ValueError("the file would record another scaling than the model applies: " + "; ".join(wrong))
    _raise_float_problems("cannot save these adapters to a PEFT file",
                          [(_module_name(p), x) for p, x in ad.flat_adapters(variables_or_model).items()])
    nnx = ad.is_nnx(variables_or_model)
    variant = lora_config.variant
    if set(variant.peft_names) != set(variant.leaves()):
        raise ValueError(f"adapter variant {variant!r} has no PEFT form for its leaves "
                         f"{sorted(set(variant.leaves()) - set(variant.peft_names))} (peft_names={variant.peft_names})")
    tensors, names = {}, {}
    for path, leaves in groups.items():
        leaves = {k: np.asarray(v) for k, v in leaves.items()}
        if variant_for(leaves) is not type(variant):
            raise ValueError(f"module {_module_name(path)!r} has {sorted(leaves)}, not the leaves of "
                             f"lora_config.variant={variant!r}")
        layers = _layers(path, leaves, stacked_module, nnx)
        r = variant.layout({k: v.shape for k, v in leaves.items()}).r
        if r != lora_config.r:
            raise ValueError(f"module {_module_name(path)!r} has rank {r}, lora_config.r={lora_config.r}")
        for layer_path, i in layers:
            name = name_map.to_torch(_module_name(layer_path))
            if name in names.values():
                other = next(p for p, n in names.items() if n == name)
                raise ValueError(f"modules {other!r} and {_module_name(layer_path)!r} both map to torch "
                                 f"module {name!r}")
            names[_module_name(layer_path)] = name
            for leaf, x in leaves.items():
                x = variant.to_peft(leaf, x if i is None else x[i])
                if dtype is not None:
                    with np.errstate(over="ignore"):  # overflow is reported below, by tensor
                        x = x.astype(dtype)
                tensors[f"{PREFIX}{name}.{variant.peft_names[leaf]}"] = x
    if dtype is not None:
        _raise_float_problems(f"the adapters overflow dtype={np.dtype(dtype).name}", tensors.items())
    config = {
        "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.r, "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
        "use_rslora": lora_config.use_rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names.values()}),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, **variant.peft_config(),
    }
    os.makedirs(directory, exist_ok=True)
    save_safetensors(os.path.join(directory, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    tmp = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(directory, CONFIG_NAME))
    return names


# PEFT LoraConfig fields whose non-default values change what the adapter computes in ways qjax's plain
# LoRA does not reproduce: refused, never ignored (e.g. a DoRA adapter read as LoRA gives other outputs).
_UNSUPPORTED = {
    "use_dora": "DoRA", "fan_in_fan_out": "transposed (Conv1D) weights", "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas", "modules_to_save": "fully trained copies of modules",
    "trainable_token_indices": "trained token embeddings", "lora_bias": "a trained lora_B bias",
    "use_qalora": "QALoRA", "layer_replication": "replicated layers", "target_parameters": "LoRA on nn.Parameters",
    "alora_invocation_tokens": "activated LoRA", "megatron_config": "Megatron layers", "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
# init_lora_weights values whose adapters belong to a residual base (W minus the initial adapters), unless
# PEFT converted them to plain LoRA (`path_initial_model_for_weight_conversion`, which records True).
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")


def _patterns(f: str, cfg: dict, key: str):
    """PEFT's target_modules / exclude_modules as qjax patterns: a str is a full-match regex, a list
    holds module-name suffixes; None when absent."""
    value = cfg.get(key)
    if value is None or value == []:
        return None
    if isinstance(value, str):
        return "all-linear" if (key, value) == ("target_modules", "all-linear") else ("re:" + value,)
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return tuple(f"*{t}" for t in value)
    raise TypeError(f"{f!r}: {key}={value!r} must be a regex string or a list of module names")


def _number(f: str, cfg: dict, key: str, kind, default=None):
    value = cfg.get(key)
    if value is None:  # absent or null
        if default is None:
            raise ValueError(f"{f!r} has no {key!r} value; a PEFT LoRA adapter_config.json records it")
        value = default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{f!r}: {key}={value!r} ({type(value).__name__}) must be a JSON "
                        f"{'integer' if kind is int else 'number'}")
    if not math.isfinite(value):
        raise ValueError(f"{f!r}: {key}={value!r} must be finite")
    return value


def read_peft_config(directory) -> LoraConfig:
    """The qjax LoraConfig of a PEFT adapter directory (r, lora_alpha, lora_dropout, use_rslora, targets).

    Raises FileNotFoundError without adapter_config.json; ValueError (naming the file and entry) for
    a file that is not a JSON object, a missing r / lora_alpha, a non-LoRA adapter, or PEFT features
    that change what the adapter computes and qjax adapters do not have (DoRA, per-module rank / alpha
    patterns, fan_in_fan_out, trained biases, modules_to_save, adapters of a PiSSA / OLoRA / CorDA
    residual base, ...); TypeError for entries of the wrong JSON type ("r": "8").
    """
    f = os.path.join(os.fspath(directory), CONFIG_NAME)
    try:
        with open(f) as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"no PEFT adapter config at {f!r}") from None
    except ValueError as e:
        raise ValueError(f"{f!r} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f!r} holds a JSON {type(cfg).__name__}, not the object of a PEFT adapter config")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{f!r} has peft_type={cfg.get('peft_type')!r}; qjax reads LoRA adapters only "
                         "(peft_type 'LORA')")
    unsupported = [f"{k}={cfg[k]!r} ({what})" for k, what in _UNSUPPORTED.items() if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r} (trained biases)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_niter_")[0] in _RESIDUAL_INITS:
        unsupported.append(f"init_lora_weights={init!r} (adapters of a residual base model; convert them to "
                           "plain LoRA with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))")
    if unsupported:
        raise ValueError(f"{f!r} uses PEFT features qjax adapters do not support: {unsupported}")
    r = _number(f, cfg, "r", int)
    alpha = _number(f, cfg, "lora_alpha", (int, float))
    dropout = _number(f, cfg, "lora_dropout", (int, float), default=0.0)
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise TypeError(f"{f!r}: use_rslora={use_rslora!r} ({type(use_rslora).__name__}) must be true or false")
    targets = _patterns(f, cfg, "target_modules") or "all-linear"
    exclude = _patterns(f, cfg, "exclude_modules") or ()
    try:
        return LoraConfig(r=r, alpha=alpha, dropout=float(dropout), target_modules=targets, exclude=exclude,
                          use_rslora=use_rslora)
    except (TypeError, ValueError) as e:  # r < 1, alpha <= 0, dropout outside [0, 1), bad patterns
        raise type(e)(f"{f!r} (r={r!r}, lora_alpha={alpha!r}, lora_dropout={dropout!r}, target_modules="
                      f"{cfg.get('target_modules')!r}, exclude_modules={cfg.get('exclude_modules')!r}): {e}") from None


def _peft_tensors(directory, r: int) -> dict[str, tuple[str, np.ndarray]]:
    """{key with PEFT's ".default" dropped: (key in the file, array)} of adapter_model.safetensors.

    Raises TypeError for non-float tensors and ValueError for NaN / Inf ones or a lora_A / lora_B
    whose rank is not the config's r, each named by its key, shape and dtype.
    """
    f = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    tensors = load_safetensors(f)
    _raise_float_problems(f"{f!r} holds tensors that are not usable adapters", tensors.items())
    wrong_rank = []
    for k, v in tensors.items():
        if not re.search(r"\.lora_[AB]\.(default\.)?weight$", k):
            continue
        if v.ndim != 2:
            wrong_rank.append(f"{named(k, v)} is not 2-D")
        elif (v.shape[0] if ".lora_A." in k else v.shape[1]) != r:
            wrong_rank.append(f"{named(k, v)} has rank {v.shape[0] if '.lora_A.' in k else v.shape[1]}")
    if wrong_rank:
        raise ValueError(f"{f!r}: adapter_config.json says r={r}, but " + "; ".join(wrong_rank[:10])
                         + " (torch stores lora_A (r, in) and lora_B (out, r))")
    return {k.replace(".default.weight", ".weight"): (k, v) for k, v in tensors.items()}


def _selected(cfg: LoraConfig, torch_module: str) -> bool:
    """Whether PEFT puts a LoRA layer on `torch_module` under the file's target_modules / exclude_modules
    (a PEFT key's adapters for a module it does not select are ignored by PEFT: the base output)."""
    def hit(p):
        return re.fullmatch(p[3:], torch_module) if p.startswith("re:") else fnmatch.fnmatchcase(torch_module, p)
    targeted = cfg.target_modules == "all-linear" or any(hit(p) for p in cfg.target_modules)
    return targeted and not any(hit(p) for p in cfg.exclude)


def load_peft_adapter(directory, variables_or_model, lora_config: LoraConfig | None = None, *,
                      name_map: NameMap = LLAMA, stacked_module: str = "layers"):
    """Reads a PEFT LoRA adapter into the `lora_a`/`lora_b` leaves of a converted model.

    directory: holds adapter_config.json and adapter_model.safetensors (as PEFT saves them).
    variables_or_model: the converted model (Linen variables: a new tree is returned; NNX
      module: updated in place). Every one of its adapters must be in the file and vice versa.
    lora_config: the LoraConfig the model was converted with; its r, alpha and use_rslora must
      match the file's. Required for Linen variables and an nnx.State, which do not record the
      scaling the model applies (`read_peft_config(directory)` gives the file's); qjax's NNX layers
      record theirs, which must give the file's scaling.
    name_map, stacked_module: as for `save_peft_adapter`; the per-layer modules of a stacked
      adapter are read and stacked back into `lora_a (L, *in, r)`, `lora_b (L, r, *out)`.
    Weights are cast to the dtype of the model's adapters. Raises ValueError naming modules
    missing on either side, shape mismatches (another rank or model size), a scaling (r, alpha,
    use_rslora) other than the model's, NaN / Inf tensors, values the model's dtype cannot hold;
    TypeError for non-float tensors; see `read_peft_config` for the config file.
    """
    peft_cfg = read_peft_config(directory)
    where = os.fspath(directory)
    if lora_config is not None:
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"lora_config must be a qjax.LoraConfig, got {type(lora_config).__name__}")
        diff = [f"{peft_key}: file {getattr(peft_cfg, k)!r}, given {getattr(lora_config, k)!r}"
                for k, peft_key in (("r", "r"), ("alpha", "lora_alpha"), ("use_rslora", "use_rslora"))
                if getattr(peft_cfg, k) != getattr(lora_config, k)]
        if diff:
            raise ValueError(f"PEFT adapter {where!r} does not match lora_config: " + "; ".join(diff))
    tensors = _peft_tensors(directory, peft_cfg.r)
    groups = ad.modules(ad.flat_adapters(variables_or_model))
    nnx = ad.is_nnx(variables_or_model)
    new, problems, used = {}, [], set()
    for path, leaves in groups.items():
        variant = variant_for(leaves)
        layers = _layers(path, leaves, stacked_module, nnx)
        for leaf in variant.peft_names:
            shape, values = tuple(np.shape(leaves[leaf])), []
            want = shape if layers[0][1] is None else shape[1:]
            layout = variant.layout({k: np.shape(v)[0 if layers[0][1] is None else 1:] for k, v in leaves.items()},
                                    n_lead=0)
            rank = variant.rank_axis(leaf, layout) if layout is not None else None
            for layer_path, i in layers:
                at = f"{_module_name(layer_path)}/{leaf}"
                key = f"{PREFIX}{name_map.to_torch(_module_name(layer_path))}.{variant.peft_names[leaf]}"
                if key not in tensors:
                    problems.append(f"{at}: {key!r} is not in the file")
                    continue
                used.add(key)
                file_key, value = tensors[key]
                value = variant.from_peft(leaf, value, want)
                if value.shape != want:
                    hint = ""
                    if rank is not None and len(value.shape) == len(want) and value.shape[rank] != want[rank]:
                        hint = f"; LoRA rank r={value.shape[rank]} in the file, r={want[rank]} in the model"
                    problems.append(f"{at}: file has shape={value.shape} (as {leaf}), model has shape={want}"
                                    + ("" if i is None else f" (layer {i} of {_module_name(path)!r}, shape={shape})")
                                    + f"; tensor {named(file_key, tensors[key][1])}" + hint)
                    continue
                values.append(value)
            if len(values) == len(layers):
                value = values[0] if layers[0][1] is None else np.stack(values)
                with np.errstate(over="ignore"):  # overflow is reported below, by tensor
                    new[path + (leaf,)] = value.astype(leaves[leaf].dtype)
    unselected = sorted(k for k in used if not _selected(peft_cfg, k[len(PREFIX):].rsplit(".", 2)[0]))
    if unselected:
        problems.append(f"{', '.join(named(tensors[k][0], tensors[k][1]) for k in unselected[:4])}: adapters of "
                        "modules that adapter_config.json's target_modules / exclude_modules do not select "
                        f"({peft_cfg.target_modules} / {peft_cfg.exclude}), which PEFT would not load")
    extra = sorted(k for k in tensors if k not in used)
    if extra:
        problems.append("file tensors with no adapter in the model: "
                        + ", ".join(named(tensors[k][0], tensors[k][1]) for k in extra[:10])
                        + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
                        + " (another name_map or stacked_module? the model's adapters are "
                        + f"{[_module_name(p) for p in list(groups)[:3]]}{' ...' if len(groups) > 3 else ''})")
    if not problems:
        problems = scaling_problems(peft_cfg, variables_or_model, lora_config, "file")
    if problems:
        shown = problems[:20] + ([f"and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"PEFT adapter {where!r} does not fit this model:\n  " + "\n  ".join(shown))
    _raise_float_problems(f"PEFT adapter {where!r} overflows the model's adapter dtype",
                          [("/".join(map(str, p)), v) for p, v in new.items()])
    import jax.numpy as jnp
    return ad.replace_adapters(variables_or_model, {p: jnp.asarray(v) for p, v in new.items()})
