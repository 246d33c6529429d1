"""quantize / dequantize properties, layouts, jit, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qjax
from qjax._src.core import formats
from qjax._src.core.blockwise import absmax_f32
from helpers import random_weights

FORMATS_4BIT = ["nf4", "fp4"]


def _max_half_step(code):
    """Largest half-gap between neighbouring code values: the worst rounding error for |v| <= 1."""
    c = np.sort(np.asarray(code, np.float64))
    return float(np.max(np.diff(c)) / 2)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), fmt=st.sampled_from(FORMATS_4BIT + ["int8"]),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_round_trip_error_bounded(rows, cols, fmt, blocksize, double_quant, seed):
    """|x - dequantize(quantize(x))| <= half the widest code gap times the block's absmax."""
    rng = np.random.default_rng(seed)
    x = random_weights(rng, (rows, cols), "float32", dist="heavy")
    q = qjax.quantize(jnp.asarray(x), fmt, blocksize=blocksize, double_quant=double_quant)
    y = np.asarray(qjax.dequantize(q))
    flat = np.pad(x.reshape(-1), (0, -x.size % blocksize)).reshape(-1, blocksize)
    absmax = np.repeat(np.abs(flat).max(1), blocksize)[: x.size].reshape(x.shape)
    half = 0.5 / 127 if fmt == "int8" else _max_half_step(formats.get_format(fmt).codebook.code)
    # double quant stores absmax' instead of absmax: |code| <= 1 adds at most |absmax' - absmax|
    decoded = np.asarray(absmax_f32(q)).reshape(-1)
    drift = np.repeat(np.abs(decoded - np.abs(flat).max(1)), blocksize)[: x.size].reshape(x.shape)
    if double_quant:  # and absmax' itself is within half an 8-bit dynamic step (~1/128) of absmax
        assert np.all(drift <= np.max(np.abs(np.abs(flat).max(1) - np.mean(np.abs(flat).max(1)))) / 100)
    assert np.all(np.abs(y - x) <= absmax * half * (1 + 1e-6) + drift * (1 + 1e-6) + 1e-7)


@pytest.mark.parametrize("fmt", FORMATS_4BIT + ["int8"])
def test_structured_layout_keeps_rows(rng, fmt):
    x = random_weights(rng, (24, 128), "bfloat16")
    q = qjax.quantize(jnp.asarray(x), fmt, blocksize=64)
    per_byte = 1 if fmt == "int8" else 2
    assert q.structured and q.packed.shape == (24, 128 // per_byte) and q.absmax.shape == (24, 2)
    # the first rows of the codes quantize the first rows of x alone: the layout shards by rows
    head = qjax.quantize(jnp.asarray(x[:8]), fmt, blocksize=64)
    np.testing.assert_array_equal(np.asarray(q.packed[:8]), np.asarray(head.packed))
    assert q.dtype == jnp.bfloat16 and q.shape == (24, 128) and q.format == fmt and q.blocksize == 64


def test_flat_layout_when_blocks_cross_rows(rng):
    q = qjax.quantize(jnp.asarray(random_weights(rng, (10, 50), "float32")), "nf4", blocksize=64)
    assert not q.structured and q.packed.shape == (250,) and q.absmax.shape == (8,)


@pytest.mark.parametrize("fmt", FORMATS_4BIT + ["int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_transposed_storage_is_torch_layout(rng, fmt, double_quant):
    """transposed=True stores x.T's codes (torch (out, in)) and dequantizes back to x's shape."""
    x = jnp.asarray(random_weights(rng, (96, 40), "float32"))
    qt = qjax.quantize(x, fmt, blocksize=32, double_quant=double_quant, transposed=True)
    ref = qjax.quantize(x.T, fmt, blocksize=32, double_quant=double_quant)
    np.testing.assert_array_equal(np.asarray(qt.packed), np.asarray(ref.packed))
    assert qt.shape == (96, 40) and qt.T.shape == (40, 96) and not qt.T.transposed
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(qt)), np.asarray(qjax.dequantize(ref)).T)
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(qt.T)), np.asarray(qjax.dequantize(ref)))


def test_int8_per_channel_transposed(rng):
    x = jnp.asarray(random_weights(rng, (33, 20), "float32", dist="heavy"))
    q = qjax.quantize(x, "int8", blocksize=None)
    qt = qjax.quantize(x, "int8", blocksize=None, transposed=True)
    np.testing.assert_array_equal(np.asarray(q.absmax), np.asarray(qt.absmax))
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)), np.asarray(qjax.dequantize(qt)))
    assert float(jnp.max(jnp.abs(qjax.dequantize(q) - x) / jnp.max(jnp.abs(x), 0, keepdims=True))) <= 0.5 / 127 + 1e-6


