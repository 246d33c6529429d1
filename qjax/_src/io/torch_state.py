"""Whole-model torch state dicts: bitsandbytes Linear4bit checkpoints in and out, merged dense export.

Leaf names: a torch Linear's `weight` (out, in) is a Flax `kernel` (in, out); an Embedding's
`weight` is `embedding`; a 1-D `weight` (RMSNorm / LayerNorm) is `scale`; `bias` is `bias`.
A bitsandbytes 4-bit `weight` (uint8 plus `weight.absmax`, `weight.quant_map`, ... and
`weight.quant_state.bitsandbytes__nf4|fp4`, as transformers writes it) becomes a QuantizedArray
with `transposed=True`: logical (in, out), codes kept bit for bit in torch's (out, in) order.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.adapters import tree as ad
from qjax._src import paths
from qjax._src.adapters import lora as L
from qjax._src.adapters.variant import variant_for
from qjax._src.io.bnb import bnb_state_dict, bnb_weight, from_bnb_state_dict
from qjax._src.errors import float_dtype, named
from qjax._src.adapters.config import LoraConfig
from qjax._src.io.names import LLAMA, NameMap
from qjax._src.io.peft import layer_lora_configs, load_safetensors, save_safetensors, scaling_problems
from qjax._src.core.qarray import QuantizedArray, is_quantized
from qjax._src.core.quantize import dequantize, quantize

_QSTATE = ".quant_state.bitsandbytes__"
_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes
            return x.float().numpy().astype(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _set_path(tree: dict, path: str, value) -> None:
    keys = path.split("/")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if keys[-1] in node:
        raise ValueError(f"two torch tensors map to the Flax path {path!r}; adjust the name_map")
    node[keys[-1]] = value


def from_torch_state_dict(state_dict, *, name_map: NameMap = LLAMA) -> dict:
    """A torch state dict (or a .safetensors path) as a Flax variables tree.

    bitsandbytes 4-bit weights become QuantizedArrays without requantizing; every other tensor is
    converted (Linear weights transposed to kernels). name_map turns torch module names into Flax
    paths (default: Hugging Face Llama names -> {"params": {"layers_0": ...}}).
    Raises ValueError for keys it cannot place (naming them) and for damaged or incomplete 4-bit
    entries (a uint8 weight or bitsandbytes statistics without their quant_state entry); TypeError
    for a weight or bias that is not a float tensor (naming its key, shape and dtype).
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_safetensors(state_dict)
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a dict of torch tensors / arrays or a .safetensors path, got "
                        f"{type(state_dict).__name__}")
    sd = dict(state_dict)
    quantized = sorted({k.split(_QSTATE)[0] for k in sd if _QSTATE in k})
    out: dict = {}
    used = set()
    for wkey in quantized:  # "model.layers.0.mlp.up_proj.weight"
        if wkey not in sd:
            raise ValueError(f"{wkey + _QSTATE}... has no packed tensor {wkey!r}")
        stats = {k[len(wkey) + 1:]: _to_numpy(v) for k, v in sd.items() if k.startswith(wkey + ".")}
        used.update(k for k in sd if k.startswith(wkey + "."))
        used.add(wkey)
        try:
            q = from_bnb_state_dict(_to_numpy(sd[wkey]), stats, transposed=True)
        except ValueError as e:
            raise ValueError(f"{wkey}: {e}") from None
        if q.ndim != 2:
            raise ValueError(f"{wkey}: 4-bit weight has shape {q.storage_shape}; a Linear weight is 2-D")
        module = wkey.rsplit(".", 1)[0]
        _set_path(out, f"{name_map.to_flax(module)}/kernel", q)
    orphans = [k for k in sd if k not in used and k.rsplit(".", 1)[-1] in _BNB_SUFFIXES
               and k.rsplit(".", 1)[0].endswith(".weight")]
    if orphans:
        wkey = orphans[0].rsplit(".", 1)[0]
        raise ValueError(f"{', '.join(named(k, _to_numpy(sd[k])) for k in orphans[:4])}: bitsandbytes 4-bit statistics "
                         f"of {wkey!r}, but the state dict has no '{wkey}{_QSTATE}nf4|fp4' entry: its quant_state was "
                         "dropped; save the state dict with every entry bitsandbytes writes")
    unknown = []
    for key, value in sd.items():
        if key in used:
            continue
        if "." not in key:
            unknown.append(key)
            continue
        module, leaf = key.rsplit(".", 1)
        x = _to_numpy(value)
        if leaf in ("weight", "bias") and not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
            if x.dtype == np.uint8 and leaf == "weight":
                raise ValueError(f"{named(key, x)} looks like a packed bitsandbytes 4-bit weight, but the state dict "
                                 f"has no '{key}{_QSTATE}nf4|fp4' entry (nor absmax): its quant_state was dropped, and "
                                 "read as is it would be a dense uint8 kernel; save it with its quantization state")
            raise TypeError(f"{named(key, value if not hasattr(value, 'dtype') else x)} is not a float tensor: qjax "
                            "reads float weights and bitsandbytes 4-bit entries (nf4 / fp4)")
        if leaf == "bias":
            name = "bias"
        elif leaf == "weight" and x.ndim == 1:
            name = "scale"
        elif leaf == "weight" and x.ndim == 2 and "embed" in module.rsplit(".", 1)[-1]:
            name = "embedding"
        elif leaf == "weight" and x.ndim == 2:
            name, x = "kernel", np.ascontiguousarray(x.T)
        else:
            unknown.append(key)
            continue
        _set_path(out, f"{name_map.to_flax(module)}/{name}", jnp.asarray(x))
    if unknown:
        raise ValueError(f"cannot place torch tensors {[named(k, _to_numpy(sd[k])) for k in unknown[:10]]} in a "
                         "Flax tree (expected '<module>.weight' or '<module>.bias', or bitsandbytes 4-bit entries)")
    return out


