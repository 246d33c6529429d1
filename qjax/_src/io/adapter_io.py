"""Adapter-only checkpoints: the adapter variant's leaves (LoRA's `lora_a` / `lora_b`) plus the LoraConfig,
as an orbax checkpoint."""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.adapters import tree as ad
from qjax._src import paths
from qjax._src.io import checkpoint as ck
from qjax._src.io import files as files
from qjax._src.adapters.config import LoraConfig
from qjax._src.adapters.variant import variant_for, variant_from_json

ADAPTERS_KEY = "qjax_adapters"
# Fields that change what the stored adapters compute; dropout / init / loftq_* do not.
_CHECKED_FIELDS = ("r", "alpha", "use_rslora", "target_modules", "exclude", "variant")


def config_to_json(config: LoraConfig) -> dict:
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["variant"] = config.variant.to_json()
    for field in ("target_modules", "exclude"):
        value = out[field]
        if not isinstance(value, str):
            out[field] = [("re:" + p.pattern) if isinstance(p, re.Pattern) else p for p in value]
    return out


def config_from_json(d: dict, where: str = "the stored LoraConfig") -> LoraConfig:
    """The LoraConfig of `config_to_json`'s dict (unknown keys ignored).

    Raises CheckpointError naming `where` when d is not a dict or holds values LoraConfig refuses.
    """
    if not isinstance(d, dict):
        raise ck.CheckpointError(f"{where} is a JSON {type(d).__name__}, not a LoraConfig object: the metadata "
                                 "is damaged or was not written by qjax")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        fields = {k: v for k, v in d.items() if k in known}
        if "variant" in fields:  # absent in files written before variants: LoRA
            fields["variant"] = variant_from_json(fields["variant"])
        return LoraConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ck.CheckpointError(f"{where} is not a valid LoraConfig ({d!r}): {e}") from None


def _comparable(config: LoraConfig) -> dict:
    return {k: v for k, v in config_to_json(config).items() if k in _CHECKED_FIELDS}


def save_adapters(path, variables_or_model, lora_config: LoraConfig, *, force: bool = False,
                  custom_metadata: dict | None = None, allow_nonfinite: bool = False) -> None:
    """Saves only the adapters (every adapter variant's leaf: LoRA's `lora_a` / `lora_b`) and the LoraConfig.

    path: directory to create, or with force=True an adapter checkpoint to replace; written
      beside `path` and swapped in when complete (see `qjax.checkpoint.save`).
    variables_or_model: Linen variables, an `nnx.State`, or an NNX module holding adapters.
    lora_config: the LoraConfig the adapters were trained with; stored as JSON.
    allow_nonfinite: save adapters holding NaN / inf too.
    Raises ValueError when there are no adapters, an adapter's shapes do not fit its variant, its
    variant or rank is not lora_config's, or an
    adapter holds NaN / inf (named by path, shape, dtype, count), TypeError when lora_config is
    not a LoraConfig, CheckpointError as `qjax.checkpoint.save` does.
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a qjax.LoraConfig, got {type(lora_config).__name__}")
    flat = ad.flat_adapters(variables_or_model)
    groups = ad.modules(flat)
    kinds = {variant_for(p) for p in groups.values()}
    if kinds != {type(lora_config.variant)}:
        raise ValueError(f"adapters are {sorted(k.name for k in kinds)} but "
                         f"lora_config.variant={lora_config.variant!r}")
    ranks = {variant_for(p).layout({k: np.shape(v) for k, v in p.items()}).r for p in groups.values()}
    if ranks != {lora_config.r}:
        raise ValueError(f"adapters have rank(s) {sorted(ranks)} but lora_config.r={lora_config.r}")
    if not allow_nonfinite:
        ck.check_finite(ad.nest(flat), "the adapters")
    meta = {"lora_config": config_to_json(lora_config),
            "adapters": [{"path": [paths.json_key(k) for k in p], "shape": list(np.shape(x)),
                          "dtype": np.dtype(x.dtype).name} for p, x in flat.items()]}
    custom = dict(custom_metadata or {})
    custom[ADAPTERS_KEY] = meta
    ck.save(path, ad.nest(flat), force=force, custom_metadata=custom)


def _read(path) -> dict:
    item_dir, step_dir = ck.locate(path, None)
    if step_dir is None:
        raise ck.CheckpointError(f"{os.fspath(path)!r} has no {files.STEP_METADATA_FILE} file: it is not an "
                                 "adapter checkpoint written by qjax.checkpoint.save_adapters")
    import json
    f = os.path.join(step_dir, files.STEP_METADATA_FILE)
    try:
        with open(f) as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as e:
        raise ck.CheckpointError(f"metadata file {f!r} is unreadable (truncated or corrupted?): {e}") from None
    custom = doc.get("custom_metadata") if isinstance(doc, dict) else None
    meta = custom.get(ADAPTERS_KEY) if isinstance(custom, dict) else None
    if not isinstance(meta, dict) or "lora_config" not in meta or "adapters" not in meta:
        raise ck.CheckpointError(f"{os.fspath(path)!r} has no adapter metadata (LoraConfig and shapes) in {f!r}: "
                                 "it was not written by qjax.checkpoint.save_adapters")
    entries = meta["adapters"] if isinstance(meta["adapters"], list) else [meta["adapters"]]
    for e in entries:
        try:
            ok = (isinstance(e["path"], list) and e["path"] and all(isinstance(k, (str, int)) for k in e["path"])
                  and isinstance(e["shape"], list)
                  and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in e["shape"])
                  and isinstance(e["dtype"], str) and (e["dtype"] == "bfloat16" or np.dtype(e["dtype"]) is not None))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ck.CheckpointError(f"adapter entry {e!r} in {f!r} is damaged: expected "
                                     "{'path': [...], 'shape': [ints], 'dtype': '<numpy dtype name>'}")
    return meta


def _rank_axes(model_flat) -> dict[tuple, int]:
    """{adapter leaf path: index of its RANK axis} for the model's adapters (leaves without one left out)."""
    out = {}
    for mod, leaves in ad.modules(model_flat).items():
        variant = variant_for(leaves)
        layout = variant.layout({k: np.shape(v) for k, v in leaves.items()})
        out.update({mod + (leaf,): i for leaf in leaves for i in (variant.rank_axis(leaf, layout),) if i is not None})
    return out


