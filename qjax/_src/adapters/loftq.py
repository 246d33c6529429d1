"""LoftQ: quantize a weight and find its low-rank correction together (Li et al., 2023).

Alternating minimisation of ||W - Q - A @ B||: quantize the residual W - A @ B into Q, then
take the best rank-r approximation A @ B of W - dequantize(Q) by SVD. Iteration 1 is
"quantize W, then SVD the quantization error", exactly PEFT's `loftq_init(num_iter=1)`.
Everything runs in float32 on the device under `jit` (no float64, no host round trip).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.core import formats
from qjax._src.adapters.config import LOFTQ_METHODS as _METHODS, LoraConfig
from qjax._src.core.policy import QuantConfig
from qjax._src.core.qarray import QuantizedArray
from qjax._src.core.quantize import check_blocksize, check_finite, check_float_array, dequantize, quantize

_F32 = jnp.float32


def low_rank(m, r: int, *, method: str = "svd", oversample: int = 8, power_iters: int = 4):
    """The best rank-r factorisation `m ≈ a @ b`, the singular values split evenly (PEFT's).

    m: (n, k) float array. Returns a (n, r) = U_r sqrt(S_r) and b (r, k) = sqrt(S_r) V_r^T in
    float32. method "svd": `jnp.linalg.svd` (exact; on GPU/TPU it runs on the device).
    "randomized": Halko et al.'s range finder with `oversample` extra columns and
    `power_iters` QR-stabilised power iterations, then an SVD of a (r + oversample, k)
    matrix; only matmuls and thin QRs touch the full matrix, so it is the method for large
    layers (its error is within a few percent of the exact one for small r).
    """
    if method not in _METHODS:
        raise ValueError(f"Unknown method {method!r}. It needs to be one of {list(_METHODS)}.")
    m = m.astype(_F32)
    n, k = m.shape
    if method == "svd":
        u, s, vh = jnp.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        width = min(r + oversample, n, k)
        omega = jax.random.normal(jax.random.PRNGKey(0), (k, width), _F32)
        y, _ = jnp.linalg.qr(m @ omega)
        for _ in range(power_iters):
            z, _ = jnp.linalg.qr(m.T @ y)
            y, _ = jnp.linalg.qr(m @ z)
        ub, s, vh = jnp.linalg.svd(y.T @ m, full_matrices=False)
        u, s, vh = (y @ ub)[:, :r], s[:r], vh[:r]
    sq = jnp.sqrt(s)
    return u * sq[None, :], sq[:, None] * vh


def _as_quant_config(quant_config) -> QuantConfig:
    if isinstance(quant_config, str):
        return QuantConfig(format=quant_config, double_quant=False)
    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"quant_config must be a QuantConfig or a format name, got {type(quant_config).__name__}")
    return quant_config


@functools.partial(jax.jit, static_argnames=("r", "fmt", "blocksize", "double_quant", "num_iter",
                                             "transposed", "method", "keep_best"))
def _loftq(w, r, fmt, blocksize, double_quant, num_iter, transposed, method, keep_best):
    wf = w.astype(_F32)

    def step(ab):
        a, b = ab
        q = quantize(wf - a @ b, fmt, blocksize=blocksize, double_quant=double_quant,
                     transposed=transposed)
        residual = wf - dequantize(q, _F32)
        a, b = low_rank(residual, r, method=method)
        err = jnp.sum(jnp.square(residual - a @ b))
        return q, a, b, err

    n, k = wf.shape
    zeros = (jnp.zeros((n, r), _F32), jnp.zeros((r, k), _F32))
    best = step(zeros)  # iteration 1: quantize W itself

    def body(_, carry):
        best, ab = carry
        new = step(ab)
        if keep_best:
            better = new[3] < best[3]
            best = jax.tree_util.tree_map(lambda x, y: jnp.where(better, x, y), new, best)
        else:
            best = new
        return best, (new[1], new[2])

    best, _ = jax.lax.fori_loop(1, num_iter, body, (best, (best[1], best[2])))
    q, a, b, _ = best
    return q.replace(dtype=np.dtype(w.dtype)), a, b


def loftq(w, r: int, quant_config="nf4", *, num_iter: int = 1, transposed: bool = False,
          method: str = "svd", keep_best: bool = True) -> tuple[QuantizedArray, jax.Array, jax.Array]:
    """LoftQ: a quantized weight and a rank-r correction with `dequantize(q) + a @ b ≈ w`.

    w: (in, out) float32/bfloat16/float16 kernel (Flax layout). r: rank, 1 <= r <= min(in, out).
    quant_config: a QuantConfig (format, blocksize, double_quant are used) or a format name
      ("nf4", "nf3", "nf2", "fp4", "int8"; double_quant off).
    num_iter: alternations (PEFT's `loftq_iter`); 1 = quantize w, SVD the error.
    transposed: store q as torch's (out, in), as bitsandbytes and PEFT quantize it.
    method: "svd" (exact) or "randomized" (see `low_rank`).
    keep_best: return the iterate with the smallest ||w - dequantize(q) - a @ b|| (the
      alternation is not guaranteed monotone because absmax quantization is not an exact
      projection); False returns the last iterate, as PEFT does.
    Returns (q, a, b): q a QuantizedArray of w's shape and dtype, a (in, r) and b (r, out)
    float32. Runs under `jit` (all arguments but w static). Raises TypeError/ValueError for a
    non-float or non-2-D w, an invalid rank, format, blocksize or num_iter.
    """
    config = _as_quant_config(quant_config)
    spec = formats.get_format(config.format)
    check_blocksize(spec, config.blocksize)
    check_float_array(w, "w")
    if np.ndim(w) != 2:
        raise ValueError(f"loftq needs a 2-D (in, out) kernel, got w shape={tuple(np.shape(w))}")
    if not isinstance(r, (int, np.integer)) or not 1 <= r <= min(np.shape(w)):
        raise ValueError(f"rank r={r!r} must be an int in [1, min(in, out)] = [1, {min(np.shape(w))}]")
    if not isinstance(num_iter, (int, np.integer)) or num_iter < 1:
        raise ValueError(f"num_iter={num_iter!r} must be an int >= 1")
    if method not in _METHODS:
        raise ValueError(f"Unknown method {method!r}. It needs to be one of {list(_METHODS)}.")
    check_finite(w, "w")
    return _loftq(jnp.asarray(w), int(r), config.format, config.blocksize, config.double_quant,
                  int(num_iter), bool(transposed), method, bool(keep_best))


def loftq_init(kernel, lora_config: LoraConfig, quant_config, *,
               transposed: bool = False) -> tuple[QuantizedArray, jax.Array, jax.Array]:
    """What a QLoRA layer with `LoraConfig(init="loftq")` starts from, the scaling folded in.

    kernel: (in, out) dense kernel. Returns (q, lora_a (in, r), lora_b (r, out)) with
    `dequantize(q) + (x @ lora_a @ lora_b) * lora_config.scaling` ≈ `x @ kernel`: both factors
    are divided by sqrt(scaling), so the adapters' product times the layer's scaling is the
    LoftQ correction. Rank is `lora_config.r`, iterations `lora_config.loftq_iter`, low-rank
    method `lora_config.loftq_method`.
    lora_a and lora_b are float32 (cast them to the adapters' param_dtype).
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a LoraConfig, got {type(lora_config).__name__}")
    q, a, b = loftq(kernel, lora_config.r, quant_config, num_iter=lora_config.loftq_iter,
                    transposed=transposed, method=lora_config.loftq_method)
    inv = 1.0 / math.sqrt(lora_config.scaling)
    return q, a * inv, b * inv


def relative_error(w, q: QuantizedArray, a=None, b=None) -> jax.Array:
    """||dequantize(q) + a @ b - w||_F / ||w||_F in float32 (a, b optional)."""
    wf = jnp.asarray(w, _F32)
    approx = dequantize(q, _F32)
    if a is not None:
        approx = approx + jnp.asarray(a, _F32) @ jnp.asarray(b, _F32)
    return jnp.linalg.norm(approx - wf) / jnp.linalg.norm(wf)
