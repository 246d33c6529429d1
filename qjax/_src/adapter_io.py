"""Adapter-only checkpoints: the `lora_a` / `lora_b` leaves plus the LoraConfig, as an orbax checkpoint."""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src import adapters as ad
from qjax._src import checkpoint as ck
from qjax._src.lora_config import LoraConfig

ADAPTERS_KEY = "qjax_adapters"
# Fields that change what the stored adapters compute; dropout / init / loftq_* do not.
_CHECKED_FIELDS = ("r", "alpha", "use_rslora", "target_modules", "exclude")


def config_to_json(config: LoraConfig) -> dict:
    out = dataclasses.asdict(config)
    for field in ("target_modules", "exclude"):
        value = out[field]
        if not isinstance(value, str):
            out[field] = [("re:" + p.pattern) if isinstance(p, re.Pattern) else p for p in value]
    return out


def config_from_json(d: dict) -> LoraConfig:
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in d.items() if k in known})


def _comparable(config: LoraConfig) -> dict:
    return {k: v for k, v in config_to_json(config).items() if k in _CHECKED_FIELDS}


def _name(path) -> str:
    return "/".join(map(str, path))


def save_adapters(path, variables_or_model, lora_config: LoraConfig, *, force: bool = False,
                  custom_metadata: dict | None = None) -> None:
    """Saves only the adapters (every `lora_a` / `lora_b` leaf) and the LoraConfig.

    path: directory to create (atomically: orbax writes a temporary directory and renames it).
    variables_or_model: Linen variables, an `nnx.State`, or an NNX module holding adapters.
    lora_config: the LoraConfig the adapters were trained with; stored as JSON.
    Raises ValueError when there are no adapters or an adapter's A/B shapes do not chain,
    TypeError when lora_config is not a LoraConfig.
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a qjax.LoraConfig, got {type(lora_config).__name__}")
    flat = ad.flat_adapters(variables_or_model)
    groups = ad.modules(flat)
    ranks = {np.shape(p["lora_a"])[-1] for p in groups.values()}
    if ranks != {lora_config.r}:
        raise ValueError(f"adapters have rank(s) {sorted(ranks)} but lora_config.r={lora_config.r}")
    meta = {"lora_config": config_to_json(lora_config),
            "adapters": [{"path": [ck._json_key(k) for k in p], "shape": list(np.shape(x)),
                          "dtype": np.dtype(x.dtype).name} for p, x in flat.items()]}
    custom = dict(custom_metadata or {})
    custom[ADAPTERS_KEY] = meta
    ck.save(path, ad.nest(flat), force=force, custom_metadata=custom)


def _read(path) -> dict:
    item_dir, step_dir = ck._locate(path, None)
    if step_dir is None:
        raise ck.CheckpointError(f"{os.fspath(path)!r} has no {ck._STEP_METADATA_FILE} file: it is not an "
                                 "adapter checkpoint written by qjax.checkpoint.save_adapters")
    import json
    f = os.path.join(step_dir, ck._STEP_METADATA_FILE)
    try:
        with open(f) as fh:
            meta = (json.load(fh).get("custom_metadata") or {}).get(ADAPTERS_KEY)
    except (OSError, ValueError) as e:
        raise ck.CheckpointError(f"metadata file {f!r} is unreadable (truncated or corrupted?): {e}") from None
    if not meta or "lora_config" not in meta or "adapters" not in meta:
        raise ck.CheckpointError(f"{os.fspath(path)!r} has no adapter metadata (LoraConfig and shapes) in {f!r}: "
                                 "it was not written by qjax.checkpoint.save_adapters")
    return meta


def read_adapter_config(path) -> LoraConfig:
    """The LoraConfig stored by `save_adapters` at `path`."""
    return config_from_json(_read(path)["lora_config"])


def load_adapters(path, variables_or_model, lora_config: LoraConfig | None = None):
    """Loads adapters saved by `save_adapters` onto a converted model.

    variables_or_model: Linen variables (a new tree is returned), an `nnx.State`, or an NNX
      module (updated in place and returned). Its adapters must be exactly those saved.
    lora_config: when given, must agree with the stored one on r, alpha, use_rslora,
      target_modules and exclude.
    Adapters are cast to the dtype of the model's adapters and keep their shardings.
    Raises CheckpointError (a ValueError) naming every mismatch: config fields, modules
    missing on either side, shapes (e.g. another rank or model size), damaged files.
    """
    meta = _read(path)
    saved_config = config_from_json(meta["lora_config"])
    where = os.fspath(path)
    if lora_config is not None:
        mine, theirs = _comparable(lora_config), _comparable(saved_config)
        diff = [f"{k}: checkpoint {theirs[k]!r}, given {mine[k]!r}" for k in _CHECKED_FIELDS if mine[k] != theirs[k]]
        if diff:
            raise ck.CheckpointError(f"adapter checkpoint {where!r} was saved with another LoraConfig: "
                                     + "; ".join(diff))
    model = ad.flat_adapters(variables_or_model)
    saved = {tuple(e["path"]): e for e in meta["adapters"]}
    norm = lambda p: tuple(map(str, p))  # noqa: E731
    model_n = {norm(p): p for p in model}
    saved_n = {norm(p): p for p in saved}
    problems = [f"{_name(p)} is in the model but not in the checkpoint" for p in sorted(set(model_n) - set(saved_n))]
    problems += [f"{_name(p)} is in the checkpoint but not in the model" for p in sorted(set(saved_n) - set(model_n))]
    for p in sorted(set(model_n) & set(saved_n)):
        s, m = tuple(saved[saved_n[p]]["shape"]), tuple(np.shape(model[model_n[p]]))
        if s != m:
            rank = ""
            if p[-1] == "lora_a" and s[:-1] == m[:-1]:
                rank = f" (LoRA rank r={s[-1]} in the checkpoint, r={m[-1]} in the model)"
            elif p[-1] == "lora_b" and s[1:] == m[1:]:
                rank = f" (LoRA rank r={s[0]} in the checkpoint, r={m[0]} in the model)"
            problems.append(f"{_name(p)}: checkpoint shape={s}, model shape={m}{rank}")
    if problems:
        raise ck.CheckpointError(f"adapter checkpoint {where!r} does not fit this model:\n  " + "\n  ".join(problems))

    def abstract(e, x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(tuple(e["shape"]), np.dtype(e["dtype"]) if e["dtype"] != "bfloat16"
                                    else jnp.bfloat16, sharding=sharding)

    target = ad.nest({saved_n[norm(p)]: abstract(saved[saved_n[norm(p)]], x) for p, x in model.items()})
    restored = ck.restore(path, target)
    new = {p: jnp.asarray(ad.lookup(restored, p)).astype(x.dtype) for p, x in model.items()}
    return ad.replace_adapters(variables_or_model, new)
