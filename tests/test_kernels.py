"""Pallas kernels (qjax.kernels): interpret mode and the Mosaic emulation against the jnp reference,
qmatmul(backend="pallas") forward/backward, and CUDA lowering of every shipped kernel configuration.

What is proven how (no GPU here): the Triton-backend kernels (GEMM, decode) run their real
kernel bodies in Pallas interpret mode; the Mosaic GPU kernel (both layouts) cannot be interpreted
(TMA copies have no discharge rule), so its schedule is checked through `emulate` (the same
decode functions, tiles, even/odd split and absmax rows in jnp) and its kernel body through lowering to Mosaic GPU for CUDA, which
checks layouts, swizzles and shared memory. None of this measures or runs anything on a GPU.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from helpers import DTYPES, random_weights
from qjax.kernels import _tiles, dispatch, qmatmul_decode, qmatmul_mosaic, qmatmul_triton
from test_qmatmul import assert_matmul_close

_DISABLED = [jax.export.DisabledSafetyCheck.custom_call(n) for n in ("__gpu$xla.gpu.triton", "mosaic_gpu_v2")]


def _q(rng, shape, fmt="nf4", blocksize=64, double_quant=False, transposed=False, dtype="float32"):
    w = random_weights(rng, shape, dtype)
    return qjax.quantize(jnp.asarray(w), fmt, blocksize=blocksize, double_quant=double_quant,
                         transposed=transposed)


def _x(rng, shape, dtype="float32"):
    return jnp.asarray(rng.standard_normal(shape), DTYPES[dtype])


# ----------------------------------------------------------------------------- interpret mode

# (K, N, transposed): tails in M, N and K for 32-wide tiles; every case is a structured layout.
TRITON_CASES = [(96, 128, False), (50, 192, False), (128, 80, True), (64, 33, True)]


@pytest.mark.parametrize("fmt,blocksize,double_quant", [("nf4", 64, False), ("fp4", 32, True), ("int8", 64, False)])
@pytest.mark.parametrize("k,n,transposed", TRITON_CASES)
def test_triton_interpret(rng, fmt, blocksize, double_quant, k, n, transposed):
    q = _q(rng, (k, n), fmt, blocksize, double_quant, transposed)
    x = _x(rng, (37, k))
    cfg = qmatmul_triton.TritonConfig(block_m=32, block_n=32, block_k=32)
    y = qmatmul_triton.qmatmul_triton(x, q, config=cfg, interpret=True)
    assert_matmul_close(y, x, q, jnp.float32)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kernel", ["triton", "decode"])
def test_select_tree_and_prologue_decode(rng, transposed, kernel):
    """Decode(table=False, nested=False): codes through the select tree, absmax from the XLA prologue."""
    q = _q(rng, (128, 192), "nf4", 64, True, transposed)
    decode = _tiles.Decode(table=False, nested=False)
    if kernel == "triton":
        x = _x(rng, (20, 128))
        cfg = qmatmul_triton.TritonConfig(32, 32, 64, decode=decode)
        y = qmatmul_triton.qmatmul_triton(x, q, config=cfg, interpret=True)
    else:
        x = _x(rng, (3, 128))
        cfg = qmatmul_decode.DecodeConfig(32, 64, split_k=2, decode=decode)
        y = qmatmul_decode.qmatmul_decode(x, q, config=cfg, interpret=True)
    assert_matmul_close(y, x, q, jnp.float32)


def test_weight_operands_move_only_the_stored_bytes(rng):
    q = _q(rng, (256, 128), "nf4", 64, True, True)
    ops = _tiles.weight_operands(q, _tiles.Decode())
    assert ops[1] is q.absmax and ops[1].dtype == jnp.uint8  # absmax stays 8-bit, decoded in the kernel
    assert sum(o.nbytes for o in ops) < q.nbytes + 1100  # + the 16- and 256-entry tables
    ops = _tiles.weight_operands(q, _tiles.Decode(table=False, nested=False))
    assert ops[1].dtype == jnp.float32 and len(ops) == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_interpret_half(rng, dtype):
    q = _q(rng, (64, 96), "nf4", 64, True, True, dtype)
    x = _x(rng, (2, 20, 64), dtype)
    y = qmatmul_triton.qmatmul_triton(x, q, config=qmatmul_triton.TritonConfig(32, 32, 64), interpret=True)
    assert y.shape == (2, 20, 96) and y.dtype == DTYPES[dtype]
    assert_matmul_close(y.reshape(40, 96), x.reshape(40, 64), q, DTYPES[dtype])
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(qmatmul_triton.reference(x, q), np.float32),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("fmt,double_quant,transposed", [("nf4", True, True), ("fp4", False, False),
                                                         ("int8", False, True)])
def test_decode_interpret(rng, m, fmt, double_quant, transposed):
    q = _q(rng, (160, 96), fmt, 32, double_quant, transposed)
    x = _x(rng, (m, 160))
    cfg = qmatmul_decode.DecodeConfig(block_n=32, block_k=64, split_k=2)
    assert_matmul_close(qmatmul_decode.qmatmul_decode(x, q, config=cfg, interpret=True), x, q, jnp.float32)


def test_decode_auto_split(rng):
    cfg = qmatmul_decode.DecodeConfig()
    assert cfg.splits(4096, 4096) == 9  # 32 strips x 9 splits ~ 2 waves on 132 SMs
    assert cfg.splits(256, 4096) == 1
    assert qmatmul_decode.DecodeConfig(split_k=64).splits(512, 64) == 2


@pytest.mark.parametrize("fmt,blocksize,double_quant", [("nf4", 64, False), ("fp4", 32, True), ("int8", 128, False),
                                                        ("nf4", 256, True)])
@pytest.mark.parametrize("m", [70])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("compute_wgs", [1, 2])
def test_mosaic_schedule_emulated(rng, fmt, blocksize, double_quant, m, transposed, compute_wgs):
    q = _q(rng, (256, 256), fmt, blocksize, double_quant, transposed, "bfloat16")
    x = _x(rng, (m, 256), "bfloat16")
    config = qmatmul_mosaic.MosaicConfig(block_n=64 if transposed else 128, block_m=64, compute_wgs=compute_wgs)
    y = qmatmul_mosaic.emulate(x, q, config=config)
    assert_matmul_close(y, x, q, jnp.bfloat16)


def test_mosaic_rejects_what_it_cannot_take(rng):
    x = _x(rng, (32, 128), "bfloat16")
    with pytest.raises(ValueError, match="plain .* needs block_n=128"):
        qmatmul_mosaic.check(x.shape, _q(rng, (128, 128)), jnp.bfloat16, qmatmul_mosaic.MosaicConfig(block_n=64))
    with pytest.raises(ValueError, match="K=96 to be a multiple of 64"):
        qmatmul_mosaic.check((32, 96), _q(rng, (96, 128)), jnp.bfloat16)
    with pytest.raises(ValueError, match="tf32"):
        qmatmul_mosaic.check(x.shape, _q(rng, (128, 128), transposed=True), jnp.float32)
    with pytest.raises(ValueError, match="N=96 must be a multiple of block_n=128"):
        qmatmul_mosaic.check(x.shape, _q(rng, (128, 96), transposed=True), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_m=48"):
        qmatmul_mosaic.MosaicConfig(block_m=48).validate()
    with pytest.raises(ValueError, match="compute_wgs=3 must be 1 or 2"):
        qmatmul_mosaic.MosaicConfig(compute_wgs=3).validate()
    with pytest.raises(ValueError, match=r"\(128, 256\) float32 accumulator takes 256 .* would spill"):
        qmatmul_mosaic.MosaicConfig(block_n=128, block_m=256).validate()
    with pytest.raises(ValueError, match="N=384 must be a multiple of block_n=128 x compute_wgs=2"):
        qmatmul_mosaic.check(x.shape, _q(rng, (128, 384), transposed=True), jnp.bfloat16,
                             qmatmul_mosaic.MosaicConfig(compute_wgs=2))
    spec = qmatmul_mosaic.check(x.shape, _q(rng, (128, 384), transposed=True), jnp.bfloat16)  # N % 256 != 0
    assert qmatmul_mosaic.default_config(spec).compute_wgs == 1
    with pytest.raises(ValueError, match="block_k=24 must be a power of two"):
        qmatmul_triton.TritonConfig(block_k=24).validate()
    with pytest.raises(ValueError, match="at most 16 rows"):
        qmatmul_decode.qmatmul_decode(x, _q(rng, (128, 64)), interpret=True)


def test_dispatch_selection(rng):
    q = _q(rng, (128, 128), transposed=True, dtype="bfloat16")
    assert dispatch.select((4, 128), q, jnp.bfloat16, interpret=True) == "decode"
    assert dispatch.select((2, 9, 128), q, jnp.bfloat16, interpret=True) == "triton"
    assert dispatch.adjoint_view(_q(rng, (64, 32), "int8", None)) is None


@pytest.mark.parametrize("m", [3, 40])
def test_qmatmul_pallas_forward_and_grad(rng, m):
    q = _q(rng, (64, 96), "nf4", 64, True, True)
    x = _x(rng, (m, 64))
    w = qjax.dequantize(q)
    f = lambda x: jnp.sum(jnp.sin(qjax.qmatmul(x, q, backend="pallas", interpret=True)))
    y = qjax.qmatmul(x, q, backend="pallas", interpret=True)
    assert_matmul_close(y, x, q, jnp.float32)
    g = jax.jit(jax.grad(f))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.matmul(x, w, precision="highest"))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(g_ref).max()))


def test_qmatmul_pallas_vmap(rng):
    q = _q(rng, (64, 64), "fp4", 64, False, False)
    x = _x(rng, (3, 2, 64))
    y = jax.vmap(lambda xi: qjax.qmatmul(xi, q, backend="pallas", interpret=True))(x)
    assert_matmul_close(y.reshape(6, 64), x.reshape(6, 64), q, jnp.float32)


def _kernel_dot_precisions(fn, *args):
    """The `precision` of every dot_general inside the pallas_calls of fn's jaxpr."""
    found = []

    def walk(jaxpr, in_kernel):
        for eqn in jaxpr.eqns:
            if in_kernel and eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for param in eqn.params.values():
                for v in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(v, "jaxpr", v)
                    if hasattr(inner, "eqns"):
                        walk(inner, in_kernel or eqn.primitive.name == "pallas_call")

    walk(jax.make_jaxpr(fn)(*args).jaxpr, False)
    return found


