"""Array-level quantization: quantize / dequantize and the 8-bit dynamic blockwise quantizer.

Every function here is pure and runs under `jit`; rounding follows bitsandbytes 0.50.2 on
the CPU bit for bit (docs/formats.md lists the rules and why each matters).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.core import formats
from qjax._src.core.codes import code_index, pack_codes
from qjax._src.core import blockwise
from qjax._src.core.blockwise import blocks_of, int8_absmax_axes, round_product
from qjax._src.core.family import check_quantized, is_quantized
from qjax._src.core.qarray import QuantizedArray, is_structured
from qjax._src.errors import describe, float_dtype

_F32 = jnp.float32
# bitsandbytes clamps a zero absmax of the last partial block to this value (and stores it).
_PARTIAL_ABSMAX_FLOOR = np.float32(1e-38)
_FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


# ----------------------------------------------------------------------------- validation


def check_float_array(x, what: str = "x") -> None:
    """Raises TypeError/ValueError unless x is a non-empty float32/bfloat16/float16 array."""
    if is_quantized(x):
        raise TypeError(f"{what} is already quantized ({x!r}); dequantize it first (qjax.dequantize)")
    if isinstance(x, jax.ShapeDtypeStruct):
        raise TypeError(f"{what} is a jax.ShapeDtypeStruct ({describe(x)}), which holds no values; for the "
                        "quantized shapes use jax.eval_shape(qjax.quantize, x) or "
                        "jax.eval_shape(qjax.quantize_params, tree)")
    if not hasattr(x, "dtype") or not hasattr(x, "shape") or np.dtype(x.dtype) not in _FLOAT_DTYPES:
        fix = "; cast it first (x.astype(jnp.float32))" if hasattr(x, "dtype") and hasattr(x, "shape") else ""
        raise TypeError(f"{what} must be a float32, bfloat16 or float16 array, got {describe(x)}{fix}")
    if math.prod(np.shape(x)) == 0:
        raise ValueError(f"{what} is empty ({describe(x)}); there is nothing to quantize")


def check_finite(x, what: str = "x") -> None:
    """Raises ValueError if a concrete x holds NaN or Inf (skipped for traced values)."""
    if isinstance(x, jax.core.Tracer):
        return
    finite = jnp.isfinite(jnp.asarray(x))
    if not bool(jnp.all(finite)):
        bad = int(jnp.size(finite) - jnp.sum(finite))
        raise ValueError(f"{what} ({describe(x)}) holds {bad} NaN/Inf value(s); quantizing it would give wrong codes")


def check_flag(value, name: str) -> bool:
    """value as a Python bool; raises TypeError for anything but a bool (a string is truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r} must be a bool, got {type(value).__name__}")
    return bool(value)


def as_blocksize(blocksize, name: str = "blocksize") -> int | None:
    """blocksize as a Python int (numpy integers accepted) or None; raises TypeError otherwise."""
    if blocksize is None:
        return None
    if isinstance(blocksize, (bool, np.bool_)) or not isinstance(blocksize, (int, np.integer)):
        raise TypeError(f"{name}={blocksize!r} must be an int, one of {list(formats.BLOCKSIZES)}; "
                        f"got {type(blocksize).__name__}")
    return int(blocksize)


def _check_8bit_blocksize(blocksize) -> int:
    blocksize = as_blocksize(blocksize)
    if blocksize not in formats.BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} needs to be one of {list(formats.BLOCKSIZES)}")
    return blocksize


def check_blocksize(fmt: formats.Format, blocksize) -> int | None:
    """blocksize as an int valid for fmt (None: per-channel, linear formats only); raises otherwise."""
    blocksize = as_blocksize(blocksize)
    if blocksize is None and fmt.is_linear:
        return None
    if blocksize not in formats.BLOCKSIZES:
        valid = list(formats.BLOCKSIZES) + (["None (per output channel)"] if fmt.is_linear else [])
        raise ValueError(f"blocksize={blocksize!r} is not valid for format {fmt.name!r}. "
                         f"It needs to be one of {valid}.")
    return blocksize


