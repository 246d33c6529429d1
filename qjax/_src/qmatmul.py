"""qmatmul: x @ dequantize(W) (interim XLA path; the fused kernels replace it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax._src.qarray import QuantizedArray
from qjax._src.quantize import dequantize


def qmatmul(x, q: QuantizedArray, *, compute_dtype=None, backend="auto", interpret=False, precision=None):
    """x (..., K) @ q (K, N) -> (..., N) in compute_dtype (default x.dtype)."""
    if not isinstance(q, QuantizedArray) or q.ndim != 2 or x.shape[-1] != q.shape[0]:
        raise ValueError(f"qmatmul needs x (..., K) and a 2-D QuantizedArray (K, N); got x {x.shape}, {q!r}")
    dtype = jnp.dtype(compute_dtype or x.dtype)
    w = jax.lax.stop_gradient(dequantize(q, dtype))
    return jnp.matmul(x.astype(dtype), w, precision=precision)
