"""Fused dequantize-matmul for Hopper on the Mosaic GPU backend (TMA + wgmma): prefill/training shapes.

Design. The weight is consumed in torch's `(out, in)` = `(N, K)` storage (a transposed
QuantizedArray, as bitsandbytes/PEFT checkpoints hold it), which is exactly the shape wgmma
wants for a *register* left operand. Each CTA owns an output tile and computes its transpose:

    acc (block_n, block_m) += decode(W^T tile) (block_n, tk) @ x^T tile (tk, block_m)

  - TMA streams, per K step, the packed codes (block_n, tk / 2) uint8, the matching x tiles and
    one float32 absmax per weight row (the decoded statistics, transposed to (K / bs, N) so a
    step reads one contiguous row), double-buffered by `plgpu.emit_pipeline`.
  - Codes are decoded in registers: the high nibble of byte j is element 2j, the low nibble
    element 2j + 1, so instead of interleaving registers the kernel splits the contraction into
    even and odd k: x is de-interleaved once outside (x[:, 0::2], x[:, 1::2]) and each step
    issues two wgmmas, `decode(hi) @ x_even^T` and `decode(lo) @ x_odd^T`. Decoding is a shift,
    a mask, a 15-select tree over the codebook and one multiply by the row's absmax (broadcast
    along K), rounded once to bf16/f16: the same numbers as `qjax.dequantize`.
  - int8 (blockwise) needs no split: one wgmma per step on `codes * absmax / 127`.
  - The (block_n, block_m) float32 accumulator is stored transposed ((N, M) output), and the
    wrapper transposes it back; M is padded to block_m with zero rows.

Each K step stays inside one quantization block (tk <= blocksize), so a step needs one absmax
per row. Limits, checked with clear errors: bf16/f16 compute (wgmma f32 would be tf32, not the
oracle's numbers), a transposed structured weight, N a multiple of block_n.

Mosaic GPU kernels do not run in Pallas interpret mode (no discharge rule for TMA copies), so
this file also has `emulate`, a jnp transcription of the kernel's schedule (same tiles, same
even/odd split, same decode function, same per-step absmax row), which the tests run on the CPU;
the kernel itself is checked by lowering it for CUDA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from qjax._src.codes import lookup
from qjax._src.qarray import QuantizedArray
from qjax.kernels import _tiles
from qjax.kernels._tiles import reference  # noqa: F401  (the jnp oracle, beside the kernel)

_HALF_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """block_n: 64 or 128 (wgmma M, rows of W^T); block_m: 64, 128 or 256 (wgmma N, rows of x)."""

    block_n: int = 128
    block_m: int = 128
    max_concurrent_steps: int = 2

    def validate(self) -> None:
        problems = []
        if self.block_n not in (64, 128):
            problems.append(f"block_n={self.block_n} must be 64 or 128")
        if self.block_m not in (64, 128, 256):
            problems.append(f"block_m={self.block_m} must be 64, 128 or 256")
        if self.max_concurrent_steps < 1:
            problems.append(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1")
        if problems:
            raise ValueError(f"Invalid {self!r}: " + "; ".join(problems))


def step_k(spec: _tiles.WeightSpec) -> int:
    """Elements of K one pipeline step covers: at most one quantization block, at most 128."""
    return min(spec.blocksize, 128)


def decode_step(codes, absmax_row, spec: _tiles.WeightSpec, dtype):
    """One step's W^T parts in registers: codes (tn, tk / parts), absmax (tn,) -> tuple of (tn, tk / parts).

    4-bit: (values of the high nibbles = even k, values of the low nibbles = odd k); int8: (values,).
    """
    c = codes.astype(jnp.int32)  # Mosaic GPU does arithmetic on 16/32-bit types only
    am = jax.lax.broadcast_in_dim(absmax_row, c.shape, (0,))
    if spec.bits == 8:
        return (_tiles.scale(c.astype(jnp.float32), am, spec, dtype),)
    return tuple(_tiles.scale(lookup(nib, spec.code), am, spec, dtype) for nib in (c >> 4, c & 0xF))


def _transforms(row_bytes: int, itemsize: int):
    if row_bytes < 32:  # TMA swizzles 32/64/128-byte rows; a 16-byte codes row (blocksize 32) goes plain
        return ()
    swizzle = plgpu.find_swizzle(row_bytes * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel(codes_gmem, absmax_gmem, *refs, spec, cfg: MosaicConfig, dtype):
    *x_gmems, o_smem, acc = refs
    parts = len(x_gmems)
    tn, tm = cfg.block_n, cfg.block_m
    tkp = step_k(spec) // parts  # columns of codes / of each x part per step
    steps_per_block = spec.blocksize // step_k(spec)
    n = pl.program_id(0)
    m = pl.program_id(1)
    itemsize = np.dtype(dtype).itemsize

    def step(_, codes_smem, absmax_smem, *x_smems):
        ws = decode_step(codes_smem[...], absmax_smem[...], spec, dtype)
        for w, x_smem in zip(ws, x_smems):
            plgpu.wgmma(acc, w, plgpu.transpose_ref(x_smem, (1, 0)))
        plgpu.wgmma_wait(0)

    x_spec = plgpu.BlockSpec((tm, tkp), lambda s: (m, s), transforms=_transforms(tkp * itemsize, itemsize))
    plgpu.emit_pipeline(
        step,
        grid=(spec.k // step_k(spec),),
        in_specs=[plgpu.BlockSpec((tn, tkp), lambda s: (n, s), transforms=_transforms(tkp, 1)),
                  plgpu.BlockSpec((None, tn), lambda s: (s // steps_per_block, n))] + [x_spec] * parts,
        max_concurrent_steps=cfg.max_concurrent_steps,
    )(codes_gmem, absmax_gmem, *x_gmems)
    o_smem[...] = acc[...].astype(o_smem.dtype)


def _operands(x2, q: QuantizedArray, spec, tm: int):
    """Pads M to tm, splits x into its even/odd K columns (4-bit), transposes the decoded absmax."""
    m = x2.shape[0]
    mp = _tiles.num_tiles(m, tm) * tm
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    parts = (x2[:, 0::2], x2[:, 1::2]) if spec.bits == 4 else (x2,)
    codes, absmax = _tiles.storage_operands(q)
    return codes, absmax.T, parts  # absmax: (N, K / bs) -> (K / bs, N)


@functools.partial(jax.jit, static_argnames=("spec", "cfg", "dtype"))
def _call(x2, q, *, spec, cfg, dtype):
    m = x2.shape[0]
    codes, absmax_t, parts = _operands(x2, q, spec, cfg.block_m)
    mp = parts[0].shape[0]
    gmem = pl.BlockSpec(memory_space=plgpu.GMEM)
    out_t = pl.pallas_call(
        functools.partial(_kernel, spec=spec, cfg=cfg, dtype=dtype),
        grid=(spec.n // cfg.block_n, mp // cfg.block_m),
        in_specs=[gmem] * (2 + len(parts)),
        out_specs=plgpu.BlockSpec((cfg.block_n, cfg.block_m), lambda n, m: (n, m),
                                  transforms=_transforms(cfg.block_m * dtype.itemsize, dtype.itemsize)),
        out_shape=jax.ShapeDtypeStruct((spec.n, mp), dtype),
        scratch_shapes=[plgpu.ACC((cfg.block_n, cfg.block_m), jnp.float32)],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        name=f"qmatmul_mosaic_{spec.format}",
    )(codes, absmax_t, *parts)
    return out_t[:, :m].T


def check(x_shape, q: QuantizedArray, dtype, config: MosaicConfig | None = None) -> _tiles.WeightSpec:
    """Validates the operands for the Mosaic GPU kernel; raises ValueError naming what it cannot take."""
    spec = _tiles.weight_spec(x_shape, q, dtype, "qmatmul_mosaic")
    cfg = config or MosaicConfig()
    cfg.validate()
    problems = []
    if np.dtype(dtype) not in _HALF_DTYPES:
        problems.append(f"compute dtype {np.dtype(dtype).name} is not bfloat16/float16 (wgmma would use tf32)")
    if not spec.transposed:
        problems.append("the weight must be stored transposed ((N, K), torch order; quantize(..., "
                        "transposed=True) or a bitsandbytes import); plain (K, N) weights use qmatmul_triton")
    if spec.n % cfg.block_n:
        problems.append(f"N={spec.n} must be a multiple of block_n={cfg.block_n}")
    if problems:
        raise ValueError(f"qmatmul_mosaic cannot take x shape={tuple(x_shape)} with {q!r}: " + "; ".join(problems))
    return spec


def qmatmul_mosaic(x, q: QuantizedArray, *, compute_dtype=None, config: MosaicConfig | None = None) -> jax.Array:
    """`x @ dequantize(q)` through the Hopper Mosaic GPU kernel (needs an sm_90 GPU to run).

    x: (..., K) float array, cast to compute_dtype (bfloat16 or float16; default x.dtype).
    q: transposed structured QuantizedArray (nf4/fp4 with or without double quant, blockwise
    int8), logical (K, N), N a multiple of block_n. Returns (..., N) in compute_dtype.
    Raises ValueError for anything else (see `check`).
    """
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    cfg = config or MosaicConfig()
    spec = check(np.shape(x), q, dtype, cfg)
    x2, lead = _tiles.flatten_x(jnp.asarray(x), spec.k, dtype)
    return _call(x2, q, spec=spec, cfg=cfg, dtype=dtype).reshape(lead + (spec.n,))


def emulate(x, q: QuantizedArray, *, compute_dtype=None, config: MosaicConfig | None = None) -> jax.Array:
    """The kernel's schedule in jnp (runs anywhere): same tiles, split, decode and absmax rows.

    Only the data movement (TMA, SMEM, wgmma) is replaced: each step's two (or one) products are
    float32-accumulated dots. Used by the tests as the CPU check of the kernel's indexing.
    """
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    cfg = config or MosaicConfig()
    spec = check(np.shape(x), q, dtype, cfg)
    x2, lead = _tiles.flatten_x(jnp.asarray(x), spec.k, dtype)
    m = x2.shape[0]
    codes, absmax_t, parts = _operands(x2, q, spec, cfg.block_m)
    tn, tm, tk = cfg.block_n, cfg.block_m, step_k(spec)
    tkp = tk // len(parts)
    steps_per_block = spec.blocksize // tk
    mp = parts[0].shape[0]
    out_t = jnp.zeros((spec.n, mp), dtype)
    for n in range(spec.n // tn):
        for mi in range(mp // tm):
            acc = jnp.zeros((tn, tm), jnp.float32)
            for s in range(spec.k // tk):
                c = codes[n * tn:(n + 1) * tn, s * tkp:(s + 1) * tkp]
                am = absmax_t[s // steps_per_block, n * tn:(n + 1) * tn]
                for w, xp in zip(decode_step(c, am, spec, dtype), parts):
                    xt = xp[mi * tm:(mi + 1) * tm, s * tkp:(s + 1) * tkp]
                    acc = acc + jnp.dot(w, xt.T, preferred_element_type=jnp.float32)
            out_t = out_t.at[n * tn:(n + 1) * tn, mi * tm:(mi + 1) * tm].set(acc.astype(dtype))
    return out_t[:, :m].T.reshape(lead + (spec.n,))
