"""qjax.qmatmul (xla backend): against x @ dequantize(q) in float32, gradients, errors.

Tolerance. Both sides multiply the same weight (qmatmul rounds `code * absmax` to the
compute dtype exactly as `dequantize` does), so they differ only in float32 summation order
and in the final rounding to the compute dtype. Elementwise:
    |y - ref| <= (eps(dtype) + K * 2^-23) * (|x| @ |W|)
(one rounding of each result to dtype, plus the classic K * u bound on reordering a float32
sum, u = 2^-24, doubled because the reference is itself rounded).
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src.ad_checkpoint import saved_residuals

import qjax
from qjax._src.core import blockwise_matmul as qmatmul_module
from helpers import DTYPES, random_weights

# (format, blocksize, double_quant)
FORMATS = [("nf4", 64, False), ("nf4", 64, True), ("fp4", 32, False), ("fp4", 128, True),
           ("int8", 64, False), ("int8", None, False)]
# (K, N): structured both ways, flat in one or both orientations, non-power-of-2, tiny
SHAPES = [(128, 192), (96, 128), (33, 17), (100, 70), (64, 1)]


def _dense(x, q, dtype):
    w = np.asarray(qjax.dequantize(q, dtype)).astype(np.float32)
    return np.asarray(x, np.float32), w


def assert_matmul_close(y, x, q, dtype):
    xf, w = _dense(x, q, dtype)
    ref = np.matmul(xf.astype(np.float64), w.astype(np.float64))
    bound = (float(jnp.finfo(dtype).eps) + q.shape[0] * 2.0**-23) * np.matmul(np.abs(xf), np.abs(w)) + 1e-30
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape
    excess = np.abs(y - ref) - bound
    assert np.all(excess <= 0), f"max |y - ref| exceeds its bound by {excess.max():.3g}"


def _quantize(rng, shape, fmt, blocksize, double_quant, transposed, dtype="float32"):
    w = random_weights(rng, shape, dtype)
    return qjax.quantize(jnp.asarray(w), fmt, blocksize=blocksize, double_quant=double_quant,
                         transposed=transposed)


@pytest.mark.parametrize("fmt,blocksize,double_quant", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_xla_matches_dense_reference(rng, fmt, blocksize, double_quant, shape, transposed):
    q = _quantize(rng, shape, fmt, blocksize, double_quant, transposed)
    x = jnp.asarray(rng.standard_normal((5, shape[0])), jnp.float32)
    assert_matmul_close(qjax.qmatmul(x, q, backend="xla"), x, q, jnp.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("lead", [(), (1,), (2, 3)])
def test_dtypes_batch_dims_and_jit(rng, dtype, jit, lead):
    q = _quantize(rng, (96, 64), "nf4", 64, True, True, dtype)
    x = jnp.asarray(rng.standard_normal(lead + (96,)), DTYPES[dtype])
    fn = jax.jit(qjax.qmatmul, static_argnames=("backend",)) if jit else qjax.qmatmul
    y = fn(x, q, backend="xla")
    assert y.shape == lead + (64,) and y.dtype == x.dtype
    assert_matmul_close(y.reshape(-1, 64), x.reshape(-1, 96), q, DTYPES[dtype])


def test_compute_dtype_and_auto_backend(rng):
    q = _quantize(rng, (64, 128), "fp4", 64, False, False)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    y = qjax.qmatmul(x, q, compute_dtype=jnp.bfloat16)  # auto: xla on the CPU
    assert y.dtype == jnp.bfloat16
    assert_matmul_close(y, x.astype(jnp.bfloat16), q, jnp.bfloat16)


def test_single_token_and_vmap(rng):
    q = _quantize(rng, (128, 96), "nf4", 64, False, True)
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.float32)
    one = qjax.qmatmul(x[:1], q)
    assert one.shape == (1, 96)
    mapped = jax.vmap(lambda row: qjax.qmatmul(row, q))(x)
    assert mapped.shape == (4, 96)
    assert_matmul_close(mapped, x, q, jnp.float32)
    np.testing.assert_allclose(np.asarray(one), np.asarray(mapped[:1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt,blocksize,double_quant", FORMATS)
@pytest.mark.parametrize("transposed", [False, True])
def test_grad_matches_dense(rng, fmt, blocksize, double_quant, transposed):
    q = _quantize(rng, (96, 64), fmt, blocksize, double_quant, transposed)
    x = jnp.asarray(rng.standard_normal((2, 3, 96)), jnp.float32)
    w = qjax.dequantize(q)

    g = jax.grad(lambda x: jnp.sum(jnp.sin(qjax.qmatmul(x, q, backend="xla"))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.matmul(x, w, precision="highest"))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(g_ref).max()))


def _jaxpr_text(fn, *args):
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("fmt,blocksize,double_quant", FORMATS)
@pytest.mark.parametrize("shape", [(128, 192), (96, 128), (128, 97), (100, 70)])
@pytest.mark.parametrize("transposed", [False, True])
def test_chunked_loop_matches_dense_reference(rng, monkeypatch, fmt, blocksize, double_quant, shape, transposed):
    """A budget of 3 storage rows a step: many loop steps (and a tail: 128, 97 rows), forward and backward."""
    q = _quantize(rng, shape, fmt, blocksize, double_quant, transposed)
    rows, cols = q.storage_shape
    monkeypatch.setattr(qmatmul_module, "CPU_CHUNK_BYTES", 3 * cols * 4)
    x = jnp.asarray(rng.standard_normal((2, 3, shape[0])), jnp.float32)
    fn = lambda x: qjax.qmatmul(x, q, backend="xla")  # noqa: E731
    # structured layouts loop (scan when contracting the row axis, map otherwise); flat ones take one step
    assert ("scan[" in _jaxpr_text(fn, x)) == q.structured
    assert_matmul_close(jax.jit(fn)(x).reshape(6, -1), x.reshape(6, -1), q, jnp.float32)
    w = qjax.dequantize(q)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(fn(x))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.matmul(x, w, precision="highest"))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(g_ref).max()))


def test_chunk_rows_follow_the_budget(rng):
    """A weight decodes in steps of at most CPU_CHUNK_BYTES (whole storage rows), a small one in one step."""
    big = _quantize(rng, (1024, 4096), "nf4", 64, True, True)  # storage (4096, 1024)
    rows = qmatmul_module._chunk_rows(big, jnp.float32, qmatmul_module.CPU_CHUNK_BYTES)
    assert rows < 4096 and rows * 1024 * 4 <= qmatmul_module.CPU_CHUNK_BYTES
    assert qmatmul_module._chunk_rows(big, jnp.bfloat16, qmatmul_module.CPU_CHUNK_BYTES) == 2 * rows
    small = _quantize(rng, (96, 64), "nf4", 64, False, False)
    assert qmatmul_module._chunk_rows(small, jnp.float32, qmatmul_module.CPU_CHUNK_BYTES) == 96


def test_grad_dtype_follows_x(rng):
    q = _quantize(rng, (64, 64), "nf4", 64, False, False)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(qjax.qmatmul(x, q, compute_dtype=jnp.bfloat16).astype(jnp.float32)))(x)
    assert g.dtype == jnp.float32


def test_backward_keeps_no_dense_weight(rng):
    q = _quantize(rng, (128, 256), "nf4", 64, True, True)
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.float32)
    for value, _ in saved_residuals(lambda x: qjax.qmatmul(x, q), x):
        assert not (jnp.issubdtype(value.dtype, jnp.floating) and value.size >= 128 * 256), value


def test_frozen_weight_in_a_differentiated_tree(rng):
    """allow_int=True: float0 for the integer codes, zeros for float statistics; optax on the rest."""
    q = _quantize(rng, (64, 32), "nf4", 64, True, False)
    params = {"q": q, "lora_a": jnp.asarray(rng.standard_normal((64, 4)), jnp.float32) * 0.01}
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)

    def loss(p):
        return jnp.sum((qjax.qmatmul(x, p["q"]) + jnp.sum(x @ p["lora_a"], -1, keepdims=True)) ** 2)

    grads = jax.grad(loss, allow_int=True)(params)
    assert grads["q"].packed.dtype == jax.dtypes.float0
    np.testing.assert_array_equal(np.asarray(grads["q"].nested_absmax), 0)
    assert float(jnp.abs(grads["lora_a"]).sum()) > 0
    # the usual route: optimize only the trainable subtree
    opt = optax.adam(1e-3)
    trainable = {"lora_a": params["lora_a"]}
    state = opt.init(trainable)
    g = jax.grad(lambda t: loss({**params, **t}))(trainable)
    updates, state = opt.update(g, state, trainable)
    assert optax.apply_updates(trainable, updates)["lora_a"].shape == (64, 4)


def test_no_gather_on_codes(rng):
    """The 4-bit lookup is a select tree: no gather without double quant, one on the statistics with it."""
    x = jnp.zeros((2, 128), jnp.float32)
    plain = _quantize(rng, (128, 64), "nf4", 64, False, True)
    assert "gather" not in str(jax.make_jaxpr(lambda x, q: qjax.qmatmul(x, q, backend="xla"))(x, plain))
    nested = _quantize(rng, (128, 64), "nf4", 64, True, True)
    jaxpr = jax.make_jaxpr(lambda x, q: qjax.qmatmul(x, q, backend="xla"))(x, nested)
    gathers = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "gather"]
    # the 256-entry dynamic code and the nested absmax, looked up for the num_blocks statistics only
    assert gathers and all(e.outvars[0].aval.size == nested.absmax.size for e in gathers)


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for value in param if isinstance(param, (tuple, list)) else (param,):  # cond's branches
                if isinstance(value, jax.extend.core.ClosedJaxpr):
                    yield from _all_eqns(value.jaxpr)
                elif isinstance(value, jax.extend.core.Jaxpr):
                    yield from _all_eqns(value)


def test_errors(rng):
    q = _quantize(rng, (64, 32), "nf4", 64, False, False)
    x = jnp.zeros((2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"shape \(..., K\) with K=64"):
        qjax.qmatmul(jnp.zeros((2, 63)), q)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        qjax.qmatmul(jnp.zeros((2, 64), jnp.int32), q)
    with pytest.raises(TypeError, match="QuantizedArray"):
        qjax.qmatmul(x, np.zeros((64, 32)))
    with pytest.raises(ValueError, match="2-D"):
        qjax.qmatmul(x, qjax.quantize(jnp.ones((2, 64, 32)), "nf4"))
    with pytest.raises(ValueError, match="Unknown backend 'cuda'"):
        qjax.qmatmul(x, q, backend="cuda")
    with pytest.raises(ValueError, match="inconsistent leaves"):
        qjax.qmatmul(x, q.replace(absmax=q.absmax[:3]))
    flat = _quantize(rng, (33, 17), "nf4", 64, False, False)
    with pytest.raises(ValueError, match="flat layout .* has no kernel"):
        qjax.qmatmul(jnp.zeros((2, 33)), flat, backend="pallas", interpret=True)
    with pytest.raises(ValueError, match="per-channel"):
        qjax.qmatmul(x, _quantize(rng, (64, 32), "int8", None, False, False), backend="pallas", interpret=True)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="interpret=True"):
            qjax.qmatmul(x, _quantize(rng, (64, 128), "nf4", 64, False, False), backend="pallas")
