"""Every shipped Pallas kernel and config against the XLA path (backend="xla") on the GPU.

Shapes: decode (M <= 16), prefill and training (M up to 4096), K = N up to 8192, tails in M, N
and K, torch-layout (transposed) and plain weights, nf4/fp4 +- double quant and blockwise int8,
bf16/f16/f32, a vmap over stacked (per-expert) weights, and gradients. The tolerance is
`_gpu_helpers.assert_matmul_close` (justified by dtype there). Compiles dominate the run time, so
each case is one kernel compile plus one XLA reference compile; shapes repeat where they can.
"""

import jax
import jax.numpy as jnp
import pytest

import qjax
from _gpu_helpers import activations, assert_matmul_close, precision_for, weight
from qjax.kernels import _tiles, dispatch, qmatmul_decode, qmatmul_mosaic, qmatmul_triton

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
_PREFILL_WEIGHT = ("nf4", 64, True)  # (format, blocksize, double_quant): QLoRA's weight
_FORMATS = [("fp4", 32, False), ("int8", 128, False), ("nf4", 256, True), ("int8", 64, False)]


def _hopper() -> bool:
    return float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0


needs_hopper = pytest.mark.skipif("not _hopper()", reason="the Mosaic GPU kernel needs sm_90 (Hopper)")


def _check(key, kernel, m, k, n, weight_args, transposed, dtype):
    """kernel(x, q, precision) against qmatmul(backend="xla") on fresh (m, k) x and (k, n) q."""
    kq, kx = jax.random.split(key)
    q = weight(kq, k, n, *weight_args, transposed=transposed, dtype=dtype)
    x = activations(kx, (m, k), dtype)
    y = kernel(x, q, precision_for(dtype))
    y_ref = qjax.qmatmul(x, q, backend="xla", precision=precision_for(dtype))
    assert_matmul_close(y, y_ref, x, q, dtype)


# (m, k, n, (format, blocksize, double_quant), transposed, dtype); odd K/N keep the storage's last
# axis a multiple of the blocksize (structured), so the tails fall on the other axis.
DECODE_CASES = [(1, 4096, 4096, _PREFILL_WEIGHT, True, BF16), (3, 4096, 4096, _PREFILL_WEIGHT, True, BF16),
                (16, 4096, 4096, _PREFILL_WEIGHT, False, BF16), (1, 8192, 8192, _PREFILL_WEIGHT, True, BF16),
                (5, 1088, 1000, _PREFILL_WEIGHT, True, BF16), (7, 1000, 1088, _PREFILL_WEIGHT, False, F16),
                (2, 2048, 1024, _FORMATS[0], False, F16), (4, 2048, 1024, _FORMATS[1], True, F32),
                (9, 512, 768, _FORMATS[2], False, F32)]


@pytest.mark.parametrize("m,k,n,weight_args,transposed,dtype", DECODE_CASES)
def test_decode_kernel(key, m, k, n, weight_args, transposed, dtype):
    _check(key, lambda x, q, p: qmatmul_decode.qmatmul_decode(x, q, precision=p), m, k, n, weight_args,
           transposed, dtype)


TRITON_CASES = [(17, 1000, 1088, _PREFILL_WEIGHT, False, F32), (100, 1088, 1000, _PREFILL_WEIGHT, True, BF16),
                (256, 4096, 4096, _PREFILL_WEIGHT, True, BF16), (64, 2048, 1024, _FORMATS[0], False, F16),
                (300, 1024, 2048, _FORMATS[3], True, BF16)]


@pytest.mark.parametrize("m,k,n,weight_args,transposed,dtype", TRITON_CASES)
def test_triton_kernel(key, m, k, n, weight_args, transposed, dtype):
    _check(key, lambda x, q, p: qmatmul_triton.qmatmul_triton(x, q, precision=p), m, k, n, weight_args,
           transposed, dtype)


@pytest.mark.parametrize("transposed", [True, False])
def test_shipped_triton_and_decode_configs(key, transposed):
    """The other shipped configs: the 128-tile GEMM, and the select-tree decode with the XLA prologue."""
    k1, k2, k3 = jax.random.split(key, 3)
    big = qmatmul_triton.TritonConfig(128, 128, 64, 8, 3)
    tree = _tiles.Decode(table=False, nested=False)
    _check(k1, lambda x, q, p: qmatmul_triton.qmatmul_triton(x, q, config=big), 512, 4096, 4096,
           _PREFILL_WEIGHT, transposed, BF16)
    _check(k2, lambda x, q, p: qmatmul_triton.qmatmul_triton(x, q, config=qmatmul_triton.TritonConfig(decode=tree)),
           96, 2048, 2048, _PREFILL_WEIGHT, transposed, BF16)
    _check(k3, lambda x, q, p: qmatmul_decode.qmatmul_decode(x, q, config=qmatmul_decode.DecodeConfig(decode=tree)),
           8, 2048, 2048, _PREFILL_WEIGHT, transposed, BF16)


