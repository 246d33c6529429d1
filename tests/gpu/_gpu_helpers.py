"""Data and checks shared by tests/gpu: weights and activations drawn on the device, device-side bounds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import qjax

# Every helper is jitted: eager ops on a GPU compile one small executable each, per shape.


@functools.partial(jax.jit, static_argnums=tuple(range(1, 8)))
def weight(key, k, n, fmt="nf4", blocksize=64, double_quant=True, transposed=False, dtype=jnp.bfloat16):
    """A (K, N) QuantizedArray of Gaussian weights (std 0.05) drawn on the device."""
    w = (jax.random.normal(key, (k, n), jnp.float32) * 0.05).astype(dtype)
    return qjax.quantize(w, fmt, blocksize=blocksize, double_quant=double_quant, transposed=transposed)


@functools.partial(jax.jit, static_argnums=(1, 2))
def activations(key, shape, dtype=jnp.bfloat16):
    """Standard-normal activations of `shape` in dtype, drawn on the device."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def precision_for(dtype):
    """HIGHEST for float32 (IEEE products on both paths, not TF32), the default for bf16/f16."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


@functools.partial(jax.jit, static_argnums=4)
def _excess(y, y_ref, x, q, dtype):
    """(max of |y - y_ref| - bound, max |y - y_ref|, all finite, any nonzero); the bound is below."""
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    w = qjax.dequantize(q, dtype).astype(jnp.float32)
    scale = jnp.matmul(jnp.abs(x2), jnp.abs(w), precision=jax.lax.Precision.HIGHEST)
    bound = (float(jnp.finfo(dtype).eps) + q.shape[0] * 2.0**-23) * scale
    diff = jnp.abs(y.astype(jnp.float32) - y_ref.astype(jnp.float32)).reshape(bound.shape)
    return jnp.max(diff - bound), jnp.max(diff), jnp.all(jnp.isfinite(y)), jnp.any(y != 0)


def assert_matmul_close(y, y_ref, x, q, dtype):
    """|y - y_ref| <= (eps(dtype) + K 2^-23) (|x| @ |W|) elementwise, computed on the device.

    y and y_ref multiply the same weight (both round `code * absmax` to dtype exactly as
    `dequantize` does) with float32 accumulation, so they differ by the order of a float32 sum of
    K products (at most K 2^-24 |x| @ |W| each side) and by one rounding of each result to dtype
    (eps(dtype) / 2 of |y| each side): the bound of tests/test_qmatmul.py, between two kernels.
    Also checks shape, dtype and that every element is finite and not all are zero.
    """
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, (y.shape, y.dtype, y_ref.shape, y_ref.dtype)
    excess, worst, finite, nonzero = _excess(y, y_ref, x, q, jnp.dtype(dtype))
    assert bool(finite), "non-finite outputs"
    assert bool(nonzero), "all outputs are zero"
    assert float(excess) <= 0, f"max |y - y_ref| exceeds its bound by {float(excess):.3g} (max |diff| {float(worst):.3g})"


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| over all leaves of two pytrees, in float64 on the host."""
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5