@pytest.mark.parametrize("m", [2, 40])  # the decode kernel, the Triton GEMM
def test_precision_reaches_the_kernel_dot(rng, m):
    q = _q(rng, (64, 96), "nf4", 64, True, True)
    x = _x(rng, (m, 64))
    highest = lambda x: qjax.qmatmul(x, q, backend="pallas", interpret=True, precision="highest")  # noqa: E731
    default = lambda x: qjax.qmatmul(x, q, backend="pallas", interpret=True)  # noqa: E731
    hi, lo = _kernel_dot_precisions(highest, x), _kernel_dot_precisions(default, x)
    assert hi and all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in hi), hi
    assert lo and all(p is None for p in lo), lo
    assert_matmul_close(highest(x), x, q, jnp.float32)


@pytest.mark.parametrize("m", [5, 40])  # the decode kernel, the Triton GEMM
def test_qmatmul_pallas_vmap_over_stacked_weights(rng, m):
    """Per-expert layers vmap qmatmul over a stack of weights: forward and gradient."""
    w = jnp.asarray(random_weights(rng, (3, 64, 128), "float32"))
    q = jax.lax.map(lambda a: qjax.quantize(a, "nf4", double_quant=True), w)
    x = _x(rng, (3, m, 64))
    f = jax.vmap(lambda x, q: qjax.qmatmul(x, q, backend="pallas", interpret=True))
    dense = qjax.dequantize(q)
    ref = lambda x: jnp.einsum("emk,ekn->emn", x, dense, precision="highest")  # noqa: E731
    y = f(x, q)
    for e in range(3):
        assert_matmul_close(y[e], x[e], jax.tree.map(lambda a: a[e], q), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(f(x, q))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(ref(x))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(g_ref).max()))


