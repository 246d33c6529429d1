"""bitsandbytes serialization: QuantState.as_dict(packed=True) both ways, as numpy arrays."""

from __future__ import annotations

import json
import math

import numpy as np

from qjax._src import formats
from qjax._src.errors import describe
from qjax._src.qarray import QuantizedArray, _swap_last2, check_leaves, leaf_shapes

_BNB_DTYPES = {"float32": np.dtype("float32"), "float16": np.dtype("float16")}


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name  # "float32", "float16", "bfloat16" (ml_dtypes), as torch prints them


def _parse_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # jax's dependency
        return np.dtype(ml_dtypes.bfloat16)
    if name not in _BNB_DTYPES:
        raise ValueError(f"bitsandbytes state dict has dtype {name!r}; expected float32, bfloat16 or float16")
    return _BNB_DTYPES[name]


def _state_key(fmt: str) -> str:
    return f"quant_state.bitsandbytes__{fmt}"


def bnb_weight(q: QuantizedArray) -> np.ndarray:
    """The packed weight as bitsandbytes' `Params4bit` holds it: uint8 of shape (nbytes, 1)."""
    _check_4bit(q)
    return np.asarray(q.packed).reshape(-1, 1)


def _check_4bit(q: QuantizedArray) -> None:
    if not isinstance(q, QuantizedArray) or q.format not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes' 4-bit state holds nf4 or fp4 weights, got {q!r}")


def bnb_state_dict(q: QuantizedArray) -> dict[str, np.ndarray]:
    """The dict bitsandbytes' `QuantState.as_dict(packed=True)` gives for the same weight.

    Keys: "absmax", "quant_map", ["nested_absmax", "nested_quant_map"] and
    "quant_state.bitsandbytes__{nf4|fp4}" (uint8 bytes of a JSON blob). The recorded shape
    is the storage shape: a `transposed` q (torch `(out, in)`) records `(out, in)`.
    """
    _check_4bit(q)
    spec = formats.get_format(q.format)
    blob = {"quant_type": q.format, "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype),
            "shape": list(q.storage_shape)}
    out = {"absmax": np.asarray(q.absmax).reshape(-1), "quant_map": np.asarray(spec.codebook.code)}
    if q.double_quant:
        out["nested_absmax"] = np.asarray(q.nested_absmax)
        out["nested_quant_map"] = np.asarray(formats.DYNAMIC_CODE)
        blob.update(nested_blocksize=formats.NESTED_BLOCKSIZE, nested_dtype="float32",
                    nested_offset=float(np.asarray(q.offset)))
    out[_state_key(q.format)] = np.frombuffer(json.dumps(blob).encode(), dtype=np.uint8).copy()
    return out


def from_bnb_state_dict(packed_weight, state_dict, *, transposed: bool = False) -> QuantizedArray:
    """Reads a bitsandbytes 4-bit weight and its `QuantState.as_dict(packed=True)` dict.

    packed_weight: uint8 array of any shape holding ceil(n / 2) bytes.
    state_dict: numpy (or torch-converted) arrays keyed as bitsandbytes writes them; a
      "weight." prefix (Linear4bit's state dict) is accepted.
    transposed: read the recorded `(out, in)` torch weight as a logical `(in, out)` kernel.
    Returns a QuantizedArray whose bytes are exactly those given. Raises ValueError when the
    blob is missing or the sizes disagree with the recorded shape.
    """
    sd = {k.removeprefix("weight."): v for k, v in state_dict.items()}
    keys = [k for k in sd if k.startswith("quant_state.bitsandbytes__")]
    if len(keys) != 1:
        raise ValueError(f"state dict needs exactly one 'quant_state.bitsandbytes__<fmt>' entry, got keys {sorted(sd)}")
    try:
        blob = json.loads(bytes(np.asarray(sd[keys[0]], dtype=np.uint8)).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{keys[0]} is not a bitsandbytes JSON blob: {e}") from None
    fmt = blob.get("quant_type")
    if fmt not in ("nf4", "fp4"):
        raise ValueError(f"{keys[0]} has quant_type={fmt!r}; expected 'nf4' or 'fp4'")
    storage = tuple(int(d) for d in blob["shape"])
    shape = _swap_last2(storage) if transposed else storage
    blocksize = int(blob["blocksize"])
    double_quant = "nested_absmax" in sd
    expected = leaf_shapes(shape, fmt, blocksize, transposed, double_quant)
    packed = np.asarray(packed_weight)
    n_bytes = math.prod(expected["packed"])
    if packed.dtype != np.uint8 or packed.size != n_bytes:
        raise ValueError(f"packed weight ({describe(np.asarray(packed))}) does not hold the {n_bytes} uint8 bytes "
                         f"of a {fmt} weight of shape {storage}")
    absmax = np.asarray(sd["absmax"])
    want = np.uint8 if double_quant else np.float32
    if absmax.size != math.prod(expected["absmax"]) or absmax.dtype != want:
        raise ValueError(f"absmax ({describe(np.asarray(absmax))}) does not match shape {storage} at blocksize "
                         f"{blocksize}: expected {math.prod(expected['absmax'])} {np.dtype(want).name} values")
    code = np.asarray(sd.get("quant_map", formats.get_format(fmt).codebook.code), dtype=np.float32)
    if not np.array_equal(code, formats.get_format(fmt).codebook.code):
        raise ValueError(f"quant_map differs from bitsandbytes' {fmt} code; custom maps are not supported")
    nested = offset = None
    if double_quant:
        nested = np.asarray(sd["nested_absmax"], dtype=np.float32)
        if nested.shape != expected["nested_absmax"]:
            raise ValueError(f"nested_absmax ({describe(np.asarray(nested))}) does not match {len(absmax)} absmax codes: "
                             f"expected shape {expected['nested_absmax']}")
        offset = np.asarray(blob["nested_offset"], dtype=np.float32)
    q = QuantizedArray(packed=packed.reshape(expected["packed"]), absmax=absmax.reshape(expected["absmax"]),
                       nested_absmax=nested, offset=offset, format=fmt, blocksize=blocksize, shape=shape,
                       dtype=_parse_dtype(blob["dtype"]), transposed=transposed)
    check_leaves(q, "from_bnb_state_dict")
    return q