def _leaves(variables):
    """(module path, leaf name, leaf) of every leaf: Linen variables, an `nnx.State` or a whole NNX module."""
    if ad.is_nnx_module(variables):
        from flax import nnx
        variables = nnx.state(variables)  # all of it (ad.as_tree of a module reads the adapters only)
    tree = ad.as_tree(variables)
    for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]:
        path = paths.path_keys(p)
        yield "/".join(map(str, path[:-1])), str(path[-1]), x


def _torch_leaf(module: str, leaf: str, x, name_map: NameMap) -> tuple[str, Any]:
    name = name_map.to_torch(module)
    if leaf == "kernel":
        if np.ndim(x) != 2:
            raise ValueError(f"{module}/kernel has shape {np.shape(x)}; torch Linear weights are 2-D "
                             "(reshape DenseGeneral kernels first)")
        return f"{name}.weight", np.ascontiguousarray(np.asarray(x).T)
    if leaf in ("embedding", "scale"):
        return f"{name}.weight", np.asarray(x)
    if leaf == "bias":
        return f"{name}.bias", np.asarray(x)
    raise ValueError(f"cannot name {module}/{leaf} in a torch state dict (known leaves: kernel, embedding, "
                     "scale, bias)")


def bnb_model_state_dict(variables, *, name_map: NameMap = LLAMA, requantize: bool = False) -> dict[str, np.ndarray]:
    """The model as bitsandbytes `Linear4bit` state dicts (as transformers saves a 4-bit model).

    variables: Flax variables whose 4-bit kernels are nf4/fp4 QuantizedArrays; adapters are
    left out (save them with `save_peft_adapter`). A kernel stored `(in, out)` (transposed=False)
    cannot become bitsandbytes' `(out, in)` blocks without requantizing: pass requantize=True to
    dequantize and requantize it (codes then differ), else a ValueError names it.
    Returns {torch name: numpy array}; write it with `save_safetensors`.
    """
    out: dict[str, np.ndarray] = {}
    for module, leaf, x in _leaves(variables):
        if ad.is_adapter_path((leaf,)):
            continue
        if is_quantized(x):
            if leaf != "kernel" or not (isinstance(x, QuantizedArray) and x.spec.is_bnb_4bit) or x.ndim != 2:
                raise ValueError(f"{module}/{leaf} is {x!r}; bitsandbytes Linear4bit holds 2-D nf4/fp4 kernels")
            if not x.transposed:
                if not requantize:
                    raise ValueError(f"{module}/kernel is stored (in, out); bitsandbytes stores (out, in). Quantize "
                                     "with transposed=True (or pass requantize=True, which changes its codes)")
                x = quantize(dequantize(x), x.format, blocksize=x.blocksize, double_quant=x.double_quant,
                             transposed=True)
            name = f"{name_map.to_torch(module)}.weight"
            out[name] = bnb_weight(x)
            out.update({f"{name}.{k}": v for k, v in bnb_state_dict(x).items()})
        else:
            key, value = _torch_leaf(module, leaf, x, name_map)
            out[key] = value
    return out


