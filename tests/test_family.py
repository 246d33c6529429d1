"""Quantized array families: the toy family of docs/extending.md (its first block), built only with the public
extension API, runs as written and gives the numbers an independent numpy reference gives; the base
class's defaults (validation, stacking, sharding, checkpoints, dispatch) hold for it."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from doc_blocks import python_blocks, run_block
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

import qjax
from qjax._src.errors import CheckpointError
from qjax._src.matmul.base import quantize_kernel

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The namespace of the doc's code block after it ran (it asserts its own numbers too)."""
    blocks = python_blocks(DOC)
    assert len(blocks) == 3 and blocks[0].skip is None
    namespace = {}
    cwd = pathlib.Path.cwd()
    try:
        os.chdir(tmp_path_factory.mktemp("doc"))
        run_block(blocks[0], namespace)
    finally:
        os.chdir(cwd)
    return namespace


def _reference(w: np.ndarray):
    """Symmetric int4 with a float16 scale per 32 values, in numpy: (int codes in [-7, 7], scale f16)."""
    g = w.astype(np.float32).reshape(w.shape[:-1] + (-1, 32))
    scale = (np.max(np.abs(g), axis=-1) / np.float32(7)).astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    codes = np.clip(np.round(g / np.where(s > 0, s, np.float32(1))), -7, 7)
    return codes, scale


@pytest.mark.parametrize("shape", [(64, 96), (128, 32), (3, 64, 160)])
def test_toy_family_matches_numpy_reference(toy, shape):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, shape[:-1] + (1,))).astype(np.float32)
    q = toy["quantize_sym_int4"](w)
    codes, scale = _reference(w)
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    deq = (codes * scale.astype(np.float32)[..., None]).reshape(shape)
    # the same float32 products as the reference: bit for bit
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)), deq)
    # int4 codes round to half a step, the float16 scale; the largest value of a group may clip at 7
    # by at most 7 * scale * 2^-11 (the scale's float16 rounding), which is within the half step
    step = np.repeat(scale.astype(np.float32), 32, axis=-1)
    assert np.all(np.abs(deq - w) <= step / 2 * (1 + 2.0**-10))
    if len(shape) == 2:
        x = rng.standard_normal((5, shape[0])).astype(np.float32)
        y = np.asarray(qjax.qmatmul(x, q, compute_dtype=jnp.float32))
        exact = x.astype(np.float64) @ deq.astype(np.float64)
        # float32 accumulation over K terms: |error| <= K * eps32 * sum_k |x_k w_k| (a loose bound: rtol 1e-5)
        tol = shape[0] * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(deq))
        assert np.all(np.abs(y - exact) <= tol)
        # against the unquantized weight: each product is off by at most |x_k| * step_k / 2
        dense = x.astype(np.float64) @ w.astype(np.float64)
        assert np.all(np.abs(y - dense) <= (np.abs(x) @ (step / 2)) * (1 + 2.0**-9) + tol)


def test_toy_family_is_a_registered_pytree(toy):
    cls = toy["SymInt4"]
    q = toy["q"]
    assert qjax.is_quantized(q) and isinstance(q, qjax.QuantizedBase) and cls.family == "sym_int4"
    assert cls.leaf_names == ("codes", "scale") and cls.static_names == ("shape", "dtype")
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 2 and jax.tree_util.tree_unflatten(treedef, leaves).shape == q.shape
    assert q.ndim == 2 and q.size == 256 * 128 and q.stack_shape == () and q.format_label == "sym_int4"
    assert jax.jit(lambda q: q.dequantize())(q).shape == (256, 128)
    from flax import nnx
    if hasattr(nnx, "is_data"):
        assert nnx.is_data(q)


def test_toy_family_stacks_and_validates(toy):
    w = jax.random.normal(jax.random.key(3), (4, 64, 64))
    q = jax.vmap(toy["quantize_sym_int4"])(w)
    assert q.stack_shape == (4,) and q.shape == (64, 64)
    np.testing.assert_array_equal(qjax.dequantize(q)[2], qjax.dequantize(toy["quantize_sym_int4"](w[2])))
    bad = q.replace(scale=q.scale[..., :1])
    with pytest.raises(ValueError, match=r"dequantize: .*inconsistent leaves: scale has shape=\(4, 64, 1\)"):
        qjax.dequantize(bad)
    with pytest.raises(ValueError, match="invalid static data: the last axis of shape=\\(64, 60\\)"):
        q.replace(shape=(64, 60)).check_leaves()
    with pytest.raises(TypeError, match=r"a SymInt4 \(shape=\(64, 64\) dtype=float32, sym_int4\) was used as a dense"):
        jnp.asarray(q)


