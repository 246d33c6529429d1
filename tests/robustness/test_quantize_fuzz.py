"""hypothesis fuzzing of quantize / dequantize / quantize_blockwise: a clear error or a bounded answer."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qjax
from qjax._src.core import formats
from qjax._src.errors import describe

pytestmark = pytest.mark.slow  # every example compiles its own quantizer: ~30 s per test on 2 cores

FUZZ = settings(max_examples=30, deadline=None, derandomize=False, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
DTYPES = FLOAT_DTYPES + ("float64", "int32", "int8", "uint8", "bool", "complex64")
FORMATS = ("nf4", "fp4", "nf3", "nf2", "int8")
F32_MAX = float(np.finfo(np.float32).max)
INT8_MAX_ABSMAX = F32_MAX / 127


def _cast(x64, dtype):
    """float64 values -> dtype (non-float dtypes from finite values; bfloat16 through ml_dtypes)."""
    with np.errstate(all="ignore"):
        if dtype == "bfloat16":
            return x64.astype(np.float32).astype(ml_dtypes.bfloat16)
        if dtype == "bool":
            return x64 > 0
        if dtype == "complex64":
            return (x64 + 1j * x64).astype(np.complex64)
        if dtype in ("int32", "int8", "uint8"):
            return np.clip(np.nan_to_num(x64), -100, 100).astype(dtype)
        return x64.astype(dtype)


@st.composite
def arrays(draw):
    """(array, dtype name): ranks 0-3, empty axes, odd sizes; NaN, Inf, huge, subnormal and -0.0 values."""
    ndim = draw(st.integers(0, 3))
    lead = draw(st.lists(st.integers(0, 4), min_size=max(ndim - 1, 0), max_size=max(ndim - 1, 0)))
    last = [draw(st.sampled_from([0, 1, 2, 3, 5, 31, 32, 33, 64, 65, 128, 200]))] if ndim else []
    shape = tuple(lead + last)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e4, 1e30, 1e37, 3e38, 1e-38]))
    special = st.sampled_from([np.nan, np.inf, -np.inf, 3.4e38, -3.3e38, 9e37, 1e-40, -1e-45, -0.0, 0.0])
    values = hnp.arrays(np.float64, shape, elements=st.floats(-4, 4, width=32))
    x = draw(values) * scale
    if x.size and draw(st.booleans()):  # a few special values at drawn places
        for _ in range(draw(st.integers(1, 3))):
            x.reshape(-1)[draw(st.integers(0, x.size - 1))] = draw(special)
    dtype = draw(st.sampled_from(DTYPES))
    return _cast(x, dtype), dtype


def _block_absmax(x32, fmt, blocksize, transposed):
    """Per element, the float64 absmax of its block (storage order), as quantize forms blocks."""
    a = np.abs(x32.astype(np.float64))
    if blocksize is None:  # per output channel: reduce every axis but the logical last
        axes = tuple(range(a.ndim - 1))
        return np.broadcast_to(a.max(axis=axes, keepdims=True), a.shape)
    stored = np.swapaxes(a, -1, -2) if transposed else a
    flat = stored.reshape(-1)
    pad = -flat.size % blocksize
    blocks = np.pad(flat, (0, pad)).reshape(-1, blocksize)
    per = np.repeat(blocks.max(axis=1), blocksize)[: flat.size].reshape(stored.shape)
    return np.swapaxes(per, -1, -2) if transposed else per


def _half_gap(fmt):
    if fmt == "int8":
        return 0.5 / 127
    code = np.sort(formats.FORMATS[fmt].codebook.code.astype(np.float64))
    return float(np.max(np.diff(code))) / 2


def _expected_errors(x, dtype, fmt, blocksize, double_quant, transposed):
    """What quantize may complain about: (words one of which its message must hold, whether it must raise)."""
    words = set()
    if fmt not in FORMATS:
        words.add("format")
    if isinstance(blocksize, (bool, float, str)) or (blocksize is None and fmt != "int8") or (
            blocksize is not None and not isinstance(blocksize, (bool, float, str))
            and int(blocksize) not in formats.BLOCKSIZES):
        words.add("blocksize")
    if not isinstance(double_quant, bool):
        words.add("double_quant")
    if dtype not in FLOAT_DTYPES or x.size == 0 or x.ndim == 0 or (transposed and x.ndim < 2):
        words.add(describe(x))
    if words:
        return words, True
    x64 = np.asarray(x, np.float64)
    if not np.isfinite(x64).all():
        return {describe(x)}, True
    amax = np.abs(x64).max()
    # at the limits: refused (int8 dequantization or the absmax mean would overflow float32) or fine
    if fmt == "int8" and amax > INT8_MAX_ABSMAX * 0.99:
        return {describe(x)}, False
    if double_quant and amax * math.ceil(x.size / (blocksize or x.shape[-1] or 1)) > 1e38:
        return {describe(x)}, False
    return set(), False


@FUZZ
@given(data=arrays(), fmt=st.sampled_from(FORMATS + ("nf5", None)),
       blocksize=st.sampled_from([None, 32, 64, 128, 4096, 0, 48, -64, 64.0, np.int64(64), "64", True]),
       double_quant=st.sampled_from([False, True, "yes"]), transposed=st.booleans())
def test_quantize_raises_clearly_or_round_trips_within_bound(data, fmt, blocksize, double_quant, transposed):
    x, dtype = data
    words, must_raise = _expected_errors(x, dtype, fmt, blocksize, double_quant, transposed)
    try:
        q = qjax.quantize(x, fmt, blocksize=blocksize, double_quant=double_quant, transposed=transposed)
    except (TypeError, ValueError) as e:
        assert words, f"valid input refused: {e}"
        assert any(w in str(e) for w in words), f"message names none of {words}: {e}"
        return
    assert not must_raise, f"accepted input that should name one of {words}"
    y = np.asarray(qjax.dequantize(q, jnp.float32), np.float64)
    assert y.shape == x.shape and q.dtype == x.dtype
    assert np.isfinite(y).all()
    x64 = np.asarray(x, np.float64)
    absmax = _block_absmax(np.asarray(x, np.float32), fmt, blocksize, transposed)
    # double quantization moves each absmax by up to ~1% of the largest |absmax - mean|
    slack = 0.0
    if double_quant:
        per_block = np.unique(absmax)
        slack = 0.02 * float(np.abs(per_block - per_block.mean()).max()) + 1e-30
    bound = _half_gap(fmt) * (absmax + slack) + slack + 1e-6 * absmax + 1e-37
    assert np.all(np.abs(y - x64) <= bound), float(np.max(np.abs(y - x64) - bound))


@FUZZ
@given(data=arrays(), blocksize=st.sampled_from([64, 256, 4096, 100, 64.0]))
def test_quantize_blockwise_raises_clearly_or_round_trips(data, blocksize):
    x, dtype = data
    try:
        codes, absmax = qjax.quantize_blockwise(x, blocksize=blocksize)
    except (TypeError, ValueError) as e:
        x64 = np.asarray(x).astype(np.complex128)
        bad_x = dtype not in FLOAT_DTYPES or x.size == 0 or not np.isfinite(x64).all()
        assert bad_x or blocksize not in formats.BLOCKSIZES or isinstance(blocksize, float), str(e)
        assert describe(x) in str(e) or "blocksize" in str(e), str(e)
        return
    y = np.asarray(qjax.dequantize_blockwise(codes, absmax, blocksize=blocksize), np.float64)
    assert y.shape == x.shape and np.isfinite(y).all()
    per = _block_absmax(np.asarray(x, np.float32).reshape(-1), "int8", blocksize, False).reshape(x.shape)
    # the dynamic code's widest gap, near +-1, is about 1/64 of the block absmax
    assert np.all(np.abs(y - np.asarray(x, np.float64)) <= per / 100 + 1e-37)


def _valid_q(fmt, shape, blocksize, double_quant, transposed):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return qjax.quantize(x, fmt, blocksize=blocksize, double_quant=double_quant, transposed=transposed)


MUTATIONS = ("swap", "drop_offset", "add_offset", "absmax_f16", "packed_sliced", "one_leaf_stacked", "all_stacked",
             "packed_list", "shape", "format", "blocksize", "transposed")


def _mutate(q, how):
    leaves = {"packed": q.packed, "absmax": q.absmax, "nested_absmax": q.nested_absmax, "offset": q.offset}
    if how == "swap":
        return q.replace(packed=q.absmax, absmax=q.packed)
    if how == "drop_offset":
        return q.replace(offset=None)
    if how == "add_offset":
        return q.replace(offset=jnp.zeros((), jnp.float32))
    if how == "absmax_f16":
        return q.replace(absmax=q.absmax.astype(jnp.float16))
    if how == "packed_sliced":
        return q.replace(packed=q.packed[..., :-1])
    if how == "one_leaf_stacked":
        return q.replace(packed=jnp.stack([q.packed] * 2))
    if how == "all_stacked":
        return q.replace(**{k: None if v is None else jnp.stack([v] * 2) for k, v in leaves.items()})
    if how == "packed_list":
        return q.replace(packed=np.asarray(q.packed).tolist())
    if how == "shape":
        return q.replace(shape=q.shape[:-1] + (q.shape[-1] * 2,))
    if how == "format":
        return q.replace(format={"nf4": "nf2", "nf2": "int8", "int8": "fp4"}.get(q.format, "nf4"))
    if how == "blocksize":
        return q.replace(blocksize=32 if q.blocksize != 32 else 64)
    return q.replace(transposed=not q.transposed, shape=q.shape[:-2] + q.shape[:-3:-1])


@settings(max_examples=40, deadline=None, derandomize=False)
@given(fmt=st.sampled_from(["nf4", "fp4", "nf2", "int8"]), shape=st.sampled_from([(8, 64), (3, 50), (64, 64), (130,)]),
       double_quant=st.booleans(), transposed=st.booleans(), how=st.sampled_from(MUTATIONS))
def test_dequantize_of_mismatched_leaves_raises_or_fits(fmt, shape, double_quant, transposed, how):
    transposed = transposed and len(shape) >= 2
    q = _mutate(_valid_q(fmt, shape, 64, double_quant, transposed), how)
    try:
        y = qjax.dequantize(q)
    except (TypeError, ValueError) as e:
        assert ("inconsistent leaves" in str(e) or "invalid static data" in str(e)) and str(q.shape) in str(e), str(e)
        return
    leaves = jax.tree_util.tree_leaves(q)
    assert all(hasattr(v, "shape") for v in leaves)
    assert y.shape == q.stack_shape + q.shape and y.dtype == q.dtype
