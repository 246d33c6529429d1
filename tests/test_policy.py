"""QuantConfig patterns, quantize_params / dequantize_params, memory_footprint."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from helpers import random_weights


def _params(rng):
    w = lambda *s: jnp.asarray(random_weights(rng, s, "bfloat16"))  # noqa: E731
    return {"params": {
        "embed_tokens": {"embedding": w(64, 32)},
        "layers_0": {"self_attn": {"q_proj": {"kernel": w(32, 64)}, "o_proj": {"kernel": w(64, 32)}},
                     "mlp": {"up_proj": {"kernel": w(32, 128), "bias": w(128)}},
                     "input_layernorm": {"scale": w(32)},
                     "step": jnp.arange(4, dtype=jnp.int32).reshape(2, 2)},
        "lm_head": {"kernel": w(32, 64)},
    }}


def test_default_config_quantizes_kernels_only(rng):
    params = _params(rng)
    qp = qjax.quantize_params(params, qjax.QuantConfig())
    flat = {qjax._src.paths.path_str(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(qp, is_leaf=qjax.is_quantized)[0]}
    quantized = sorted(k for k, v in flat.items() if qjax.is_quantized(v))
    assert quantized == ["params/layers_0/mlp/up_proj/kernel", "params/layers_0/self_attn/o_proj/kernel",
                         "params/layers_0/self_attn/q_proj/kernel"]
    assert flat["params/layers_0/mlp/up_proj/kernel"].double_quant
    assert flat["params/embed_tokens/embedding"] is params["params"]["embed_tokens"]["embedding"]
    back = qjax.dequantize_params(qp)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype
    k = params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(back["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"],
                                  qjax.dequantize(qjax.quantize(k, "nf4", blocksize=64, double_quant=True)))


@pytest.mark.parametrize("target", ["*self_attn*", "re:self_attn/(q|o)_proj", re.compile(r"attn")])
def test_target_patterns_glob_and_regex(rng, target):
    qp = qjax.quantize_params(_params(rng), qjax.QuantConfig(target=target))
    layer = qp["params"]["layers_0"]
    assert qjax.is_quantized(layer["self_attn"]["q_proj"]["kernel"])
    assert qjax.is_quantized(layer["self_attn"]["o_proj"]["kernel"])
    assert not qjax.is_quantized(layer["mlp"]["up_proj"]["kernel"])


def test_skip_and_format_options(rng):
    cfg = qjax.QuantConfig(format="int8", blocksize=None, double_quant=False, skip=("*mlp*", "*embed*"))
    qp = qjax.quantize_params(_params(rng), cfg)
    assert qjax.is_quantized(qp["params"]["lm_head"]["kernel"])  # no longer skipped
    assert not qjax.is_quantized(qp["params"]["layers_0"]["mlp"]["up_proj"]["kernel"])
    assert qp["params"]["lm_head"]["kernel"].format == "int8"


def test_under_jit(rng):
    params = _params(rng)
    eager = qjax.quantize_params(params)
    jitted = jax.jit(qjax.quantize_params)(params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = jax.jit(qjax.dequantize_params, static_argnums=1)(jitted, jnp.float32)
    assert back["params"]["lm_head"]["kernel"].dtype == jnp.bfloat16  # dense leaves untouched
    assert back["params"]["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.float32


def test_bad_trees_name_the_path(rng):
    params = _params(rng)
    qp = qjax.quantize_params(params)
    with pytest.raises(ValueError, match=r"params/layers_0/mlp/up_proj/kernel.*already quantized"):
        qjax.quantize_params(qp)
    bad = jax.tree.map(lambda x: x, params)
    bad["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"] = (
        params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"].at[1, 2].set(jnp.nan))
    with pytest.raises(ValueError, match=r"'params/layers_0/self_attn/q_proj/kernel' \(shape=\(32, 64\) "
                                         r"dtype=bfloat16\).*NaN"):
        qjax.quantize_params(bad)
    with pytest.raises(TypeError, match=r"params/layers_0/step.*int32"):
        qjax.quantize_params(params, qjax.QuantConfig(target="*step*"))
    with pytest.raises(ValueError, match="blocksize=48"):
        qjax.QuantConfig(blocksize=48)
    with pytest.raises(ValueError, match="format 'nf9'"):
        qjax.QuantConfig(format="nf9")


def test_memory_footprint_report(rng):
    qp = qjax.quantize_params(_params(rng))
    report = qjax.memory_footprint(qp)
    by_kind = report.bytes_by_kind()
    assert report.total_bytes == sum(by_kind.values())
    q = qp["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    row = next(r for r in report.leaves if r.path.endswith("up_proj/kernel"))
    assert row.nbytes == q.nbytes == q.packed.nbytes + q.absmax.nbytes + q.nested_absmax.nbytes + 4
    text = str(report)
    assert "quantized:nf4" in text and "params/lm_head/kernel" in text and "bits/param" in text
    # abstract trees (eval_shape) give the same numbers without materializing anything
    abstract = qjax.memory_footprint(jax.eval_shape(qjax.quantize_params, _params(rng)))
    assert abstract.total_bytes == report.total_bytes


def test_large_kernel_costs_4127_bits():
    shapes = jax.eval_shape(lambda: qjax.quantize(jnp.ones((8192, 8192), jnp.bfloat16), "nf4",
                                                  blocksize=64, double_quant=True))
    report = qjax.memory_footprint({"w": shapes})
    assert abs(report.quantized_bits_per_param - 4.127) < 0.001


def test_stacked_layers_footprint_and_dequantize(rng):
    """vmap-quantized stacks (scanned models) count every layer and dequantize per layer."""
    w = jnp.asarray(random_weights(rng, (3, 32, 64), "bfloat16"))
    stacked = jax.vmap(lambda a: qjax.quantize(a, "nf4", blocksize=64, double_quant=True))(w)
    assert stacked.shape == (32, 64) and stacked.stack_shape == (3,)
    dense = qjax.dequantize(stacked)
    assert dense.shape == (3, 32, 64)
    np.testing.assert_array_equal(dense[2], qjax.dequantize(qjax.quantize(w[2], "nf4", blocksize=64,
                                                                         double_quant=True)))
    row = qjax.memory_footprint({"w": stacked}).leaves[0]
    assert row.params == 3 * 32 * 64 and row.shape == (3, 32, 64) and row.nbytes == stacked.nbytes
    back = qjax.dequantize_params({"w": stacked})
    assert back["w"].shape == (3, 32, 64)
