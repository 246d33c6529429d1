"""qjax.interop.bnb_state_dict / from_bnb_state_dict against bitsandbytes' QuantState."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qjax
from helpers import random_weights


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_state_dict_matches_bitsandbytes(rng, fmt, double_quant, dtype):
    bnb = pytest.importorskip("bnb_ref")
    x = random_weights(rng, (48, 80), dtype)
    packed, state = bnb.F.quantize_4bit(bnb.to_torch(x), blocksize=64, compress_statistics=double_quant,
                                        quant_type=fmt)
    ref = {k: v.numpy() for k, v in state.as_dict(packed=True).items()}
    ours = qjax.interop.bnb_state_dict(qjax.quantize(jnp.asarray(x), fmt, blocksize=64,
                                                     double_quant=double_quant))
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    # and bitsandbytes' own file reads back bit-exactly, in torch (out, in) order as a Flax kernel
    q = qjax.interop.from_bnb_state_dict(packed.numpy(), ref, transposed=True)
    assert q.shape == (80, 48) and q.transposed and str(q.dtype) == dtype
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)), bnb.dequantize_4bit(packed.numpy(), state).T)


@settings(max_examples=20, deadline=None)
@given(shape=st.sampled_from([(16, 64), (9, 33), (130,), (2, 3, 64)]), fmt=st.sampled_from(["nf4", "fp4"]),
       blocksize=st.sampled_from([32, 64, 256]), double_quant=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_state_dict_round_trip_is_exact(shape, fmt, blocksize, double_quant, seed):
    x = random_weights(np.random.default_rng(seed), shape, "bfloat16")
    q = qjax.quantize(jnp.asarray(x), fmt, blocksize=blocksize, double_quant=double_quant)
    back = qjax.interop.from_bnb_state_dict(qjax.interop.bnb_weight(q), qjax.interop.bnb_state_dict(q))
    assert (back.shape, back.dtype, back.format, back.blocksize) == (q.shape, q.dtype, q.format, q.blocksize)
    for a, b in zip([q.packed, q.absmax, q.nested_absmax, q.offset], [back.packed, back.absmax,
                                                                      back.nested_absmax, back.offset]):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_state_dict_raises(rng):
    q = qjax.quantize(jnp.asarray(random_weights(rng, (32, 64), "float32")), "nf4", double_quant=True)
    sd = qjax.interop.bnb_state_dict(q)
    with pytest.raises(ValueError, match=r"packed weight \(shape=\(100,\).*1024 uint8 bytes.*\(32, 64\)"):
        qjax.interop.from_bnb_state_dict(np.zeros(100, np.uint8), sd)
    short = dict(sd, absmax=sd["absmax"][:-1])
    with pytest.raises(ValueError, match=r"absmax \(shape=\(31,\)"):
        qjax.interop.from_bnb_state_dict(qjax.interop.bnb_weight(q), short)
    with pytest.raises(ValueError, match="quant_state.bitsandbytes__"):
        qjax.interop.from_bnb_state_dict(qjax.interop.bnb_weight(q), {"absmax": sd["absmax"]})
    with pytest.raises(ValueError, match="nf4 or fp4"):
        qjax.interop.bnb_state_dict(qjax.quantize(jnp.ones((4, 64)), "int8"))
