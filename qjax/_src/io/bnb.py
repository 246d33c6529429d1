"""bitsandbytes serialization: QuantState.as_dict(packed=True) both ways, as numpy arrays."""

from __future__ import annotations

import json
import math

import numpy as np

from qjax._src.core import formats
from qjax._src.errors import describe
from qjax._src.core.family import dtype_name, parse_dtype
from qjax._src.core.partition import swap_last2
from qjax._src.core.qarray import QuantizedArray, leaf_shapes

def _state_key(fmt: str) -> str:
    return f"quant_state.bitsandbytes__{fmt}"


def bnb_weight(q: QuantizedArray) -> np.ndarray:
    """The packed weight as bitsandbytes' `Params4bit` holds it: uint8 of shape (nbytes, 1)."""
    _check_4bit(q)
    return np.asarray(q.packed).reshape(-1, 1)


def _check_4bit(q: QuantizedArray) -> None:
    if not isinstance(q, QuantizedArray) or not q.spec.is_bnb_4bit:
        raise ValueError(f"bitsandbytes' 4-bit state holds nf4 or fp4 weights, got {q!r}")


def bnb_state_dict(q: QuantizedArray) -> dict[str, np.ndarray]:
    """The dict bitsandbytes' `QuantState.as_dict(packed=True)` gives for the same weight.

    Keys: "absmax", "quant_map", ["nested_absmax", "nested_quant_map"] and
    "quant_state.bitsandbytes__{nf4|fp4}" (uint8 bytes of a JSON blob). The recorded shape
    is the storage shape: a `transposed` q (torch `(out, in)`) records `(out, in)`.
    """
    _check_4bit(q)
    spec = q.spec
    blob = {"quant_type": q.format, "blocksize": q.blocksize, "dtype": dtype_name(q.dtype),
            "shape": list(q.storage_shape)}
    out = {"absmax": np.asarray(q.absmax).reshape(-1), "quant_map": np.asarray(spec.codebook.code)}
    if q.double_quant:
        out["nested_absmax"] = np.asarray(q.nested_absmax)
        out["nested_quant_map"] = np.asarray(formats.DYNAMIC_CODE)
        blob.update(nested_blocksize=formats.NESTED_BLOCKSIZE, nested_dtype="float32",
                    nested_offset=float(np.asarray(q.offset)))
    out[_state_key(q.format)] = np.frombuffer(json.dumps(blob).encode(), dtype=np.uint8).copy()
    return out