# ----------------------------------------------------------------------------- CUDA lowering


def _lower(fn, x_shape, q_shape, fmt, blocksize, double_quant, transposed, dtype=jnp.bfloat16):
    q = jax.eval_shape(lambda w: qjax.quantize(w, fmt, blocksize=blocksize, double_quant=double_quant,
                                               transposed=transposed), jax.ShapeDtypeStruct(q_shape, dtype))
    x = jax.ShapeDtypeStruct(x_shape, dtype)
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=_DISABLED)(x, q)
    return exported.mlir_module()


WEIGHTS = [("nf4", 64, True, True), ("nf4", 64, False, False), ("fp4", 32, False, True), ("int8", 128, False, False)]


@pytest.mark.parametrize("fmt,blocksize,double_quant,transposed", WEIGHTS)
@pytest.mark.parametrize("config", [qmatmul_triton.TritonConfig(),
                                    qmatmul_triton.TritonConfig(128, 128, 64, 8, 3),
                                    qmatmul_triton.TritonConfig(decode=_tiles.Decode(table=False, nested=False))])
def test_triton_lowers_for_cuda(fmt, blocksize, double_quant, transposed, config):
    text = _lower(lambda x, q: qmatmul_triton.qmatmul_triton(x, q, config=config), (256, 4096), (4096, 4096),
                  fmt, blocksize, double_quant, transposed)
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("kernel,m", [(qmatmul_triton.qmatmul_triton, 256), (qmatmul_decode.qmatmul_decode, 16)])
@pytest.mark.parametrize("precision", [None, jax.lax.Precision.HIGHEST])
def test_float32_lowers_for_cuda(kernel, m, precision):
    """float32 operands: TF32 dots by default, IEEE float32 with precision=HIGHEST."""
    text = _lower(lambda x, q: kernel(x, q, precision=precision), (m, 4096), (4096, 4096), "nf4", 64, True, True,
                  dtype=jnp.float32)
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("fmt,blocksize,double_quant,transposed", WEIGHTS)
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("config", [qmatmul_decode.DecodeConfig(),
                                    qmatmul_decode.DecodeConfig(decode=_tiles.Decode(table=False, nested=False))])
