"""Bad input to the array and tree quantizers: clear errors naming path, shape and dtype, no silent garbage."""

import re
import warnings

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from helpers import random_weights
from qjax._src.core import quantize as qz

F32_MAX = np.finfo(np.float32).max


def _w(rng, shape=(8, 64), dtype="float32"):
    return jnp.asarray(random_weights(rng, shape, dtype))


def _nonfinite(x, where, value):
    return x.at[where].set(value)


# ----------------------------------------------------------------------------- NaN / Inf everywhere

JIT_ERROR = jax.errors.JaxRuntimeError  # what a ValueError raised in a jax.debug.callback becomes


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_caught_by_quantize_eager_jit_and_vmap(rng, value):
    x = _nonfinite(_w(rng), (3, 5), value)
    msg = r"x \(shape=\(8, 64\) dtype=float32\) holds 1 NaN/Inf value\(s\)"
    with pytest.raises(ValueError, match=msg):
        qjax.quantize(x, "nf4", double_quant=True)
    with pytest.raises(JIT_ERROR, match=r"x \(shape=\(8, 64\) dtype=float32\) holds NaN/Inf values in 1 of its "
                                        r"8 block\(s\)"):  # under jit the count is per block (no extra pass)
        jax.block_until_ready(jax.jit(lambda a: qjax.quantize(a, "nf4", double_quant=True))(x))
    stacked = jnp.stack([_w(rng), x, x])
    per_layer = jax.vmap(lambda a: qjax.quantize(a, "int8", blocksize=None))
    # the callback runs once per layer, so the count is per layer
    layer_msg = r"x \(shape=\(8, 64\) dtype=float32\) holds NaN/Inf values in 1 of its 64 block\(s\)"
    with pytest.raises(ValueError, match=layer_msg):
        per_layer(stacked)  # eager vmap runs the callback right away
    with pytest.raises(JIT_ERROR, match=layer_msg):
        jax.block_until_ready(jax.jit(per_layer)(stacked))


def test_nonfinite_caught_by_quantize_blockwise(rng):
    x = _nonfinite(_w(rng, (4, 100)), (0, 7), np.inf)
    with pytest.raises(ValueError, match=r"x \(shape=\(4, 100\) dtype=float32\) holds 1 NaN/Inf"):
        qjax.quantize_blockwise(x, blocksize=64)
    with pytest.raises(JIT_ERROR, match=r"x \(shape=\(4, 100\) dtype=float32\) holds NaN/Inf values in 1 of its 7"):
        jax.block_until_ready(jax.jit(lambda a: qjax.quantize_blockwise(a, blocksize=64))(x))


def test_nonfinite_under_jit_quantize_params_names_the_path(rng):
    params = {"layer": {"kernel": _nonfinite(_w(rng, (32, 64), "bfloat16"), (1, 2), np.nan)}}
    with pytest.raises(JIT_ERROR, match=r"parameter 'layer/kernel' \(shape=\(32, 64\) dtype=bfloat16\) holds NaN/Inf"):
        jax.block_until_ready(jax.jit(qjax.quantize_params)(params))
    rules = qjax.QuantRules(((("*layer*",), qjax.QuantConfig(format="nf2", double_quant=False)),))
    with pytest.raises(ValueError, match=r"parameter 'layer/kernel' \(shape=\(32, 64\) dtype=bfloat16\) holds 1"):
        qjax.quantize_params(params, rules)


def test_nonfinite_in_quantize_params_sharded_names_the_path(rng):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    good = _w(rng, (32, 64))
    params = {"a": {"kernel": good}, "b": {"kernel": _nonfinite(good, (0, 0), -np.inf).at[3, 3].set(np.nan)}}
    spec = lambda path, leaf: jax.sharding.PartitionSpec()  # noqa: E731
    with pytest.raises(ValueError, match=r"parameter 'b/kernel' \(shape=\(32, 64\) dtype=float32\) holds 2 NaN/Inf"):
        qjax.quantize_params_sharded(params, mesh, spec)
    out = qjax.quantize_params_sharded(params, mesh, spec, check_finite=False)  # the explicit opt-out
    assert qjax.is_quantized(out["b"]["kernel"])
    clean = qjax.quantize_params_sharded({"a": {"kernel": good}}, mesh, spec)
    np.testing.assert_array_equal(clean["a"]["kernel"].packed, qjax.quantize_params({"a": {"kernel": good}})
                                  ["a"]["kernel"].packed)


