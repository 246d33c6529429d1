"""qjax.quantize / dequantize against live bitsandbytes on the CPU, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from helpers import random_weights

bnb = pytest.importorskip("bnb_ref")

SHAPES = [(64, 128), (33, 17), (7,), (3, 5, 128), (1000, 257)]


def _check_4bit(x, fmt, blocksize, double_quant, jit):
    fn = (jax.jit(qjax.quantize, static_argnums=1, static_argnames=("blocksize", "double_quant"))
          if jit else qjax.quantize)
    q = fn(jnp.asarray(x), fmt, blocksize=blocksize, double_quant=double_quant)
    packed, state = bnb.quantize_4bit(x, fmt, blocksize, double_quant)
    np.testing.assert_array_equal(np.asarray(q.packed).reshape(-1), packed)
    if double_quant:
        np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())
        assert np.float32(q.offset) == state.offset.numpy()
    else:
        np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
    # dequantize: bit-identical (the issue allows one ulp; we reach zero)
    ours = np.asarray(qjax.dequantize(q))
    ref = bnb.dequantize_4bit(packed, state)
    assert ours.dtype == ref.dtype and ours.shape == x.shape
    np.testing.assert_array_equal(ours.view(np.uint16 if ours.itemsize == 2 else np.uint32),
                                  ref.view(np.uint16 if ref.itemsize == 2 else np.uint32))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_matches_bitsandbytes(rng, fmt, dtype, shape, double_quant):
    blocksize = int(rng.choice([32, 64, 128, 256]))
    x = random_weights(rng, shape, dtype, dist=str(rng.choice(["normal", "heavy"])))
    _check_4bit(x, fmt, blocksize, double_quant, jit=bool(rng.integers(2)))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_4bit_every_blocksize(rng, blocksize):
    x = random_weights(rng, (96, 130), "bfloat16", dist="heavy")
    _check_4bit(x, "nf4", blocksize, double_quant=True, jit=False)
    _check_4bit(x, "fp4", blocksize, double_quant=False, jit=True)


def test_4bit_zero_blocks_and_partial_tail(rng):
    x = random_weights(rng, (5, 70), "float32")
    x[0, :64] = 0.0   # a zero full block
    x[4, -30:] = 0.0  # the partial last block (350 % 64 = 30) is all zeros
    for fmt in ("nf4", "fp4"):
        _check_4bit(x, fmt, 64, double_quant=True, jit=False)


def test_double_quant_offset_many_blocks(rng):
    """The offset is torch's float32 mean over many absmax values: summation order matters."""
    x = random_weights(rng, (1024, 1088), "float32", dist="heavy")  # 17408 blocks
    _check_4bit(x, "nf4", 64, double_quant=True, jit=True)


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("shape", [(300,), (17, 33), (4, 256)])
def test_blockwise_8bit_matches_bitsandbytes(rng, blocksize, shape):
    x = random_weights(rng, shape, "float32", dist="heavy")
    codes, absmax = qjax.quantize_blockwise(jnp.asarray(x), blocksize=blocksize)
    ref_codes, ref_state = bnb.F.quantize_blockwise(bnb.torch.from_numpy(x), blocksize=blocksize)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes.numpy())
    np.testing.assert_array_equal(np.asarray(absmax), ref_state.absmax.numpy())
    ours = qjax.dequantize_blockwise(codes, absmax, blocksize=blocksize)
    ref = bnb.F.dequantize_blockwise(ref_codes, ref_state).numpy()
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_int8_blockwise_and_per_channel(rng):
    x = random_weights(rng, (48, 40), "float32", dist="heavy")
    q = qjax.quantize(jnp.asarray(x), "int8", blocksize=64)
    flat = x.reshape(-1)
    pad = np.pad(flat, (0, -flat.size % 64)).reshape(-1, 64)
    absmax = np.abs(pad).max(1)
    codes = np.round(pad * (np.float32(127) / absmax)[:, None]).astype(np.int8).reshape(-1)[: flat.size]
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    np.testing.assert_array_equal(np.asarray(q.packed).reshape(-1), codes)
    qc = qjax.quantize(jnp.asarray(x), "int8", blocksize=None)
    col = np.abs(x).max(0)
    np.testing.assert_array_equal(np.asarray(qc.absmax), col)
    # per-channel codes follow bitsandbytes' int8_vectorwise_quant: x * (127 * (1 / absmax)) in float32
    # (tests/test_int8.py compares them with Linear8bitLt's Int8Params)
    scale = np.float32(127) * (np.float32(1) / col)
    np.testing.assert_array_equal(np.asarray(qc.packed), np.round(x * scale).astype(np.int8))
    # bitsandbytes' int8 dequant: (codes * absmax) * float32(1/127)
    ref = (codes.astype(np.float32) * np.repeat(absmax, 64)[: flat.size]) * np.float32(1 / 127)
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)).reshape(-1), ref)
