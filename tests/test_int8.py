"""qjax.int8_matmul (LLM.int8) against bitsandbytes' Linear8bitLt on the CPU and a float reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax

M, K, N = 16, 256, 64


def _activations(rng, n_outliers=0, dtype=np.float32, shape=(M, K)):
    """N(0, 1) activations; `n_outliers` feature columns hold +-U(20, 60): 20-60x the rest's scale."""
    x = rng.standard_normal(shape).astype(np.float32)
    x = np.clip(x, -5.0, 5.0)  # no accidental |x| >= 6 outside the planted columns
    cols = rng.choice(shape[-1], n_outliers, replace=False)
    sub = x[..., cols].shape
    x[..., cols] = rng.choice([-1.0, 1.0], sub) * rng.uniform(20.0, 60.0, sub)
    return x.astype(dtype), cols


def _weights(rng, dtype=np.float32):
    w = (rng.standard_normal((K, N)) * 0.05).astype(dtype)
    return w, qjax.quantize(jnp.asarray(w), "int8", blocksize=None)


def _rel(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_matches_bitsandbytes_linear8bitlt(rng, threshold):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    x, _ = _activations(rng, 3, np.float16, shape=(2, 8, K))
    w, q = _weights(rng, np.float16)
    layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(torch.from_numpy(np.ascontiguousarray(w.T)), requires_grad=False,
                                     has_fp16_weights=False)
    layer = layer.to("cpu").eval()  # training mode on the CPU dequantizes instead (MatMul8bitFp)
    ref = layer(torch.from_numpy(x)).detach().numpy()
    # same weight codes and scales as bitsandbytes' row-wise int8
    np.testing.assert_array_equal(np.asarray(q.packed).T, layer.weight.data.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax), layer.state.SCB.numpy())
    ours = np.asarray(jax.jit(qjax.int8_matmul, static_argnames="threshold")(x, q, threshold=threshold))
    assert ours.dtype == np.float16 and ours.shape == (2, 8, N)
    if threshold == 0:
        np.testing.assert_array_equal(ours, ref)  # int32 sums and the same float32 rescale
    else:
        # the 16-bit outlier product is a float32 sum whose order differs from torch's: at most
        # one float16 ulp after rounding
        assert np.all(np.abs(ours.astype(np.float32) - ref) <= np.spacing(np.abs(ref))), \
            np.abs(ours.astype(np.float32) - ref).max()


def test_outlier_decomposition_10x_better(rng):
    x, _ = _activations(rng, int(rng.integers(2, 7)))
    w, q = _weights(rng)
    # the stored (int8) weight is common to both paths; the decomposition changes the activations'
    # quantization, so measure against the product of x with the stored weight
    ref = x @ np.asarray(qjax.dequantize(q))
    decomposed = _rel(qjax.int8_matmul(x, q, threshold=6.0), ref)
    plain = _rel(qjax.int8_matmul(x, q, threshold=0.0), ref)
    assert plain >= 10 * decomposed, (plain, decomposed)
    # and against the float product the decomposed one still wins (the weight's error is a floor)
    assert _rel(qjax.int8_matmul(x, q, threshold=6.0), x @ w) < _rel(qjax.int8_matmul(x, q, threshold=0.0), x @ w)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_without_outliers_decomposition_changes_nothing(rng, dtype):
    x, _ = _activations(rng, 0, dtype)
    _, q = _weights(rng)
    np.testing.assert_array_equal(qjax.int8_matmul(x, q, threshold=6.0), qjax.int8_matmul(x, q, threshold=0.0))


def test_float_reference_within_int8_step(rng):
    # out - x @ dequantize(W) = sum_k (s_m * round(x_mk / s_m) - x_mk) * W_kn with s_m = absmax_m / 127,
    # so |error| <= s_m / 2 * sum_k |W_kn| (plus float32 rounding of the rescale)
    x, _ = _activations(rng, 0)
    _, q = _weights(rng)
    wd = np.asarray(qjax.dequantize(q), np.float64)
    out = np.asarray(qjax.int8_matmul(x, q, threshold=0.0), np.float64)
    step = np.abs(x).max(axis=1, keepdims=True) / 127
    bound = step / 2 * np.abs(wd).sum(axis=0, keepdims=True)
    err = np.abs(out - x.astype(np.float64) @ wd)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-6 * np.abs(out)), (err / bound).max()


def test_max_outliers_gathers_the_same_columns(rng):
    x, _ = _activations(rng, 3)
    _, q = _weights(rng)
    masked = qjax.int8_matmul(x, q, threshold=6.0)
    gathered = jax.jit(lambda x: qjax.int8_matmul(x, q, threshold=6.0, max_outliers=8))(x)
    np.testing.assert_allclose(gathered, masked, rtol=1e-5, atol=1e-5)


def test_transposed_storage(rng):
    x, _ = _activations(rng, 2)
    w, q = _weights(rng)
    qt = qjax.quantize(jnp.asarray(w), "int8", blocksize=None, transposed=True)
    np.testing.assert_array_equal(qjax.int8_matmul(x, qt), qjax.int8_matmul(x, q))


def test_gradient_is_dequantized_weight(rng):
    x, _ = _activations(rng, 2)
    _, q = _weights(rng)
    g = jax.grad(lambda x: jnp.sum(qjax.int8_matmul(x, q) * jnp.arange(N, dtype=jnp.float32)[None, :]))(jnp.asarray(x))
    expected = np.broadcast_to(np.arange(N, dtype=np.float32) @ np.asarray(qjax.dequantize(q)).T, x.shape)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-5)


def test_errors(rng):
    x = jnp.ones((4, K))
    with pytest.raises(ValueError, match="blocksize=None"):
        qjax.int8_matmul(x, qjax.quantize(jnp.ones((K, N)), "int8", blocksize=64))
    with pytest.raises(ValueError, match="blocksize=None"):
        qjax.int8_matmul(x, qjax.quantize(jnp.ones((K, N)), "nf4"))
    with pytest.raises(ValueError, match="K=128"):
        qjax.int8_matmul(x, qjax.quantize(jnp.ones((128, N)), "int8", blocksize=None))
    with pytest.raises(ValueError, match="threshold"):
        qjax.int8_matmul(x, qjax.quantize(jnp.ones((K, N)), "int8", blocksize=None), threshold=-1.0)


@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("pos", [0, 1, 4095])
def test_a_nan_activation_gives_a_nan_output_row(threshold, pos):
    """A NaN in x must come out as NaN in its row, never as a finite product (XLA's CPU max reduction can drop
    a NaN at the start of a long row, which made that row's scale finite and its int8 codes garbage)."""
    w = qjax.quantize(jax.random.normal(jax.random.key(0), (4096, 64)), "int8", blocksize=None)
    x = np.array(jax.random.normal(jax.random.key(1), (4, 4096)), np.float32) * 0.1
    x[2, pos] = np.nan
    y = np.asarray(qjax.int8_matmul(jnp.asarray(x), w, threshold=threshold))
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