# ----------------------------------------------------------------------------- finiteness report

# A quantizer returns a report next to its result: int32 (2,) [blocks whose absmax is NaN/Inf, _OVERFLOW_*
# code]. It reads only the absmax (a NaN/Inf anywhere in a block makes its absmax NaN/Inf), so it costs
# no pass over x and no temporary; `check_report` reads it on the host (concrete input) or in a
# `jax.debug.callback` (traced input), so the same check runs eagerly, under jit, vmap and sharding.
_OVERFLOW_NONE, _OVERFLOW_DOUBLE_QUANT, _OVERFLOW_INT8 = 0, 1, 2
# int8 dequantizes as (code * absmax) / 127 (bitsandbytes' order), which overflows float32 above this
_INT8_MAX_ABSMAX = np.float32(np.finfo(np.float32).max / 127)


def abs_max(x, axis=None):
    """max |x| over axis, NaN-safe: a NaN counts as +inf. XLA's CPU max reduction can drop a NaN at the
    start of a long row (seen for rows of 256+ elements), which would let a NaN weight quantize silently;
    an inf absmax is what the finiteness report catches."""
    return jnp.where(jnp.any(jnp.isnan(x), axis=axis), jnp.inf, jnp.max(jnp.abs(x), axis=axis))


def _report(absmax, overflow=None):
    bad = jnp.sum(~jnp.isfinite(absmax), dtype=jnp.int32)
    code = jnp.int32(_OVERFLOW_NONE) if overflow is None else overflow.astype(jnp.int32)
    return jnp.stack([bad, jnp.where(bad > 0, _OVERFLOW_NONE, code)])


def _raise_if_bad(report, what: str, desc: str, blocks: int, x=None) -> None:
    report = np.asarray(report).reshape(-1, 2)  # stacked (vmapped) layers: one row each
    bad = int(report[:, 0].sum())
    if bad:
        if x is not None:  # concrete input: count the values themselves (only on this failure path)
            count = f"{int(jnp.sum(~jnp.isfinite(jnp.asarray(x))))} NaN/Inf value(s)"
        else:
            count = f"NaN/Inf values in {bad} of its {blocks * len(report)} block(s)"
        raise ValueError(f"{what} ({desc}) holds {count}; quantizing it would give wrong codes. Find where "
                         "they come from, or replace them (jnp.nan_to_num) before quantizing")
    codes = set(report[:, 1].tolist())
    if _OVERFLOW_DOUBLE_QUANT in codes:
        raise ValueError(f"{what} ({desc}): double quantization overflows float32 (the sum of its block "
                         "absmax is not finite; bitsandbytes gives NaN here). Quantize it with "
                         "double_quant=False")
    if _OVERFLOW_INT8 in codes:
        raise ValueError(f"{what} ({desc}) holds values above {_INT8_MAX_ABSMAX:.4g} in magnitude, where "
                         "format 'int8' overflows float32 on dequantization (code * absmax); use a 4-bit "
                         "format or scale the weight down")


def check_report(report, what: str, x, blocks: int) -> None:
    """Raises ValueError for a bad quantizer report: NaN/Inf input, or statistics that overflow.

    report: the int32 (..., 2) report of a quantizer; what / x name the input in the message;
    blocks: how many absmax blocks x has (the count under a trace is per block).
    Concrete report: checked now (one scalar read; the message counts the NaN/Inf values).
    Traced: checked when the computation runs, by a `jax.debug.callback`, whose ValueError jax
    re-raises as a `JaxRuntimeError` quoting it.
    """
    if isinstance(report, jax.core.Tracer):
        jax.debug.callback(functools.partial(_raise_if_bad, what=what, desc=describe(x), blocks=blocks), report)
    else:
        _raise_if_bad(report, what, describe(x), blocks, None if isinstance(x, jax.core.Tracer) else x)


# ----------------------------------------------------------------------------- torch-order mean

# Lanes of torch's float32 `Vectorized` in its CPU sum kernel on x86.
_TORCH_SUM_LANES = 8


