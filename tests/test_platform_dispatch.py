"""backend="auto" chooses per lowering platform: CUDA gets the Pallas kernels, the CPU the XLA path.

Exports from this CPU host: for ["cuda"] the module holds the kernel's custom call, for ["cpu"]
none, for ["cpu", "cuda"] both paths. The CPU result of
"auto" is bit-identical to backend="xla", forward and backward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from helpers import random_weights

_TRITON = "__gpu$xla.gpu.triton"
_DISABLED = [jax.export.DisabledSafetyCheck.custom_call(n) for n in (_TRITON, "mosaic_gpu_v2")]


def _abstract(m, k=512, n=256, transposed=True, lead=()):
    q = jax.eval_shape(lambda w: qjax.quantize(w, "nf4", double_quant=True, transposed=transposed),
                       jax.ShapeDtypeStruct((k, n), jnp.bfloat16))
    return jax.ShapeDtypeStruct(lead + (m, k), jnp.bfloat16), q


def _export(fn, platforms, *args):
    return jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=_DISABLED)(*args).mlir_module()


def _loss(backend):
    return lambda x, q: jnp.sum(jax.grad(lambda x: jnp.sum(qjax.qmatmul(x, q, backend=backend) ** 2))(x))


@pytest.mark.parametrize("m", [4, 64])  # the decode kernel, the Triton GEMM
def test_auto_exports_the_kernel_for_cuda(m):
    x, q = _abstract(m)
    assert _TRITON in _export(lambda x, q: qjax.qmatmul(x, q), ["cuda"], x, q)
    assert _TRITON not in _export(lambda x, q: qjax.qmatmul(x, q), ["cpu"], x, q)
    both = _export(_loss("auto"), ["cpu", "cuda"], x, q)  # forward and backward kernels, and the XLA path
    assert both.count(_TRITON) >= 2 and "stablehlo.dot_general" in both


def test_pallas_traces_for_cuda_without_a_gpu():
    x, q = _abstract(32, transposed=False)
    assert _TRITON in _export(lambda x, q: qjax.qmatmul(x, q, backend="pallas"), ["cuda"], x, q)


def test_auto_under_vmap_exports_for_both_platforms():
    q = jax.eval_shape(lambda w: jax.vmap(lambda a: qjax.quantize(a, "nf4", transposed=True))(w),
                       jax.ShapeDtypeStruct((3, 256, 128), jnp.bfloat16))
    x = jax.ShapeDtypeStruct((3, 8, 256), jnp.bfloat16)
    assert _TRITON in _export(jax.vmap(lambda x, q: qjax.qmatmul(x, q)), ["cpu", "cuda"], x, q)


@pytest.mark.parametrize("m", [3, 40])
def test_auto_on_the_cpu_is_bit_identical_to_xla(rng, m):
    q = qjax.quantize(jnp.asarray(random_weights(rng, (192, 128), "bfloat16")), "nf4", double_quant=True)
    x = jnp.asarray(rng.standard_normal((m, 192)), jnp.bfloat16)
    for fn in (lambda b: qjax.qmatmul(x, q, backend=b), lambda b: jax.jit(_loss(b))(x, q)):
        np.testing.assert_array_equal(np.asarray(fn("auto"), np.float32), np.asarray(fn("xla"), np.float32))