def test_check_finite_opt_out_and_type(rng):
    x = _nonfinite(_w(rng), (0, 0), np.nan)
    q = jax.jit(lambda a: qjax.quantize(a, "nf4", check_finite=False))(x)
    assert q.shape == (8, 64)
    with pytest.raises(TypeError, match="check_finite='no' must be a bool"):
        qjax.quantize(x, check_finite="no")


# ----------------------------------------------------------------------------- huge absmax

@pytest.mark.parametrize("fmt", ["nf4", "fp4", "nf3", "nf2"])
@pytest.mark.parametrize("shape", [(8, 64), (5, 50)])
def test_huge_blocks_keep_their_values(rng, fmt, shape):
    """Blocks with absmax above 2^126 decoded to 0.0 (XLA flushed the subnormal reciprocal)."""
    x = np.array(_w(rng, shape))
    x.reshape(-1)[[0, 70]] = [np.float32(9e37), np.float32(-3.3e38)]
    y = np.asarray(qjax.dequantize(qjax.quantize(jnp.asarray(x), fmt)))
    assert np.isfinite(y).all()
    assert y.reshape(-1)[0] == np.float32(9e37) and y.reshape(-1)[70] == np.float32(-3.3e38)


def test_huge_blocks_match_bitsandbytes(rng):
    bnb = pytest.importorskip("bnb_ref")
    x = random_weights(rng, (6, 64)) * np.float32(1e4)
    x.reshape(-1)[rng.choice(x.size, 3, replace=False)] = rng.uniform(8.6e37, 1.1e38, 3).astype(np.float32)
    for fmt in ("nf4", "fp4"):
        for dq in (False, True):
            q = qjax.quantize(jnp.asarray(x), fmt, blocksize=32, double_quant=dq)
            packed, state = bnb.quantize_4bit(x, fmt, 32, dq)
            np.testing.assert_array_equal(np.asarray(q.packed).reshape(-1), packed)
            np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
            np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)), bnb.dequantize_4bit(packed, state))
    codes, _ = qjax.quantize_blockwise(jnp.asarray(x), blocksize=64)
    ref, _ = bnb.F.quantize_blockwise(bnb.to_torch(x).reshape(-1), blocksize=64)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), ref.numpy())


def test_subnormal_reciprocal_is_torch_exact(rng):
    bits = rng.integers(np.float32(2.0**126).view(np.int32), np.float32(F32_MAX).view(np.int32), 200_000)
    a = np.concatenate([bits.astype(np.int32).view(np.float32),
                        np.float32([2.0**126, 2.0**127, F32_MAX, np.nextafter(np.float32(2.0**127), 0)])])
    with np.errstate(under="ignore"):
        expected = (np.float32(1) / a).astype(np.float64) * 2.0**149
    np.testing.assert_array_equal(np.asarray(jax.jit(qz._reciprocal_ulps)(a)), expected)


def test_statistics_that_overflow_are_refused(rng):
    x = _w(rng).at[0, 0].set(3e38).at[5, 0].set(3e38)  # the absmax sum overflows float32
    with pytest.raises(ValueError, match=r"x \(shape=\(8, 64\) dtype=float32\): double quantization overflows.*"
                                         r"double_quant=False"):
        qjax.quantize(x, "nf4", double_quant=True)
    assert np.isfinite(np.asarray(qjax.dequantize(qjax.quantize(x, "nf4")))).all()
    big = _w(rng).at[2, 3].set(1e37)  # int8 dequantizes as code * absmax: 127 * 1e37 overflows
    with pytest.raises(ValueError, match=r"x \(shape=\(8, 64\) dtype=float32\) holds values above 2.679e\+36.*'int8'"):
        qjax.quantize(big, "int8", blocksize=None)
    with pytest.raises(JIT_ERROR, match="holds values above"):
        jax.block_until_ready(jax.jit(lambda a: qjax.quantize(a, "int8", blocksize=64))(big))


# ----------------------------------------------------------------------------- argument errors