def _unstacked(entries, stacked_module: str | None, nnx: bool):
    """(module, leaf, x) entries with the leaves of a scanned / vmapped module split per layer.

    A leaf whose module path holds the stack (`adapters.stack_component`, the rule PEFT export
    uses) carries a leading layer axis: layer i gets `adapters.layer_path`, as in unscanned models.
    """
    for module, leaf, x in entries:
        parts = module.split("/")
        j = None if stacked_module is None else ad.stack_component(parts, stacked_module, nnx)[0]
        if j is None:
            yield module, leaf, x
            continue
        size = x.stack_shape[0] if is_quantized(x) else np.shape(x)[0]
        for i in range(size):
            path = ad.layer_path(parts, j, i, stacked_module, nnx)
            yield "/".join(map(str, path)), leaf, jax.tree_util.tree_map(lambda a: a[i], x)


def merged_state_dict(variables, lora_config: LoraConfig, *, dtype=jnp.bfloat16, name_map: NameMap = LLAMA,
                      stacked_module: str | None = "layers") -> dict[str, np.ndarray]:
    """The merged dense model (PEFT's `merge_and_unload`) as a torch state dict.

    Each kernel with adapters becomes `dequantize(kernel, float32) + scaling * A @ B` (in
    float32, the math of `qjax.linen.merge`), cast to `dtype` and transposed to torch's (out, in);
    adapters of rank > 2 (`lora_a (*in, r)`, `lora_b (r, *out)`) give the flattened
    (prod(out), prod(in)) weight. Other QuantizedArrays are dequantized; everything else is cast to
    `dtype` when it is a float.
    stacked_module: the scanned / vmapped module (a path component, as in `save_peft_adapter`);
      every leaf under it is split into one module per layer (`layers_0`, ... as an unscanned model
      names them). None: no splitting.
    Raises ValueError for adapters without a kernel (or half a pair), adapters whose rank is not
    lora_config.r or NNX layers that apply another scaling (the merge would use the wrong one), and
    for kernels that are not one torch Linear (per-expert stacks, nested scans), naming the module
    and shapes; TypeError when lora_config is not a LoraConfig or dtype is not a float dtype.
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a qjax.LoraConfig, got {type(lora_config).__name__}")
    float_dtype(dtype)  # merged weights are float tensors
    wrong = layer_lora_configs(variables) and scaling_problems(
        lora_config, variables, lora_config, "lora_config passed", fix="pass the LoraConfig the model was converted with")
    if wrong:
        raise ValueError("the merged weights would use another scaling than the model applies: " + "; ".join(wrong))
    dtype = np.dtype(dtype)
    entries = list(_unstacked(_leaves(variables), stacked_module, ad.is_nnx(variables)))
    by_module: dict[str, dict] = {}
    for module, leaf, x in entries:
        if ad.is_adapter_path((leaf,)):
            by_module.setdefault(module, {})[leaf] = x
    partial = []
    for m, leaves in by_module.items():
        try:
            variant_for(leaves, m)
        except ValueError as e:
            partial.append(str(e))
    if partial:
        raise ValueError("modules with only part of an adapter: " + "; ".join(sorted(partial)))
    out: dict[str, np.ndarray] = {}
    for module, leaf, x in entries:
        if ad.is_adapter_path((leaf,)):
            continue
        leaves = by_module.pop(module, None) if leaf == "kernel" else None
        if leaves is not None:
            shapes = {k: tuple(np.shape(v)) for k, v in leaves.items()}
            what = ", ".join(f"{k} shape={v}" for k, v in shapes.items())
            variant = variant_for(shapes, module)
            if variant is not type(lora_config.variant):
                raise ValueError(f"{module}: {variant.name!r} adapters ({what}), but lora_config.variant is "
                                 f"{lora_config.variant!r}; pass the LoraConfig the model was converted with")
            layout = variant.layout(shapes)
            if layout is not None and layout.r != lora_config.r:
                raise ValueError(f"{module}: adapters of rank {layout.r} ({what}), but "
                                 f"lora_config.r={lora_config.r}: its scaling is not the one these adapters were "
                                 "trained with; pass the LoraConfig the model was converted with")
            if layout is None or layout.lead:
                raise ValueError(f"{module}: stacked adapters ({what}) are not one torch Linear (per-expert layers, "
                                 f"or a scan not named stacked_module={stacked_module!r})")
            # qjax.linen.merge / qjax.nnx.merge's math; a kernel of rank > 2 (DenseGeneral / Einsum) is
            # flattened to (prod(in), prod(out)), the layout of the torch Linear it stands for.
            in_shape, out_shape = layout.in_shape, layout.out_shape
            x = L.merged_params(x, leaves, variant=lora_config.variant, scaling=lora_config.scaling,
                                in_shape=in_shape, out_shape=out_shape, dtype=jnp.float32)
            x = jnp.reshape(x, (math.prod(in_shape), math.prod(out_shape)))
        elif is_quantized(x):
            x = dequantize(x, jnp.float32)
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16":
            x = np.asarray(jnp.asarray(x).astype(dtype))
        key, value = _torch_leaf(module, leaf, x, name_map)
        out[key] = value
    if by_module:
        raise ValueError(f"adapters without a kernel beside them: {sorted(by_module)}")
    return out


def save_merged(directory, variables, lora_config: LoraConfig, *, dtype=jnp.bfloat16, name_map: NameMap = LLAMA,
                hf_config: dict | None = None, stacked_module: str | None = "layers") -> str:
    """Writes `merged_state_dict(...)` to directory/model.safetensors (+ config.json from hf_config).

    With hf_config (a dict such as `transformers.LlamaConfig(...).to_dict()`, or the config object
    itself), the directory loads with `transformers.AutoModelForCausalLM.from_pretrained(directory)`.
    Returns the weights' path. Everything is checked before anything is written: TypeError for an
    hf_config that is not a dict, and the errors of `merged_state_dict`.
    """
    import json
    if hf_config is not None:
        hf_config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config
        if not isinstance(hf_config, dict):
            raise TypeError(f"hf_config must be a dict such as transformers.LlamaConfig(...).to_dict(), got "
                            f"{type(hf_config).__name__}")
    sd = merged_state_dict(variables, lora_config, dtype=dtype, name_map=name_map, stacked_module=stacked_module)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), "model.safetensors")
    save_safetensors(path, sd, metadata={"format": "pt"})
    if hf_config is not None:
        cfg = dict(hf_config)
        cfg["torch_dtype"] = cfg["dtype"] = np.dtype(dtype).name
        with open(os.path.join(os.fspath(directory), "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, default=str)
    return path