def read_adapter_config(path) -> LoraConfig:
    """The LoraConfig stored by `save_adapters` at `path`; CheckpointError for damaged metadata."""
    return config_from_json(_read(path)["lora_config"], f"the LoraConfig stored in {os.fspath(path)!r}")


def load_adapters(path, variables_or_model, lora_config: LoraConfig | None = None):
    """Loads adapters saved by `save_adapters` onto a converted model.

    variables_or_model: Linen variables (a new tree is returned), an `nnx.State`, or an NNX
      module (updated in place and returned). Its adapters must be exactly those saved.
    lora_config: the LoraConfig the model was converted with; when given, must agree with the
      stored one on r, alpha, use_rslora, target_modules and exclude. Required for Linen variables
      and an nnx.State, which do not record the scaling (alpha / r) the model applies; qjax's NNX
      layers record theirs, which must give the stored scaling.
    Adapters are cast to the dtype of the model's adapters and keep their shardings.
    Raises CheckpointError (a ValueError) naming every mismatch: config fields, the scaling the
    model applies, modules missing on either side, shapes (e.g. another rank or model size),
    damaged files; TypeError when lora_config is not a LoraConfig.
    """
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a qjax.LoraConfig, got {type(lora_config).__name__}")
    meta = _read(path)
    where = os.fspath(path)
    saved_config = config_from_json(meta["lora_config"], f"the LoraConfig stored in {where!r}")
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
    problems = [f"{paths.path_str(p)} is in the model but not in the checkpoint" for p in sorted(set(model_n) - set(saved_n))]
    problems += [f"{paths.path_str(p)} is in the checkpoint but not in the model" for p in sorted(set(saved_n) - set(model_n))]
    ranks = _rank_axes(model)
    for p in sorted(set(model_n) & set(saved_n)):
        s, m = tuple(saved[saved_n[p]]["shape"]), tuple(np.shape(model[model_n[p]]))
        if s != m:
            i = ranks.get(model_n[p])
            rank = (f" (LoRA rank r={s[i]} in the checkpoint, r={m[i]} in the model)" if i is not None and
                    len(s) == len(m) and s[:i] + s[i + 1:] == m[:i] + m[i + 1:] else "")
            problems.append(f"{paths.path_str(p)}: checkpoint shape={s}, model shape={m}{rank}")
    if not problems:
        from qjax._src.io.peft import scaling_problems  # the same check as PEFT files get
        problems = scaling_problems(saved_config, variables_or_model, lora_config, "checkpoint")
    if problems:
        raise ck.CheckpointError(f"adapter checkpoint {where!r} does not fit this model:\n  " + "\n  ".join(problems))

    def abstract(e, x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(tuple(e["shape"]), np.dtype(e["dtype"]) if e["dtype"] != "bfloat16"
                                    else jnp.bfloat16, sharding=sharding)

    target = ad.nest({saved_n[norm(p)]: abstract(saved[saved_n[norm(p)]], x) for p, x in model.items()})
    restored = ck.restore(path, target)
    new = {p: jnp.asarray(paths.lookup(restored, p)).astype(x.dtype) for p, x in model.items()}
    return ad.replace_adapters(variables_or_model, new)