def test_toy_family_matmul_dispatch_and_gradient(toy):
    q, x = toy["q"], toy["x"]
    assert q.kernel_problems() and "no Pallas kernel" in q.kernel_problems()[0]
    with pytest.raises(ValueError, match="sym_int4 family has no Pallas kernel"):
        qjax.qmatmul(x, q, backend="pallas", interpret=True)
    with pytest.raises(ValueError, match="no transposed view"):
        q.T
    dx = jax.grad(lambda x: qjax.qmatmul(x, q).sum())(x)
    np.testing.assert_allclose(dx, jnp.broadcast_to(qjax.dequantize(q).sum(axis=1), x.shape), rtol=1e-5, atol=1e-5)
    y = jax.jit(lambda x, q: qjax.qmatmul(x, q))(x, q)
    np.testing.assert_allclose(y, toy["y"], rtol=1e-6, atol=1e-6)


def test_toy_family_shards_replicated_by_default(toy):
    q = toy["q"]
    mesh = AbstractMesh((2,), ("x",), axis_types=(AxisType.Auto,))
    assert qjax.quantized_sharding(q, jax.sharding.NamedSharding(mesh, PartitionSpec())).codes.spec == PartitionSpec()
    with pytest.raises(ValueError, match="does not say how its leaves split.*override layer_leaf_specs"):
        q.leaf_specs(PartitionSpec(None, "x"), mesh)


def test_toy_family_checkpoint_metadata_and_target(toy, tmp_path):
    q = toy["q"]
    qjax.checkpoint.save(tmp_path / "c", {"k": q})
    meta = qjax.checkpoint.read_metadata(tmp_path / "c")["quantized"][0]
    assert meta == {"path": ["k"], "family": "sym_int4", "shape": [256, 128], "dtype": "float32"}
    restored = qjax.checkpoint.restore(tmp_path / "c", jax.eval_shape(lambda: {"k": q}))["k"]
    np.testing.assert_array_equal(restored.codes, q.codes)
    wrong = jax.eval_shape(lambda: {"k": toy["quantize_sym_int4"](jnp.zeros((256, 128), jnp.bfloat16))})
    with pytest.raises(CheckpointError, match=r"k: checkpoint holds \(family, shape, dtype\)=.*float32.*bfloat16"):
        qjax.checkpoint.restore(tmp_path / "c", wrong)


def test_unknown_family_in_metadata_names_the_registered_ones(toy, tmp_path):
    qjax.checkpoint.save(tmp_path / "c", {"k": toy["q"]})
    step = tmp_path / "c" / "_CHECKPOINT_METADATA"
    text = step.read_text()
    assert json.loads(text)["custom_metadata"]["qjax"]["quantized"][0]["family"] == "sym_int4"
    step.write_text(text.replace('"sym_int4"', '"gptq_int"'))  # same size: the file-size check passes
    with pytest.raises(CheckpointError, match=r"'k': no quantized array family 'gptq_int'.*'bitsandbytes'.*'sym_int4'"):
        qjax.checkpoint.restore(tmp_path / "c")


def test_quantized_array_metadata_keeps_the_v0_format():
    q = qjax.quantize(jnp.ones((64, 64)), "nf4", double_quant=True)
    assert q.family == "bitsandbytes" and qjax.QuantizedArray.leaf_names == ("packed", "absmax", "nested_absmax",
                                                                            "offset")
    assert q.metadata() == {"format": "nf4", "blocksize": 64, "shape": [64, 64], "dtype": "float32",
                            "transposed": False, "double_quant": True}


def test_register_family_refuses_a_taken_name_and_bad_classes(toy):
    class Other(qjax.QuantizedBase):
        codes: jax.Array
        shape: tuple = qjax.static_field()
        dtype: object = qjax.static_field()

    with pytest.raises(ValueError, match="family name 'sym_int4' is taken"):
        qjax.register_family("sym_int4")(Other)
    with pytest.raises(TypeError, match="subclasses of qjax.QuantizedBase"):
        qjax.register_family("plain")(object)

    class NoShape(qjax.QuantizedBase):
        codes: jax.Array

    with pytest.raises(TypeError, match=r"must declare \['shape', 'dtype'\]"):
        qjax.register_family("no_shape")(NoShape)


def test_a_config_like_object_quantizes_kernels_of_the_family(toy):
    config = toy["SymInt4Config"]()
    kernel = jax.random.normal(jax.random.key(5), (3, 8, 4, 64))  # 3 stacked layers, in (8, 4), out (64,)
    q = quantize_kernel(kernel, 2, config, lead=1)
    assert isinstance(q, toy["SymInt4"]) and q.shape == (32, 64) and q.stack_shape == (3,)
    one = toy["quantize_sym_int4"](kernel[1].reshape(32, 64))
    np.testing.assert_array_equal(q.codes[1], one.codes)