def _seq_sum(x):
    """x[0] + x[1] + ... left to right over axis 0 (XLA does not reassociate float adds)."""
    total = x[0]
    for i in range(1, x.shape[0]):
        total = total + x[i]
    return total


def _ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


def _cascade_sum(rows):
    """torch's `multi_row_sum` over axis 0: sequential chunks of 2^p rows, cascaded in 4 levels."""
    size = rows.shape[0]
    zero = jnp.zeros(rows.shape[1:], rows.dtype)
    if size == 0:
        return zero
    step = 1 << max(4, _ceil_log2(size) // 4)
    levels = []  # what each of levels 1..3 holds at the end
    chunks = size // step
    acc0 = _seq_sum(rows[chunks * step:]) if size % step else zero
    if chunks:
        sums = _seq_sum(jnp.moveaxis(rows[: chunks * step].reshape((chunks, step) + rows.shape[1:]), 1, 0))
        for _ in range(2):  # levels 1 and 2 flush into the next one every `step` entries
            full = sums.shape[0] // step
            levels.append(_seq_sum(sums[full * step:]) if sums.shape[0] % step else zero)
            if not full:
                sums = None
                break
            sums = _seq_sum(jnp.moveaxis(sums[: full * step].reshape((full, step) + rows.shape[1:]), 1, 0))
        if sums is not None:
            levels.append(_seq_sum(sums))  # level 3 accumulates without flushing
    for acc in levels:
        acc0 = acc0 + acc
    return acc0


def torch_sum_f32(x):
    """Sum of a 1-D float32 array in the exact order of torch's single-threaded CPU `sum`.

    x: (n,) float32. Returns a float32 scalar. bitsandbytes' double quantization takes
    `absmax.mean()` in torch; reproducing its rounding needs its summation order: 8-lane
    vectors in 4 interleaved accumulators (cascade-summed), then the tail, then the lanes.
    """
    n = x.shape[0]
    lanes = _TORCH_SUM_LANES
    if n < lanes:  # scalar path: 4 interleaved accumulators
        rows = n // 4
        partial = _cascade_sum(x[: rows * 4].reshape(rows, 4))
        for i in range(rows * 4, n):
            partial = partial.at[0].add(x[i])
        return _seq_sum(partial)
    vectors = n // lanes
    rows = vectors // 4
    v = x[: vectors * lanes].reshape(vectors, lanes)
    partial = _cascade_sum(v[: rows * 4].reshape(rows, 4, lanes))  # (4, lanes)
    first = partial[0]
    for i in range(rows * 4, vectors):
        first = first + v[i]
    for k in range(1, 4):
        first = first + partial[k]
    total = jnp.zeros((), x.dtype)
    for i in range(vectors * lanes, n):
        total = total + x[i]
    for lane in range(lanes):
        total = total + first[lane]
    return total


def torch_mean_f32(x):
    """`torch.mean` of a 1-D float32 array on the CPU (one thread): the ordered sum / n."""
    return true_divide(torch_sum_f32(x), np.float32(x.shape[0]))


# ----------------------------------------------------------------------------- 8-bit dynamic


def true_divide(a, b):
    """a / b with one IEEE rounding, b broadcast to a's shape.

    XLA rewrites a division by a constant or a broadcast scalar into a multiplication by its
    reciprocal, which rounds twice; a barrier around the full-shape divisor hides the broadcast.
    """
    return _divide_behind_barrier(a, jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


@jax.custom_batching.custom_vmap
def _divide_behind_barrier(a, b):
    return a / jax.lax.optimization_barrier(b)


@_divide_behind_barrier.def_vmap
def _divide_behind_barrier_vmap(axis_size, in_batched, a, b):
    # vmap's default rule would leave an unbatched divisor unbatched inside the barrier and
    # broadcast it after, which XLA rewrites into a reciprocal multiply: batch both first
    a, b = (x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape) for x, batched in zip((a, b), in_batched))
    return _divide_behind_barrier(a, b), True




# Above 2^126 the float32 reciprocal 1 / absmax is subnormal: torch keeps it, XLA on the CPU flushes it to
# zero (which turned such blocks into zeros). `_normalise` rebuilds torch's value exactly instead.
_HUGE_ABSMAX = np.float32(2.0**126)


def _mul_limbs(a, b):
    """(hi, lo) with a * b = hi * 2^24 + lo exactly, for uint32 a < 2^25 and b < 2^24 (12-bit limbs)."""
    a1, a0, b1, b0 = a >> 12, a & 0xFFF, b >> 12, b & 0xFFF
    mid = a1 * b0 + a0 * b1
    lo = a0 * b0 + ((mid & 0xFFF) << 12)
    return a1 * b1 + (mid >> 12) + (lo >> 24), lo & 0xFFFFFF


def _reciprocal_ulps(a):
    """round(2^149 / a) for float32 a in [2^126, 2^128): torch's subnormal 1 / a in units of 2^-149.

    a = mant * 2^(e - 150), so 2^149 / a = 2^k / mant with k = 46 (a < 2^127) or 45. The float32
    quotient q is within 1/4 of it, so the rounded value is floor(q) + 1 exactly when
    (2 floor(q) + 1) * mant < 2^(k + 1), an integer comparison done in 12-bit limbs.
    """
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    mant = (bits & 0x7FFFFF) | 0x800000
    low = (bits >> 23) == 253
    c = jnp.floor(jnp.where(low, np.float32(2.0**46), np.float32(2.0**45)) / mant.astype(_F32))
    hi, _ = _mul_limbs(2 * c.astype(jnp.uint32) + 1, mant)  # lo < 2^24 cannot tip a compare with 2^(k+1)
    return c + (hi < jnp.where(low, np.uint32(2**23), np.uint32(2**22))).astype(_F32)


def _normalise(blocks, absmax, signed_zero: bool = False):
    """`blocks * (1 / absmax)` in float32 as torch computes it on the CPU; 0 where absmax is 0.

    blocks: (..., blocksize) float32; absmax: (...,) float32. Blocks with absmax above 2^126 use
    the subnormal reciprocal R * 2^-149 (`_reciprocal_ulps`) as ((x * 2^-64) * R) * 2^-85, every
    step exact or one rounding, so the codes are bitsandbytes'. signed_zero: keep positive values
    that torch leaves subnormal (|x| below ~1e-38 * absmax) positive, which picks fp4's second zero
    code (both decode to 0.0; a product within one rounding of 2^-150 may still pick the other).
    """
    huge = absmax > _HUGE_ABSMAX
    inv = jnp.where(huge, _reciprocal_ulps(jnp.where(huge, absmax, _HUGE_ABSMAX)),
                    jnp.where(absmax > 0, 1.0 / absmax, 0.0))
    pre = jnp.where(huge, np.float32(2.0**-64), np.float32(1))[..., None]
    post = jnp.where(huge, np.float32(2.0**-85), np.float32(1))[..., None]
    scaled = (blocks * pre) * inv[..., None]  # normal blocks: multiplying by 1 changes no bit
    v = scaled * post
    if signed_zero:
        tiny = huge[..., None] & (scaled > np.float32(2.0**-65))
        v = jnp.where(tiny, jnp.maximum(v, np.float32(2.0**-126)), v)
    return v


def _dynamic_index(v):
    """Code index of bitsandbytes' CPU 8-bit quantizer for normalised float32 v: #(thresholds <= v)."""
    thresholds = jnp.asarray(formats.DYNAMIC_THRESHOLDS)
    idx = jnp.zeros(v.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        cand = idx + step
        idx = jnp.where(jnp.take(thresholds, cand - 1) <= v, cand, idx)
    return idx.astype(jnp.uint8)




@functools.partial(jax.jit, static_argnames=("blocksize",))
def _quantize_blockwise(x, blocksize: int):
    blocks, n = blocks_of(x.astype(_F32).reshape(-1), blocksize)
    absmax = abs_max(blocks, axis=1)
    codes = _dynamic_index(_normalise(blocks, absmax))
    codes = jnp.where((absmax > 0)[:, None], codes, jnp.uint8(0))
    return codes.reshape(-1)[:n].reshape(x.shape), absmax


@functools.partial(jax.jit, static_argnames=("blocksize",))
def _quantize_blockwise_reported(x, blocksize: int):
    codes, absmax = _quantize_blockwise(x, blocksize)
    return (codes, absmax), _report(absmax)


def quantize_blockwise(x, *, blocksize: int = 256, check_finite: bool = True):
    """8-bit blockwise "dynamic" quantization, bit-identical to bitsandbytes' `quantize_blockwise`.

    x: float32/bfloat16/float16 array of any shape; blocks of `blocksize` consecutive
    elements of its row-major flattening (the last block may be partial).
    check_finite: raise ValueError for NaN/Inf in x, as `quantize` does (under jit: a
      `jax.debug.callback`); False skips the check.
    Returns (codes, absmax): uint8 codes of x's shape (indices into `formats.DYNAMIC_CODE`)
    and float32 absmax of shape (ceil(x.size / blocksize),).
    Raises TypeError for non-float input or a non-int blocksize, ValueError for an invalid
    blocksize or (checked) NaN/Inf in x.
    """
    check_float_array(x)
    blocksize = _check_8bit_blocksize(blocksize)
    out, report = _quantize_blockwise_reported(jnp.asarray(x), blocksize)
    if check_flag(check_finite, "check_finite"):
        check_report(report, "x", x, out[1].shape[-1])
    return out


@functools.partial(jax.jit, static_argnames=("blocksize", "dtype"))
def _dequantize_blockwise(codes, absmax, blocksize: int, dtype):
    values = jnp.take(jnp.asarray(formats.DYNAMIC_CODE), codes.reshape(-1).astype(jnp.int32))
    blocks, n = blocks_of(values, blocksize)
    out = (blocks * absmax[:, None]).reshape(-1)[:n]
    return out.astype(dtype).reshape(codes.shape)


def dequantize_blockwise(codes, absmax, *, blocksize: int = 256, dtype=jnp.float32):
    """Inverse of `quantize_blockwise`: `code[codes] * absmax` in float32, cast to `dtype`.

    codes: uint8 array; absmax: float32 (ceil(codes.size / blocksize),). Returns codes' shape in
    dtype (a float dtype). Raises TypeError / ValueError naming the argument that does not fit.
    """
    blocksize = _check_8bit_blocksize(blocksize)
    for name, arr in (("codes", codes), ("absmax", absmax)):
        if not (hasattr(arr, "shape") and hasattr(arr, "dtype")):
            raise TypeError(f"dequantize_blockwise: {name} must be an array, got {describe(arr)}")
    expected = -(-math.prod(np.shape(codes)) // blocksize)
    if (np.dtype(codes.dtype) != np.uint8 or np.dtype(absmax.dtype) != np.float32
            or tuple(np.shape(absmax)) != (expected,)):
        raise ValueError(f"dequantize_blockwise needs uint8 codes and float32 absmax of shape ({expected},) "
                         f"for blocksize={blocksize}; got codes {describe(codes)}, absmax {describe(absmax)}")
    return _dequantize_blockwise(codes, absmax, blocksize, float_dtype(dtype))


# ----------------------------------------------------------------------------- quantize




def _quantize_codebook(stored, spec: formats.Format, blocksize: int):
    """Packed codes and float32 absmax of `stored` (row-major blocks)."""
    codebook = spec.codebook
    # fp4 has two zero codes with a decision bound at 0.0 between them: the sign of a value that
    # underflows decides which one bitsandbytes stores
    signed_zero = bool(np.any(codebook.bounds == 0))
    xf = stored.astype(_F32)
    shape = stored.shape
    if is_structured(shape, blocksize):
        blocks = xf.reshape(shape[:-1] + (shape[-1] // blocksize, blocksize))
        absmax = abs_max(blocks, axis=-1)
        # bitsandbytes multiplies by the float32 reciprocal (dividing differs in rare ties)
        v = jnp.clip(_normalise(blocks, absmax, signed_zero), -1.0, 1.0)
        return pack_codes(code_index(v, codebook).reshape(shape), spec.bits), absmax
    flat = xf.reshape(-1)
    n = flat.shape[0]
    full = n - n % blocksize
    values, absmaxes = [], []
    if full:
        blocks = flat[:full].reshape(-1, blocksize)
        absmax = abs_max(blocks, axis=1)
        values.append(jnp.clip(_normalise(blocks, absmax, signed_zero), -1.0, 1.0).reshape(-1))
        absmaxes.append(absmax)
    if n % blocksize:
        tail = flat[full:]
        am = abs_max(tail)
        # the partial block divides (full blocks multiply) and keeps a floor of 1e-38
        v = jnp.clip(true_divide(tail, jnp.where(am > 0, am, 1.0)), -1.0, 1.0)
        if signed_zero:  # tail / am > 2^-150 (torch keeps it subnormal and positive), exactly
            v = jnp.where(tail * np.float32(2.0**64) > am * np.float32(2.0**-86),
                          jnp.maximum(v, np.float32(2.0**-126)), v)
        values.append(v)
        absmaxes.append(jnp.where(am == 0, _PARTIAL_ABSMAX_FLOOR, am)[None])  # a NaN (inf here) stays
    if n % spec.group:
        # bitsandbytes pads the normalised values with 0.0 (nf4: code 7); nf2/nf3 do the same
        values.append(jnp.zeros((-n % spec.group,), _F32))
    idx = code_index(jnp.concatenate(values), codebook)
    return pack_codes(idx, spec.bits)[: -(-n * spec.bits // 8)], jnp.concatenate(absmaxes)




def _quantize_int8(stored, blocksize, transposed: bool):
    """Symmetric int8 codes round(x * 127 / absmax) and float32 absmax."""
    xf = stored.astype(_F32)
    shape = stored.shape
    if blocksize is None:
        axes = int8_absmax_axes(len(shape), transposed)
        absmax = abs_max(xf, axis=axes)
        # bitsandbytes' int8_vectorwise_quant (Linear8bitLt's weights): torch evaluates
        # `127.0 / absmax` as 127 * (1 / absmax), two roundings; 127 / absmax differs at ties
        inv = 1.0 / jnp.where(absmax > 0, absmax, 1.0)
        scale = jnp.expand_dims(jnp.where(absmax > 0, round_product(inv) * 127.0, 0.0), axes)
        return jnp.round(xf * scale).astype(jnp.int8), absmax
    if is_structured(shape, blocksize):
        blocks = xf.reshape(shape[:-1] + (shape[-1] // blocksize, blocksize))
    else:
        blocks, _ = blocks_of(xf.reshape(-1), blocksize)
    absmax = abs_max(blocks, axis=-1)
    scale = jnp.where(absmax > 0, 127.0 / absmax, 0.0)
    codes = jnp.round(blocks * scale[..., None]).astype(jnp.int8)
    if is_structured(shape, blocksize):
        return codes.reshape(shape), absmax
    return codes.reshape(-1)[: math.prod(shape)], absmax


def _nest(absmax):
    """Double quantization of float32 absmax: (uint8 codes of absmax's shape, nested absmax, offset)."""
    flat = absmax.reshape(-1)
    offset = torch_mean_f32(flat)
    codes, nested = _quantize_blockwise(flat - offset, formats.NESTED_BLOCKSIZE)
    return codes.reshape(absmax.shape), nested, offset


@functools.partial(jax.jit, static_argnames=("fmt", "blocksize", "double_quant", "transposed"))
def _quantize(x, fmt: str, blocksize, double_quant: bool, transposed: bool):
    spec = formats.get_format(fmt)
    stored = blockwise.stored(x, transposed)
    overflow = None
    if spec.is_linear:
        packed, absmax = _quantize_int8(stored, blocksize, transposed)
        overflow = jnp.any(~jnp.isfinite(absmax * np.float32(127))) * _OVERFLOW_INT8
    else:
        packed, absmax = _quantize_codebook(stored, spec, blocksize)
    nested = offset = None
    report = _report(absmax, overflow)
    if double_quant:
        absmax, nested, offset = _nest(absmax)
        dq_bad = ~(jnp.isfinite(offset) & jnp.all(jnp.isfinite(nested)))
        report = report.at[1].set(jnp.where(dq_bad & (report[0] == 0), _OVERFLOW_DOUBLE_QUANT, report[1]))
    q = QuantizedArray(packed=packed, absmax=absmax, nested_absmax=nested, offset=offset,
                       format=fmt, blocksize=blocksize, shape=tuple(x.shape),
                       dtype=np.dtype(x.dtype), transposed=transposed)
    return q, report


def quantize_with_report(x, format: str = "nf4", *, blocksize: int | None = 64, double_quant: bool = False,
                         transposed: bool = False):
    """`quantize` without its finiteness check: (QuantizedArray, int32 (2,) report for `check_report`).

    Validates the arguments (TypeError / ValueError naming them); callers that quantize many
    arrays collect the reports and check them together.
    """
    spec = formats.get_format(format)
    check_float_array(x)
    blocksize = check_blocksize(spec, blocksize)
    double_quant = check_flag(double_quant, "double_quant")
    transposed = check_flag(transposed, "transposed")
    if np.ndim(x) == 0:
        raise ValueError(f"x must have rank >= 1 to be quantized, got {describe(x)}; "
                         "keep scalars dense or quantize x.reshape(1)")
    if transposed and np.ndim(x) < 2:
        raise ValueError(f"transposed=True needs an array of rank >= 2, got {describe(x)}")
    return _quantize(jnp.asarray(x), format, blocksize, double_quant, transposed)


def quantize(x, format: str = "nf4", *, blocksize: int | None = 64, double_quant: bool = False,
             transposed: bool = False, check_finite: bool = True) -> QuantizedArray:
    """Blockwise-quantizes an array, bit-identical to bitsandbytes.

    x: float32, bfloat16 or float16 array of rank >= 1.
    format: "nf4" or "fp4" (bitsandbytes `quantize_4bit`), "nf3" or "nf2" (normal-float
      codes at 3 and 2 bits, same blocking and rounding rules; docs/loftq.md), or "int8"
      (symmetric, round(x * 127 / absmax)).
    blocksize: int, 32 ... 4096 consecutive row-major elements per absmax; for "int8", None
      gives one absmax per output channel (the last axis), as LLM.int8 stores weights.
    double_quant: quantize the absmax too (bitsandbytes' `compress_statistics`): 8-bit
      dynamic codes in blocks of 256 around their mean.
    transposed: store x's last two axes swapped, as torch stores an `(in, out)` kernel
      in `(out, in)`; `q.shape` stays x.shape (`q.T` is the untransposed view).
    check_finite: raise ValueError for NaN/Inf in x or statistics that overflow float32 (see
      `check_report`: under jit the check is a `jax.debug.callback`, a host round trip per call;
      False skips it, and then such input quantizes to garbage).
    Returns a QuantizedArray. Raises TypeError for non-float x or a non-int blocksize,
    ValueError for an unknown format, an invalid blocksize, an empty or 0-d x, or (checked) NaN/Inf.
    """
    q, report = quantize_with_report(x, format, blocksize=blocksize, double_quant=double_quant,
                                     transposed=transposed)
    if check_flag(check_finite, "check_finite"):
        check_report(report, "x", x, q.num_blocks)
    return q


# ----------------------------------------------------------------------------- dequantize


def dequantize(q, dtype=None) -> jax.Array:
    """The dense array of a quantized array of any family (`q.dequantize(dtype)`).

    q: quantized array of logical shape S (stacked: leaves with leading axes L).
    dtype: float output dtype (default `q.dtype`). Returns an array of shape S (stacked: L + S).
    A QuantizedArray gives `code[idx] * absmax` in float32 rounded to dtype, bitsandbytes'
    `dequantize_4bit` bit for bit. Raises TypeError for a non-quantized q or a non-float dtype,
    ValueError when q's leaves do not fit its static data.
    """
    check_quantized(q, "dequantize")
    return q.dequantize(dtype)
