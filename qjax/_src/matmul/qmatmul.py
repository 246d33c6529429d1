"""qmatmul: `x @ dequantize(W)` without keeping a dense W, with a backward pass for `x`.

Two backends share one `jax.custom_vjp`:
  xla:    the weight's own jnp matmul, `q.xla_matmul` (dispatched on its family). For a
          QuantizedArray the dequantization is fused into the dot and a transposed (torch
          `(out, in)`) weight is contracted along its stored last axis
          (`qjax._src.core.blockwise_matmul`). The CPU path and the test oracle.
  pallas: the kernels in `qjax.kernels` (Mosaic GPU on Hopper, Triton elsewhere, a split-K
          GEMV kernel for M <= 16) for the arrays they take (`q.kernel_problems()` is empty);
          `interpret=True` runs them on the CPU.
  auto:   chosen per lowering platform (`qjax.kernels.dispatch.per_platform`): the kernels
          where the program is lowered for CUDA, the xla path everywhere else.

Gradients: `dx = dy @ W^T` runs through the same machinery: the xla path contracts the
other stored axis, the Pallas path runs its kernels on the view `q.T` (no bytes move). The
quantized array is frozen: its cotangent is zeros (float0 for the integer code leaves), so
`jax.grad(..., allow_int=True)` over a tree holding it works and returns zeros/float0 for it;
the usual route is to differentiate only the trainable subtree.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.core.family import QuantizedBase, is_quantized
from qjax._src.errors import describe

BACKENDS = ("auto", "xla", "pallas")
_FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


# ----------------------------------------------------------------------------- dispatch


def _forward(x, q, dtype, backend, interpret, precision, adjoint=False):
    def xla(x, q):
        return q.xla_matmul(x, dtype, precision=precision, adjoint=adjoint)

    if backend == "xla":
        return xla(x, q)
    from qjax.kernels import dispatch  # lazy: Pallas imports are slow and not needed on the CPU

    w = dispatch.adjoint_view(q) if adjoint else q
    if w is None or not dispatch.can_use(x.shape, w, dtype):
        return xla(x, q)  # the backward of a weight whose adjoint no kernel takes (per-channel int8)

    def kernel(x, q):
        w = dispatch.adjoint_view(q) if adjoint else q
        return dispatch.qmatmul(x, w, dtype, interpret=interpret, precision=precision)

    if backend == "pallas":
        return kernel(x, q)
    return dispatch.per_platform(kernel, xla, x, q)  # "auto": the kernels on CUDA, XLA elsewhere


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _qmatmul(x, q, dtype, backend, interpret, precision):
    return _forward(x, q, dtype, backend, interpret, precision)


def _qmatmul_fwd(x, q, dtype, backend, interpret, precision):
    # Residuals: the quantized weight itself (4.1 bits a parameter), never the dense W.
    return _forward(x, q, dtype, backend, interpret, precision), (q, jnp.zeros((), x.dtype))


def _zero_cotangent(leaf):
    if leaf is None:
        return None
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(np.shape(leaf), jax.dtypes.float0)


def _qmatmul_bwd(dtype, backend, interpret, precision, res, dy):
    q, x_proto = res
    dx = _forward(dy.astype(dtype), q, dtype, backend, interpret, precision, adjoint=True)
    return dx.astype(x_proto.dtype), jax.tree_util.tree_map(_zero_cotangent, q)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _resolve_backend(backend: str, x, q: QuantizedBase, dtype, interpret: bool) -> str:
    """"xla", "pallas", or "auto" (decided per lowering platform in `_forward`)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. It needs to be one of {list(BACKENDS)}.")
    if backend == "xla" or (backend == "auto" and q.kernel_problems()):
        return "xla"  # a family no kernel takes never imports the (slow) Pallas modules
    from qjax.kernels import dispatch

    if backend == "auto":
        return "auto" if dispatch.can_use(x.shape, q, dtype) else "xla"
    dispatch.check(x.shape, q, dtype)  # raises naming the shape/layout a kernel cannot take
    # Traced (jit, export) the kernel is staged for whatever platform it is lowered for; an eager
    # call runs on the default backend, where the kernels need a GPU.
    if not interpret and not isinstance(x, jax.core.Tracer) and jax.default_backend() != "gpu":
        raise ValueError(f"backend='pallas' needs a CUDA GPU (the default backend is "
                         f"{jax.default_backend()!r}); pass interpret=True to emulate the kernels, "
                         "use backend='xla', or trace it for CUDA (jax.export(..., platforms=['cuda'])).")
    return "pallas"