def test_argument_errors_name_the_argument(rng):
    x = _w(rng)
    with pytest.raises(ValueError, match=r"rank >= 1.*shape=\(\) dtype=float32"):
        qjax.quantize(jnp.float32(1.5))
    with pytest.raises(TypeError, match=r"blocksize=64.0 must be an int"):
        qjax.quantize(x, blocksize=64.0)
    with pytest.raises(TypeError, match=r"blocksize=True must be an int"):
        qjax.quantize(x, "int8", blocksize=True)
    q = qjax.quantize(x, blocksize=np.int64(64))
    assert type(q.blocksize) is int and q.blocksize == 64
    with pytest.raises(TypeError, match="double_quant='yes' must be a bool"):
        qjax.quantize(x, double_quant="yes")
    with pytest.raises(TypeError, match=r"shape=\(8, 64\) dtype=float64.*astype"):
        qjax.quantize(np.asarray(x, np.float64))
    with pytest.raises(TypeError, match=r"x is already quantized \(QuantizedArray\(format='nf4', shape=\(8, 64\)"):
        qjax.quantize(qjax.quantize(x))
    with pytest.raises(TypeError, match=r"parameter 'k' .*jax.ShapeDtypeStruct \(shape=\(8, 64\) dtype=float32\).*"
                                        r"eval_shape"):
        qjax.quantize_params({"k": jax.ShapeDtypeStruct((8, 64), jnp.float32)})
    with pytest.raises(TypeError, match=r"blocksize=256.0 must be an int"):
        qjax.quantize_blockwise(x, blocksize=256.0)
    codes, absmax = qjax.quantize_blockwise(x, blocksize=64)
    with pytest.raises(ValueError, match=r"float32 absmax.*absmax shape=\(8,\) dtype=float16"):
        qjax.dequantize_blockwise(codes, absmax.astype(jnp.float16), blocksize=64)
    with pytest.raises(TypeError, match=r"dtype=<class 'jax.numpy.int8'> must be a float dtype"):
        qjax.dequantize_blockwise(codes, absmax, blocksize=64, dtype=jnp.int8)


def _swapped(q):
    leaves, treedef = jax.tree_util.tree_flatten(q)
    return jax.tree_util.tree_unflatten(treedef, [leaves[1], leaves[0]] + leaves[2:])


def test_dequantize_checks_leaves_against_static_data(rng):
    q = qjax.quantize(_w(rng, (64, 256), "bfloat16"), "nf4", double_quant=True)
    with pytest.raises(ValueError, match=r"dequantize: QuantizedArray\(format='nf4', shape=\(64, 256\), "
                                         r"dtype=bfloat16.*packed has shape=\(64, 4\) dtype=uint8, "
                                         r"expected shape=\(64, 128\)"):
        qjax.dequantize(_swapped(q))
    with pytest.raises(ValueError, match=r"offset is missing"):
        qjax.dequantize(q.replace(offset=None))
    with pytest.raises(ValueError, match=r"parameter 'mlp/kernel': dequantize.*inconsistent leaves"):
        qjax.dequantize_params({"mlp": {"kernel": q.replace(packed=q.packed[:, :-1])}})
    stacked = jax.vmap(lambda a: qjax.quantize(a, "nf4"))(jnp.stack([_w(rng, (8, 64))] * 3))
    assert qjax.dequantize(stacked).shape == (3, 8, 64)
    with pytest.raises(ValueError, match=r"absmax has shape=\(2, 8, 1\).*expected shape=\(3, 8, 1\)"):
        qjax.dequantize(stacked.replace(absmax=stacked.absmax[:2]))
    with pytest.raises(TypeError, match=r"dtype=<class 'jax.numpy.int32'> must be a float dtype"):
        qjax.dequantize(q, jnp.int32)
    with pytest.raises(TypeError, match=r"dequantize needs a QuantizedArray, got shape=\(8, 64\) dtype=float32"):
        qjax.dequantize(_w(rng))