def _blob(key: str, raw) -> dict:
    """The JSON object of a `quant_state.bitsandbytes__<fmt>` entry (uint8 bytes), checked field by field."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"{key} ({describe(raw)}) must hold the uint8 bytes of bitsandbytes' JSON blob")
    try:
        blob = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key} is not a bitsandbytes JSON blob: {e}") from None
    if not isinstance(blob, dict):
        raise ValueError(f"{key} holds a JSON {type(blob).__name__}, not bitsandbytes' quant_state object")
    fmt = blob.get("quant_type")
    bnb_4bit = [f.name for f in formats.FORMATS.values() if f.is_bnb_4bit]
    if fmt not in bnb_4bit:
        raise ValueError(f"{key} has quant_type={fmt!r}; expected one of {bnb_4bit}")
    missing = [k for k in ("blocksize", "shape", "dtype") if k not in blob]
    if missing:
        raise ValueError(f"{key} lacks {missing}: bitsandbytes records quant_type, blocksize, shape and dtype")
    shape = blob["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                              for d in shape) or not shape:
        raise ValueError(f"{key} has shape={shape!r}; expected a list of positive ints")
    if not isinstance(blob["blocksize"], int) or blob["blocksize"] not in formats.BLOCKSIZES:
        raise ValueError(f"{key} has blocksize={blob['blocksize']!r}; expected one of {list(formats.BLOCKSIZES)}")
    if not isinstance(blob["dtype"], str):
        raise ValueError(f"{key} has dtype={blob['dtype']!r}; expected a dtype name such as 'float16'")
    return blob


def _finite(name: str, x: np.ndarray) -> None:
    """NaN / Inf statistics would scale whole blocks of the weight to NaN / Inf without a word."""
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ValueError(f"{name} ({describe(x)}) holds {bad} NaN / Inf values: the state dict is corrupted")


def from_bnb_state_dict(packed_weight, state_dict, *, transposed: bool = False) -> QuantizedArray:
    """Reads a bitsandbytes 4-bit weight and its `QuantState.as_dict(packed=True)` dict.

    packed_weight: uint8 array of any shape holding ceil(n / 2) bytes.
    state_dict: numpy (or torch-converted) arrays keyed as bitsandbytes writes them; a
      "weight." prefix (Linear4bit's state dict) is accepted.
    transposed: read the recorded `(out, in)` torch weight as a logical `(in, out)` kernel.
    Returns a QuantizedArray whose bytes are exactly those given. Raises ValueError (naming the
    entry, its shape and dtype) when the blob is missing, damaged or lacks a field (quant_type,
    blocksize, shape, dtype; nested_offset with double quantization), an entry is missing
    (absmax), the sizes disagree with the recorded shape, a quant map is not bitsandbytes' or
    statistics are NaN / Inf; TypeError when state_dict is not a mapping.
    """
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a dict of bitsandbytes' entries, got {type(state_dict).__name__}")
    sd = {k.removeprefix("weight."): v for k, v in state_dict.items()}
    keys = [k for k in sd if k.startswith("quant_state.bitsandbytes__")]
    if len(keys) != 1:
        raise ValueError(f"state dict needs exactly one of the entries {_state_key('nf4')!r} / {_state_key('fp4')!r} "
                         f"(bitsandbytes' JSON blob), got keys {sorted(sd)}")
    blob = _blob(keys[0], sd[keys[0]])
    fmt = blob["quant_type"]
    storage = tuple(blob["shape"])
    shape = swap_last2(storage) if transposed else storage
    blocksize = blob["blocksize"]
    double_quant = "nested_absmax" in sd
    if double_quant and not isinstance(blob.get("nested_offset"), (int, float)):
        raise ValueError(f"{keys[0]} has nested_offset={blob.get('nested_offset')!r} but the state dict has "
                         "nested_absmax: double-quantized statistics need the offset (a number)")
    if double_quant and blob.get("nested_blocksize", formats.NESTED_BLOCKSIZE) != formats.NESTED_BLOCKSIZE:
        raise ValueError(f"{keys[0]} has nested_blocksize={blob['nested_blocksize']!r}; bitsandbytes' 4-bit "
                         f"double quantization uses {formats.NESTED_BLOCKSIZE}")
    expected = leaf_shapes(shape, fmt, blocksize, transposed, double_quant)
    packed = np.asarray(packed_weight)
    n_bytes = math.prod(expected["packed"])
    if packed.dtype != np.uint8 or packed.size != n_bytes:
        raise ValueError(f"packed weight ({describe(np.asarray(packed))}) does not hold the {n_bytes} uint8 bytes "
                         f"of a {fmt} weight of shape {storage}")
    if "absmax" not in sd:
        raise ValueError(f"state dict has no 'absmax' entry (the per-block scales of the {fmt} weight of shape "
                         f"{storage}); got keys {sorted(sd)}")
    absmax = np.asarray(sd["absmax"])
    want = np.uint8 if double_quant else np.float32
    if absmax.dtype == np.uint8 and not double_quant:
        raise ValueError(f"absmax ({describe(absmax)}) holds double-quantized codes, but the state dict has no "
                         "nested_absmax entry to decode them")
    if absmax.size != math.prod(expected["absmax"]) or absmax.dtype != want:
        raise ValueError(f"absmax ({describe(np.asarray(absmax))}) does not match shape {storage} at blocksize "
                         f"{blocksize}: expected {math.prod(expected['absmax'])} {np.dtype(want).name} values")
    for name, want_code in (("quant_map", formats.get_format(fmt).codebook.code),
                            ("nested_quant_map", formats.DYNAMIC_CODE if double_quant else None)):
        if want_code is None or name not in sd:
            continue
        code = np.asarray(sd[name])
        if code.shape != np.shape(want_code) or not np.array_equal(code.astype(np.float32), want_code):
            raise ValueError(f"{name} ({describe(code)}) differs from bitsandbytes' "
                             f"{fmt if name == 'quant_map' else 'dynamic 8-bit'} code; custom maps are not supported")
    nested = offset = None
    if double_quant:
        nested = np.asarray(sd["nested_absmax"])
        if nested.shape != expected["nested_absmax"] or not np.issubdtype(nested.dtype, np.floating):
            raise ValueError(f"nested_absmax ({describe(nested)}) does not match {absmax.size} absmax codes: "
                             f"expected float32 of shape {expected['nested_absmax']}")
        nested = nested.astype(np.float32)
        _finite("nested_absmax", nested)
        offset = np.asarray(blob["nested_offset"], dtype=np.float32)
        _finite(f"{keys[0]} nested_offset", offset)
    else:
        _finite("absmax", absmax)
    try:
        dtype = parse_dtype(blob["dtype"], "bitsandbytes state dict")
    except ValueError as e:
        raise ValueError(f"{keys[0]}: {e}") from None
    q = QuantizedArray(packed=packed.reshape(expected["packed"]), absmax=absmax.reshape(expected["absmax"]),
                       nested_absmax=nested, offset=offset, format=fmt, blocksize=blocksize, shape=shape,
                       dtype=dtype, transposed=transposed)
    q.check_leaves("from_bnb_state_dict")
    return q