@pytest.mark.parametrize("fmt", FORMATS_4BIT + ["int8"])
def test_jit_vmap_tree_map_device_put(rng, fmt):
    x = jnp.asarray(random_weights(rng, (4, 32, 64), "float32"))
    eager = qjax.quantize(x, fmt, blocksize=64, double_quant=True)
    jitted = jax.jit(lambda a: qjax.quantize(a, fmt, blocksize=64, double_quant=True))(x)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jax.jit(qjax.dequantize)(eager)), np.asarray(qjax.dequantize(eager)))
    # vmap over stacked layers (scanned models) gives the per-layer quantization
    stacked = jax.vmap(lambda a: qjax.quantize(a, fmt, blocksize=64))(x)
    one = qjax.quantize(x[1], fmt, blocksize=64)
    np.testing.assert_array_equal(np.asarray(stacked.packed[1]), np.asarray(one.packed))
    moved = jax.device_put(eager, jax.devices()[0])
    assert isinstance(moved, qjax.QuantizedArray) and moved.shape == eager.shape
    doubled = jax.tree.map(lambda a: a, eager)
    assert isinstance(doubled, qjax.QuantizedArray) and doubled.format == fmt


@pytest.mark.parametrize("shape", [(2, 4, 64, 720), (8, 33, 17)])  # structured; flat with a partial block
def test_vmap_is_bit_identical_per_layer(rng, shape):
    """jax.vmap(quantize) (double quant: a float32 mean, a partial block's division) gives each layer
    exactly what quantizing it alone gives, also nested over two stacked axes."""
    x = jnp.asarray(random_weights(rng, shape, "float32"))
    fn = lambda a: qjax.quantize(a, "nf4", blocksize=64, double_quant=True)  # noqa: E731
    for _ in shape[:-2]:
        fn = jax.vmap(fn)
    stacked = fn(x)
    lead = shape[:-2]
    for idx in np.ndindex(*lead):
        one = qjax.quantize(x[idx], "nf4", blocksize=64, double_quant=True)
        for name in ("packed", "absmax", "nested_absmax", "offset"):
            np.testing.assert_array_equal(np.asarray(getattr(stacked, name)[idx]), np.asarray(getattr(one, name)),
                                          err_msg=f"layer {idx} {name}")


def test_nbytes_and_bits_per_param(rng):
    x = jnp.asarray(random_weights(rng, (1024, 1024), "bfloat16"))
    q = qjax.quantize(x, "nf4", blocksize=64, double_quant=True)
    n = 1024 * 1024
    expected = n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4
    assert q.nbytes == expected
    assert abs(8 * q.nbytes / n - 4.127) < 0.001


def test_blockwise_8bit_round_trip(rng):
    x = jnp.asarray(random_weights(rng, (1000,), "float32", dist="heavy"))
    codes, absmax = jax.jit(lambda a: qjax.quantize_blockwise(a, blocksize=256))(x)
    assert codes.dtype == jnp.uint8 and absmax.shape == (4,)
    y = qjax.dequantize_blockwise(codes, absmax, blocksize=256)
    # the dynamic code's widest gap is near +-1: ~1/128 relative to the block absmax
    err = np.abs(np.asarray(y - x)) / np.repeat(np.asarray(absmax), 256)[:1000]
    assert err.max() <= 0.0079


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(rng):
    x = jnp.asarray(random_weights(rng, (8, 64), "float32"))
    with pytest.raises(ValueError, match="format 'nf5'.*nf4"):
        qjax.quantize(x, "nf5")
    with pytest.raises(ValueError, match="blocksize=100"):
        qjax.quantize(x, "nf4", blocksize=100)
    with pytest.raises(ValueError, match="blocksize=None"):
        qjax.quantize(x, "nf4", blocksize=None)
    with pytest.raises(TypeError, match=r"shape=\(8, 64\) dtype=int32"):
        qjax.quantize(x.astype(jnp.int32), "nf4")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        qjax.quantize(x.at[3, 5].set(jnp.nan), "nf4")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        qjax.quantize(x.at[0, 0].set(jnp.inf), "int8", blocksize=None)
    with pytest.raises(ValueError, match="empty"):
        qjax.quantize(jnp.zeros((0, 4)), "nf4")
    with pytest.raises(TypeError, match="QuantizedArray"):
        qjax.dequantize(x)
    with pytest.raises(ValueError, match="transposed=True needs"):
        qjax.quantize(x[0], "nf4", transposed=True)