def _check_args(x, q, compute_dtype):
    if not is_quantized(q):
        raise TypeError(f"qmatmul needs a quantized array (a QuantizedArray or another family) for q, "
                        f"got {type(q).__name__}")
    if not hasattr(x, "dtype") or np.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"qmatmul: x must be a float32, bfloat16 or float16 array, got {describe(x)}")
    if q.ndim != 2:
        raise ValueError(f"qmatmul needs a 2-D quantized array of logical shape (K, N), got {q!r}")
    if np.ndim(x) < 1 or np.shape(x)[-1] != q.shape[0]:
        raise ValueError(f"qmatmul: x {describe(x)} must have shape (..., K) with K={q.shape[0]} "
                         f"to multiply {q!r} (logical shape (K, N)={q.shape})")
    if math.prod(np.shape(x)) == 0 or q.size == 0:
        raise ValueError(f"qmatmul: empty operand, x {describe(x)}, q {q!r}")
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qmatmul: compute_dtype must be float32, bfloat16 or float16, got {dtype.name}")
    q.check_leaves("qmatmul")
    return dtype


def explicit_sharding(a):
    """(mesh, spec) of an array whose sharding is part of its type (Explicit mesh axes), else (None, None)."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True) or not any(
            t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None, None
    return mesh, sharding.spec


def explicit_leaf_sharding(q: QuantizedBase):
    """(mesh, spec) of q's first leaf (its codes) when it is sharded over Explicit mesh axes, else (None, None)."""
    return explicit_sharding(next(iter(q.leaves().values())))


def qmatmul(x, q: QuantizedBase, *, compute_dtype=None, backend: str = "auto", interpret: bool = False,
            precision=None) -> jax.Array:
    """`x @ dequantize(q)` with the dequantization fused into the matmul.

    x: float32/bfloat16/float16 array of shape (..., K); any leading batch dims, any M (incl. 1).
    q: quantized array of logical shape (K, N), of any family: a QuantizedArray nf4/fp4/nf3/nf2
      (optionally double-quantized) or int8 (blockwise or per-channel), in any layout (structured
      or flat, `transposed` for weights imported from torch in `(out, in)` = `(N, K)` order; their
      codes are used as stored), or another family (its own `xla_matmul`).
    compute_dtype: dtype of the weight fed to the matmul and of the result (default x.dtype);
      accumulation is float32.
    backend: "xla" (jnp), "pallas" (the kernels in `qjax.kernels`), or "auto": when a kernel takes
      the shape and layout, the kernels where the program is lowered for CUDA and XLA on every other
      platform, chosen per lowering platform (so `jax.export(..., platforms=["cuda"])` from a CPU
      host holds the kernels); XLA otherwise.
    interpret: run the Pallas kernels in interpret mode (CPU emulation, for tests).
    precision: of the dots, as for `jax.lax.dot_general` (the XLA path's dots and the Triton-backend
      kernels'; on a GPU, HIGHEST keeps float32 products out of TF32).
    Returns an array of shape (..., N) in compute_dtype. Differentiable w.r.t. x (the weight is
    frozen: its cotangent is zeros, float0 for integer leaves).
    Raises TypeError for a non-float x or a non-quantized q; ValueError for mismatched
    shapes, inconsistent leaves, an unknown backend, (backend="pallas") a layout no kernel takes,
    or a q sharded over Explicit mesh axes (use `qmatmul_sharded`).
    """
    dtype = _check_args(x, q, compute_dtype)
    _, spec = explicit_leaf_sharding(q)
    if spec is not None and any(e is not None for e in spec):
        raise ValueError(f"{q!r} is sharded over Explicit mesh axes ({spec}), which the fused dequantization "
                         "cannot take under plain jit: call qjax.sharding.qmatmul_sharded(x, q) (shard_map; the QLoRA "
                         "layers do this for you), or build the mesh with AxisType.Auto axes")
    x = jnp.asarray(x)
    resolved = _resolve_backend(backend, x, q, dtype, interpret)
    return _qmatmul(x, q, dtype, resolved, bool(interpret), precision)