# Every config tests/test_kernels.py lowers, run: (m, config, transposed).
MOSAIC_CONFIGS = [(256, qmatmul_mosaic.MosaicConfig(), True), (256, qmatmul_mosaic.MosaicConfig(), False),
                  (2048, qmatmul_mosaic.MosaicConfig(block_n=64, block_m=256), True),
                  (100, qmatmul_mosaic.MosaicConfig(block_n=128, block_m=64), True),
                  (100, qmatmul_mosaic.MosaicConfig(block_n=128, block_m=64), False),
                  (100, qmatmul_mosaic.MosaicConfig(block_n=64, block_m=64), True),
                  (256, qmatmul_mosaic.MosaicConfig(compute_wgs=1), True),
                  (256, qmatmul_mosaic.MosaicConfig(compute_wgs=1), False),
                  (2048, qmatmul_mosaic.MosaicConfig(block_n=64, block_m=256, compute_wgs=1), True),
                  (100, qmatmul_mosaic.MosaicConfig(block_n=64, block_m=64, compute_wgs=1), True)]


@needs_hopper
@pytest.mark.parametrize("m,config,transposed", MOSAIC_CONFIGS)
def test_mosaic_configs(key, m, config, transposed):
    _check(key, lambda x, q, p: qmatmul_mosaic.qmatmul_mosaic(x, q, config=config), m, 4096, 4096,
           _PREFILL_WEIGHT, transposed, BF16)


@needs_hopper
@pytest.mark.parametrize("weight_args,transposed,dtype", [(_FORMATS[0], True, BF16), (_FORMATS[1], True, BF16),
                                                          (_FORMATS[3], False, BF16), (("nf4", 4096, False), True, BF16),
                                                          (_PREFILL_WEIGHT, False, F16), (_PREFILL_WEIGHT, True, F16)])
def test_mosaic_formats_and_dtypes(key, weight_args, transposed, dtype):
    _check(key, lambda x, q, p: qmatmul_mosaic.qmatmul_mosaic(x, q), 384, 4096, 4096, weight_args, transposed, dtype)


# backend="auto" over the range of M: (m, k, n, transposed).
AUTO_CASES = [(1, 8192, 8192, True), (16, 4096, 4096, True), (17, 4096, 4096, False), (256, 4096, 4096, True),
              (1024, 4096, 4096, False), (4096, 8192, 8192, True)]


@pytest.mark.parametrize("m,k,n,transposed", AUTO_CASES)
def test_auto_runs_the_kernel(key, m, k, n, transposed):
    """qmatmul(backend="auto") on the GPU is the kernel `dispatch.select` names, and matches XLA."""
    kq, kx = jax.random.split(key)
    q = weight(kq, k, n, *_PREFILL_WEIGHT, transposed=transposed)
    x = activations(kx, (m, k))
    fn = jax.jit(lambda x, q: qjax.qmatmul(x, q))
    text = fn.lower(x, q).as_text()
    custom_call = "mosaic_gpu" if dispatch.select(x.shape, q, BF16, interpret=False) == "mosaic" else "triton"
    assert custom_call in text, f"backend='auto' did not stage the {custom_call} kernel"
    assert_matmul_close(fn(x, q), qjax.qmatmul(x, q, backend="xla"), x, q, BF16)


@pytest.mark.parametrize("m", [8, 256])  # the decode kernel; Mosaic (Hopper) or Triton
def test_vmap_over_stacked_weights(key, m):
    """A per-expert layer: vmap of qmatmul over 4 stacked torch-layout weights, forward and gradient."""
    kq, kx, kg = jax.random.split(key, 3)
    q = jax.vmap(lambda k: weight(k, 1024, 2048, *_PREFILL_WEIGHT, transposed=True))(jax.random.split(kq, 4))
    x = activations(kx, (4, m, 1024))
    g = activations(kg, (4, m, 2048))
    run = lambda backend: jax.jit(jax.vmap(lambda x, q: qjax.qmatmul(x, q, backend=backend)))  # noqa: E731
    y, y_ref = run("pallas")(x, q), run("xla")(x, q)
    vjp = lambda backend: jax.vjp(lambda x: run(backend)(x, q), x)[1](g)[0]  # noqa: E731
    dx, dx_ref = vjp("pallas"), vjp("xla")
    for e in range(4):
        qe = jax.tree.map(lambda a: a[e], q)
        assert_matmul_close(y[e], y_ref[e], x[e], qe, BF16)
        assert_matmul_close(dx[e], dx_ref[e], g[e], qe.T, BF16)  # dx = g @ W^T


@pytest.mark.parametrize("m,transposed", [(4, True), (4, False), (512, True), (512, False)])
def test_gradient_matches_xla(key, m, transposed):
    """dx = dy @ W^T through the kernels on the view q.T, against the XLA path's backward."""
    kq, kx, kg = jax.random.split(key, 3)
    q = weight(kq, 2048, 4096, *_PREFILL_WEIGHT, transposed=transposed)
    x = activations(kx, (m, 2048))
    g = activations(kg, (m, 4096))
    vjp = lambda backend: jax.jit(lambda x, g: jax.vjp(  # noqa: E731
        lambda x: qjax.qmatmul(x, q, backend=backend), x)[1](g)[0])(x, g)
    assert_matmul_close(vjp("pallas"), vjp("xla"), g, q.T, BF16)