@pytest.mark.parametrize("field, value, error, match", [
    ("target", 123, TypeError, r"QuantConfig.target=123 must be a pattern"),
    ("skip", [1], TypeError, r"QuantConfig.skip entries must be str or re.Pattern, got 1"),
    ("target", "re:((", ValueError, r"QuantConfig.target pattern 're:\(\(' is not a valid regular expression"),
    ("format", 4, TypeError, r"QuantConfig.format=4 must be a str"),
    ("blocksize", 64.0, TypeError, r"blocksize=64.0 must be an int"),
    ("double_quant", "no", TypeError, r"QuantConfig.double_quant='no' must be a bool"),
    ("compute_dtype", jnp.int8, TypeError, r"QuantConfig.compute_dtype=.*int8.* must be a float dtype"),
    ("compute_dtype", "bf16", TypeError, r"QuantConfig.compute_dtype='bf16' must be a float dtype"),
    ("min_size", "big", TypeError, r"QuantConfig.min_size='big' must be an int >= 0"),
    ("llm_int8_threshold", "6", TypeError, r"QuantConfig.llm_int8_threshold='6' must be a number"),
])
def test_quant_config_field_types(field, value, error, match):
    with pytest.raises(error, match=match):
        qjax.QuantConfig(**{field: value})


def test_quant_config_normalises_numpy_values():
    cfg = qjax.QuantConfig(blocksize=np.int64(128), double_quant=np.bool_(False))
    assert type(cfg.blocksize) is int and cfg.double_quant is False


def test_policy_argument_errors(rng):
    params = {"mlp": {"kernel": _w(rng, (32, 64))}}
    with pytest.raises(TypeError, match=r"config must be a QuantConfig or QuantRules.*got str 'nf4'"):
        qjax.quantize_params(params, "nf4")
    with pytest.raises(TypeError, match=r"QuantRules.rules\[0\] patterns=7 must be a pattern"):
        qjax.QuantRules(((7, qjax.QuantConfig()),))
    with pytest.raises(ValueError, match=r"k=True must be an int"):
        qjax.first_blocks(True, qjax.QuantConfig(), qjax.QuantConfig(format="nf2"))


# ----------------------------------------------------------------------------- used as a dense array

DENSE_USE = r"a QuantizedArray \(shape=\(64, 256\) dtype=bfloat16, nf4\) was used as a dense array.*qjax.linen.convert"


def test_quantized_array_used_as_dense_raises_type_error(rng):
    q = qjax.quantize(_w(rng, (64, 256), "bfloat16"))
    x = _w(rng, (2, 64), "bfloat16")
    for use in (lambda: jnp.asarray(q), lambda: jnp.dot(x, q), lambda: x @ q, lambda: np.asarray(q),
                lambda: jnp.einsum("ij,jk->ik", x, q), lambda: q[0]):
        with pytest.raises(TypeError, match=DENSE_USE):
            use()
    with pytest.raises(TypeError, match=r"QuantizedArray'> and was passed to dot_general"):  # jax's wording
        jax.lax.dot_general(x, q, (((1,), (0,)), ((), ())))
    # still a plain pytree of arrays for jit / vmap / tree_map
    assert jax.jit(lambda t: t)(q).shape == (64, 256)
    assert jax.tree_util.tree_map(lambda a: a, q).format == "nf4"


