"""Which Pallas kernel runs a qmatmul, and the checks `qjax.qmatmul(backend=...)` relies on.

  M <= 16                                  -> qmatmul_decode (split-K GEMV, bandwidth-bound)
  M > 16, Hopper (sm_90+), bf16/f16, N % 128 == 0 (plain weights: K % 64 == 0)
                                           -> qmatmul_mosaic (TMA + wgmma)
  otherwise                                -> qmatmul_triton (portable GEMM; Ampere's path)

In interpret mode (CPU) the Mosaic GPU kernel cannot run, so M > 16 takes the Triton kernel.
Traced where no GPU is visible (e.g. `jax.export(..., platforms=["cuda"])` from a CPU host) the
target GPU's generation is unknown, so M > 16 takes the Triton kernel, which runs on Ampere and Hopper.

`per_platform` makes the choice per lowering platform: CUDA gets the kernel, every other platform
the fallback (qmatmul's XLA path), so one exported or multi-platform program takes each one's path.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from qjax._src.core.family import QuantizedBase
from qjax._src.core.qarray import QuantizedArray
from qjax.kernels import _platform, _tiles, qmatmul_decode, qmatmul_mosaic, qmatmul_triton


def _rows(x_shape) -> int:
    return math.prod(tuple(x_shape)[:-1])


def _is_hopper() -> bool:
    try:
        device = jax.devices()[0]
        return device.platform == "gpu" and float(getattr(device, "compute_capability", "0")) >= 9.0
    except (RuntimeError, ValueError):
        return False


def check(x_shape, q: QuantizedBase, dtype) -> None:
    """Raises ValueError naming the shape, dtype or layout if no Pallas kernel takes the operands.

    The layout is the array's to judge (`q.kernel_problems()`); a family no kernel takes is refused here.
    """
    _tiles.weight_spec(x_shape, q, dtype, "qmatmul(backend='pallas')")


def can_use(x_shape, q: QuantizedBase, dtype) -> bool:
    """True when a Pallas kernel takes the operands (a cheap check that never raises)."""
    try:
        check(x_shape, q, dtype)
    except (ValueError, TypeError):
        return False
    return True


def adjoint_view(q: QuantizedBase) -> QuantizedBase | None:
    """The weight of the backward product dy @ W^T as a view (`q.T`), or None if the array has none.

    Blockwise statistics do not depend on which axis is called K, so a QuantizedArray's `q.T` (a
    view, no bytes moved) is exact. Per-channel int8 keeps one absmax per logical column, which
    has no transposed view (its `T` raises ValueError), nor has a family without `T`.
    """
    try:
        return q.T
    except ValueError:
        return None


def select(x_shape, q: QuantizedArray, dtype, interpret: bool) -> str:
    """The kernel name for these operands: "decode", "mosaic" or "triton"."""
    if _rows(x_shape) <= qmatmul_decode.MAX_M:
        return "decode"
    if not interpret and _is_hopper():
        try:
            qmatmul_mosaic.check(x_shape, q, dtype)
            return "mosaic"
        except ValueError:
            pass
    return "triton"


def qmatmul(x, q: QuantizedArray, dtype, *, interpret: bool = False, precision=None):
    """x (..., K) @ q (K, N) -> (..., N) in dtype through the kernel `select` picks.

    precision goes to the Triton-backend kernels' dots; the Mosaic GPU kernel takes only
    bf16/f16, whose products are exact in its float32 accumulator at any precision.
    """
    dtype = np.dtype(dtype)
    kernel = select(x.shape, q, dtype, interpret)
    if kernel == "decode":
        return qmatmul_decode.qmatmul_decode(x, q, compute_dtype=dtype, interpret=interpret, precision=precision)
    if kernel == "mosaic":
        return qmatmul_mosaic.qmatmul_mosaic(x, q, compute_dtype=dtype)
    return qmatmul_triton.qmatmul_triton(x, q, compute_dtype=dtype, interpret=interpret, precision=precision)


def per_platform(kernel, fallback, *args):
    """kernel(*args) where the program is lowered for CUDA, fallback(*args) on every other platform.

    Decided per lowering platform (`jax.lax.platform_dependent`), not from the host's default
    backend: an export for ["cuda"] holds the kernel's custom call, one for ["cpu"] exactly the
    fallback, one for ["cpu", "cuda"] both (the kernel lowered for CUDA alone, `_platform`).
    Eagerly (no jit) only the branch of the default backend runs.
    """
    cuda = lambda *a: _platform.on_platform("cuda", kernel, *a)  # noqa: E731
    return jax.lax.platform_dependent(*args, cuda=cuda, default=fallback)
