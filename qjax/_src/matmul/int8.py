"""LLM.int8(): 8-bit matmul with mixed-precision outlier decomposition (Dettmers et al., 2022).

`x @ W` with W stored int8 per output channel (`quantize(W, "int8", blocksize=None)`):
activations are quantized per row (token) at run time, the product accumulates in int32 and
is rescaled by both absmaxes; input feature columns holding an |x| >= threshold skip the int8
path and multiply in 16-bit against the matching (dequantized) weight rows. The rounding and
the order of operations follow bitsandbytes' `MatMul8bitLt` (its pure-torch CPU path).

The outlier set is data-dependent, so under `jit` it is a mask over the K input features (the
16-bit product runs over all K columns, zeros outside the mask) or, with `max_outliers=k`,
the k columns with the largest |x| gathered into a static (M, k) @ (k, N) product.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.errors import describe
from qjax._src.core.family import is_quantized
from qjax._src.core.qarray import QuantizedArray
from qjax._src.core.quantize import abs_max, check_float_array, dequantize

_F32 = jnp.float32
# bitsandbytes' int8_mm_dequant constant: 1 / (127 * 127) as a float32 literal.
_INV_127_SQ = np.float32(6.200124e-05)
_INV_127 = np.float32(1 / 127)


def quantize_rows(x, threshold: float = 0.0, cols=None):
    """Per-row absmax int8 quantization of activations, bitsandbytes' `int8_vectorwise_quant`.

    x: (M, K) float. threshold > 0: elements with |x| >= threshold are zeroed before the row
    absmax is taken, and the int8 codes of the outlier columns (`cols`, (K,) bool; default:
    every column holding such an element) are zeroed.
    Returns (codes int8 (M, K), row_stats float32 (M,), cols (K,) bool or None).
    """
    xf = x.astype(_F32)
    if threshold > 0:
        outlier = jnp.abs(xf) >= threshold
        if cols is None:
            cols = jnp.any(outlier, axis=0)
        else:
            outlier = outlier & cols[None, :]
        xf = jnp.where(outlier, 0.0, xf)
    row_stats = abs_max(xf, axis=-1)  # a NaN row gives inf stats and a NaN output row, not zeros
    # torch evaluates bitsandbytes' `127.0 / row_stats` as 127 * (1 / row_stats)
    scale = jnp.where(row_stats > 0, (1.0 / jnp.where(row_stats > 0, row_stats, 1.0)) * 127.0, 0.0)
    codes = jnp.round(xf * scale[:, None])
    if cols is not None:
        codes = jnp.where(cols[None, :], 0.0, codes)
    return codes.astype(jnp.int8), row_stats, cols


def _weight_codes(w: QuantizedArray):
    """(K, N) int8 codes and (N,) float32 absmax of a per-channel int8 QuantizedArray."""
    codes = jnp.swapaxes(w.packed, 0, 1) if w.transposed else w.packed
    return codes, w.absmax


def _check(x, w, threshold, max_outliers) -> None:
    check_float_array(x, "x")
    if np.ndim(x) == 0:
        raise ValueError(f"x must have rank >= 1 (..., K), got {describe(x)}")
    if not is_quantized(w) or not w.is_llm_int8 or w.ndim != 2 or w.double_quant:
        raise ValueError("int8_matmul needs w from qjax.quantize(W, 'int8', blocksize=None) with W of "
                         f"shape (K, N) and no double quantization, got {w!r}")
    w.check_leaves("int8_matmul w")
    if np.shape(x)[-1] != w.shape[0]:
        raise ValueError(f"x ({describe(x)}) does not match w shape={w.shape}: "
                         f"x.shape[-1] must be K={w.shape[0]}")
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold={threshold!r} must be a number >= 0, got {type(threshold).__name__}")
    if not threshold >= 0:  # also refuses NaN, which would silently disable the decomposition
        raise ValueError(f"threshold={threshold!r} must be >= 0 (0 disables the decomposition)")
    if max_outliers is not None and (isinstance(max_outliers, (bool, np.bool_))
                                     or not isinstance(max_outliers, (int, np.integer)) or max_outliers < 0):
        raise TypeError(f"max_outliers={max_outliers!r} must be None or an int >= 0")


def int8_matmul_reference(x, w: QuantizedArray, *, threshold: float = 6.0, max_outliers=None):
    """The forward computation in plain jnp (what `int8_matmul` computes; no custom gradient)."""
    k, n = w.shape
    dtype = x.dtype
    x2 = x.reshape(-1, k)
    codes, col_stats = _weight_codes(w)
    sub_idx = None
    cols = None
    if threshold > 0 and max_outliers is not None:
        m = min(int(max_outliers), k)
        colmax = abs_max(x2.astype(_F32), axis=0)
        vals, sub_idx = jax.lax.top_k(colmax, m)
        sel = vals >= threshold
        cols = jnp.zeros((k,), bool).at[sub_idx].set(sel)
    ca, row_stats, cols = quantize_rows(x2, threshold, cols)
    acc = jax.lax.dot_general(ca, codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    out = (acc.astype(_F32) * (row_stats[:, None] * col_stats[None, :]) * _INV_127_SQ).astype(dtype)
    if cols is not None:
        if sub_idx is not None:
            sub_x = jnp.where(sel[None, :], jnp.take(x2, sub_idx, axis=1), 0).astype(dtype)
            sub_w = jnp.take(codes, sub_idx, axis=0)
        else:
            sub_x = jnp.where(cols[None, :], x2, 0).astype(dtype)
            sub_w = codes
        w16 = ((sub_w.astype(_F32) * col_stats[None, :]) * _INV_127).astype(dtype)
        # torch's addmm adds the float32 product to the rounded int8 result, then rounds once
        out = (out.astype(_F32) + jnp.matmul(sub_x, w16, preferred_element_type=_F32)).astype(dtype)
    return out.reshape(x.shape[:-1] + (n,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _int8_matmul(x, w, threshold, max_outliers):
    return int8_matmul_reference(x, w, threshold=threshold, max_outliers=max_outliers)


def _fwd(x, w, threshold, max_outliers):
    return _int8_matmul(x, w, threshold, max_outliers), w


def _bwd(threshold, max_outliers, w, g):
    # bitsandbytes' backward: grad_x = g @ dequantize(W)^T in the activations' dtype; W is frozen.
    gx = jnp.matmul(g, dequantize(w, g.dtype).T, preferred_element_type=_F32).astype(g.dtype)
    zeros = jax.tree_util.tree_map(
        lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.inexact)
        else jnp.zeros_like(a), w)
    return gx, zeros


_int8_matmul.defvjp(_fwd, _bwd)


def int8_matmul(x, w: QuantizedArray, *, threshold: float = 6.0, max_outliers: int | None = None):
    """LLM.int8() `x @ W` with outlier decomposition, as bitsandbytes' `Linear8bitLt` computes it.

    x: (..., K) float16/bfloat16/float32 activations (bitsandbytes casts to float16 first;
      pass float16 to reproduce it). w: (K, N) QuantizedArray from
      `qjax.quantize(W, "int8", blocksize=None)` (per-output-channel absmax; `transposed`
      storage accepted).
    threshold: input feature columns where any |x| >= threshold (over all rows of x) go through
      a 16-bit matmul against the matching weight rows; 0 disables the decomposition.
    max_outliers: None masks the outlier columns inside a full K-column 16-bit product (exact,
      any number of outliers); an int k gathers the k columns of largest |x| (static shapes,
      k/K of the 16-bit work); outlier columns beyond k stay in the int8 path unzeroed.
    Returns (..., N) in x.dtype. Differentiable in x (gradient `g @ dequantize(W).T`, as
    bitsandbytes'); W is frozen. Raises TypeError/ValueError for bad dtypes, shapes, leaves of w,
    a threshold that is not a number >= 0, or max_outliers that is not None or an int >= 0.
    """
    _check(x, w, threshold, max_outliers)
    return _int8_matmul(jnp.asarray(x), w, float(threshold), None if max_outliers is None else int(max_outliers))