def test_unconverted_nnx_model_names_the_fix(rng):
    model = nnx.Linear(64, 256, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model.kernel.set_value(qjax.quantize(model.kernel.get_value()))
    with pytest.raises(TypeError, match=DENSE_USE):
        model(_w(rng, (2, 64), "bfloat16"))


# ----------------------------------------------------------------------------- patterns that match nothing

def _tree(rng):
    w = _w(rng, (32, 64), "bfloat16")
    return {"mlp": {"up_proj": {"kernel": w}, "down_proj": {"kernel": w.T}}, "embed_tokens": {"embedding": w},
            "norm": {"scale": w[0]}}


def test_target_patterns_that_match_nothing_warn(rng):
    with pytest.warns(UserWarning, match=r"target pattern 'up' matched no parameter path; target pattern 'down' "
                                         r"matched no parameter path\. Paths look like \['embed_tokens/embedding'"):
        out = qjax.quantize_params(_tree(rng), qjax.QuantConfig(target=["up", "down"]))
    assert not any(qjax.is_quantized(v) for v in jax.tree.leaves(out, is_leaf=qjax.is_quantized))
    with pytest.warns(UserWarning, match=r"target pattern '\*scale\*' matched only parameters that stay dense.*"
                                         r"\['norm/scale'\]"):
        qjax.quantize_params(_tree(rng), qjax.QuantConfig(target="*scale*"))
    with pytest.warns(UserWarning, match=r"skip pattern 'lm_head' matched no parameter path"):
        qjax.quantize_params(_tree(rng), qjax.QuantConfig(skip=("*embed*", "lm_head")))
    with pytest.warns(UserWarning, match=r"rules\[0\] pattern 're:\(\?:\^\|/\)layers.*matched no parameter path"):
        qjax.quantize_params(_tree(rng), qjax.first_blocks(2, qjax.QuantConfig(), qjax.QuantConfig(format="nf2")))


def test_default_and_matching_patterns_do_not_warn(rng):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qjax.quantize_params(_tree(rng))  # DEFAULT_SKIP's lm_head / layernorm match nothing here
        out = qjax.quantize_params(_tree(rng), qjax.QuantConfig(target=["*up_proj*", re.compile("down")]))
    assert qjax.is_quantized(out["mlp"]["up_proj"]["kernel"]) and qjax.is_quantized(out["mlp"]["down_proj"]["kernel"])


def test_quantize_params_sharded_warns_once(rng):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    with pytest.warns(UserWarning, match="target pattern 'up' matched no parameter path") as record:
        qjax.quantize_params_sharded(_tree(rng), mesh, lambda path, leaf: jax.sharding.PartitionSpec(),
                                     qjax.QuantConfig(target="up"))
    assert len([r for r in record if "matched no parameter path" in str(r.message)]) == 1


# ----------------------------------------------------------------------------- LLM.int8 arguments

def test_int8_matmul_argument_errors(rng):
    w = qjax.quantize(_w(rng, (64, 32)), "int8", blocksize=None)
    x = _w(rng, (4, 64))
    with pytest.raises(TypeError, match=r"threshold='6' must be a number >= 0, got str"):
        qjax.int8_matmul(x, w, threshold="6")
    with pytest.raises(ValueError, match=r"threshold=nan must be >= 0"):  # NaN silently disabled outliers
        qjax.int8_matmul(x, w, threshold=float("nan"))
    for bad in (-1, 2.5):
        with pytest.raises(TypeError, match=rf"max_outliers={bad} must be None or an int >= 0"):
            qjax.int8_matmul(x, w, max_outliers=bad)
    with pytest.raises(ValueError, match=r"x must have rank >= 1 \(\.\.\., K\), got shape=\(\) dtype=float32"):
        qjax.int8_matmul(jnp.float32(1), w)
    with pytest.raises(ValueError, match=r"int8_matmul w: .*absmax has shape=\(31,\) dtype=float32, expected "
                                         r"shape=\(32,\)"):
        qjax.int8_matmul(x, w.replace(absmax=w.absmax[:-1]))
    with pytest.raises(ValueError, match=r"x \(shape=\(4, 63\) dtype=float32\) does not match w shape=\(64, 32\)"):
        qjax.int8_matmul(x[:, :63], w)
    np.testing.assert_array_equal(qjax.int8_matmul(x, w, max_outliers=np.int64(2)),
                                  qjax.int8_matmul(x, w, max_outliers=2))


def test_invalid_static_data_is_named(rng):
    q = qjax.quantize(_w(rng, (130,)), "nf4")
    with pytest.raises(ValueError, match=r"invalid static data: transposed=True needs rank >= 2, got shape=\(130,\)"):
        qjax.dequantize(q.replace(transposed=True))
    with pytest.raises(ValueError, match=r"invalid static data: blocksize=None \(per channel\) needs format 'int8'"):
        qjax.dequantize(q.replace(blocksize=None))
    with pytest.raises(ValueError, match=r"invalid static data: format='nf5'"):
        qjax.dequantize(q.replace(format="nf5"))


@pytest.mark.parametrize("fmt,blocksize", [("nf4", 256), ("fp4", 4096), ("int8", 4096), ("int8", None)])
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_nan_anywhere_in_a_long_block_is_refused(fmt, blocksize, where):
    """XLA's CPU max reduction drops a NaN at the start of a row of 256+ elements; the absmax must not
    (found by tests/robustness/test_quantize_fuzz.py: int8 at blocksize 4096 quantized [nan])."""
    x = np.zeros((4, 4096), np.float32)
    x[1, 0 if where == "first" else -1] = np.nan
    with pytest.raises(ValueError, match=r"holds 1 NaN/Inf value"):
        qjax.quantize(jnp.asarray(x), fmt, blocksize=blocksize)
    with pytest.raises(ValueError, match=r"holds 1 NaN/Inf value"):
        qjax.quantize_blockwise(jnp.asarray(x[1]), blocksize=4096)