def test_decode_lowers_for_cuda(fmt, blocksize, double_quant, transposed, m, config):
    text = _lower(lambda x, q: qmatmul_decode.qmatmul_decode(x, q, config=config), (m, 4096), (4096, 4096),
                  fmt, blocksize, double_quant, transposed)
    assert "__gpu$xla.gpu.triton" in text


MOSAIC_CONFIGS = [(256, qmatmul_mosaic.MosaicConfig()),  # two compute warpgroups (the default at N % 256 == 0)
                  (2048, qmatmul_mosaic.MosaicConfig(block_n=64, block_m=256)),
                  (100, qmatmul_mosaic.MosaicConfig(block_n=128, block_m=64)),
                  (100, qmatmul_mosaic.MosaicConfig(block_n=64, block_m=64)),  # transposed weights only
                  (256, qmatmul_mosaic.MosaicConfig(compute_wgs=1)),  # one compute warpgroup (N % 256 != 0)
                  (2048, qmatmul_mosaic.MosaicConfig(block_n=64, block_m=256, compute_wgs=1)),
                  (100, qmatmul_mosaic.MosaicConfig(block_n=64, block_m=64, compute_wgs=1))]


@pytest.mark.parametrize("fmt,blocksize,double_quant", [("nf4", 64, True), ("fp4", 32, False), ("int8", 64, False),
                                                        ("nf4", 4096, False)])
@pytest.mark.parametrize("m,config,transposed", [(m, c, t) for m, c in MOSAIC_CONFIGS for t in (True, False)
                                                  if t or c.block_n == 128])  # plain weights: block_n=128
def test_mosaic_lowers_for_cuda(fmt, blocksize, double_quant, m, config, transposed):
    text = _lower(lambda x, q: qmatmul_mosaic.qmatmul_mosaic(x, q, config=config), (m, 4096), (4096, 4096),
                  fmt, blocksize, double_quant, transposed)
    assert "mosaic_gpu" in text


def test_mosaic_lowers_largest_footprint():
    """The largest shared-memory footprint of the shipped configs: transposed int8 with a 128-wide K
    step, block_m=256 (three steps in flight would pass the H100's 227 KiB; the lowering raises)."""
    config = qmatmul_mosaic.MosaicConfig(block_n=64, block_m=256)
    text = _lower(lambda x, q: qmatmul_mosaic.qmatmul_mosaic(x, q, config=config), (2048, 4096), (4096, 4096),
                  "int8", 128, False, True)
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("transposed", [True, False])
def test_mosaic_lowers_float16(transposed):
    text = _lower(lambda x, q: qmatmul_mosaic.qmatmul_mosaic(x, q), (256, 4096), (4096, 4096),
                  "nf4", 64, True, transposed, jnp.float16)
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("kernel,m", [(qmatmul_decode.qmatmul_decode, 8), (qmatmul_triton.qmatmul_triton, 256),
                                      (qmatmul_mosaic.qmatmul_mosaic, 256)])
def test_kernels_lower_under_vmap_over_experts(kernel, m):
    """A per-expert layer's vmap adds a grid axis to every kernel; each still lowers for CUDA."""
    q = jax.eval_shape(lambda w: jax.lax.map(lambda a: qjax.quantize(a, "nf4", double_quant=True, transposed=True), w),
                       jax.ShapeDtypeStruct((4, 1024, 1024), jnp.bfloat16))
    x = jax.ShapeDtypeStruct((4, m, 1024), jnp.bfloat16)
    text = jax.export.export(jax.jit(jax.vmap(kernel)), platforms=["cuda"], disabled_checks=_DISABLED)(x, q).mlir_module()
    assert "mosaic_gpu" in text or "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("transposed", [True, False])
def test_mosaic_lowers_without_deprecation(transposed):
    """plgpu.kernel, not the deprecated pl.pallas_call path: no DeprecationWarning at lowering."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        text = _lower(lambda x, q: qmatmul_mosaic.qmatmul_mosaic(x, q), (256, 4096), (4096, 4096),
                      "nf4", 64, False, transposed)
    assert "mosaic_gpu" in text
