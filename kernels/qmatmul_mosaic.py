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
per row.

A plain `(K, N)` weight (quantized from a JAX `(in, out)` kernel, and the backward pass of a
torch-ordered one) is packed along N, so its decoded tile is the *right* wgmma operand, which
must live in shared memory: each K step (64 rows) decodes the codes tile in registers into its
even-column and odd-column halves, stores both as bf16/f16 into swizzled SMEM, fences, and
issues `x tile @ half` into two accumulators (the even and odd output columns, interleaved by
the wrapper). The absmax, transposed to (N / bs, K), gives each block of columns its row; a
column iota selects between them when a tile spans several blocks.

Limits, checked with clear errors: bf16/f16 compute (wgmma f32 would be tf32, not the oracle's
numbers), a structured weight, N a multiple of block_n (plain layout: block_n = 128 and K a
multiple of 64).

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


def decode_parts(codes, absmax, spec: _tiles.WeightSpec, dtype):
    """A codes tile (r, c) and its absmax broadcast to (r, c) -> the decoded parts, each (r, c).

    4-bit: (values of the high nibbles, values of the low nibbles), i.e. the even and odd
    elements along the packed axis; int8: (values,). Same numbers as `qjax.dequantize`.
    """
    c = codes.astype(jnp.int32)  # Mosaic GPU does arithmetic on 16/32-bit types only
    if spec.bits == 8:
        return (_tiles.scale(c.astype(jnp.float32), absmax, spec, dtype),)
    return tuple(_tiles.scale(lookup(nib, spec.code), absmax, spec, dtype) for nib in (c >> 4, c & 0xF))


def decode_step(codes, absmax_row, spec: _tiles.WeightSpec, dtype):
    """Transposed layout: codes (tn, tk / parts), one absmax per row (tn,) -> the W^T parts."""
    return decode_parts(codes, jax.lax.broadcast_in_dim(absmax_row, codes.shape, (0,)), spec, dtype)


def column_absmax(absmax_rows, shape, block_cols: int, blocks: int):
    """Plain layout: absmax rows (blocks, r), one per run of `block_cols` columns -> (r, c)."""
    am = jax.lax.broadcast_in_dim(absmax_rows[0], shape, (0,))
    if blocks > 1:
        col = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        for b in range(1, blocks):
            am = jnp.where(col >= b * block_cols, jax.lax.broadcast_in_dim(absmax_rows[b], shape, (0,)), am)
    return am


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


PLAIN_TK = 64  # K rows per step for a plain (K, N) weight


def _plain_geometry(spec: _tiles.WeightSpec, cfg: MosaicConfig):
    """(parts, width of a part, absmax rows per tile, columns of a part per absmax row)."""
    parts = 2 if spec.bits == 4 else 1
    blocks = max(1, cfg.block_n // spec.blocksize)
    return parts, cfg.block_n // parts, blocks, min(cfg.block_n, spec.blocksize) // parts


def _kernel_plain(x_gmem, codes_gmem, absmax_gmem, *refs, spec, cfg: MosaicConfig, dtype):
    parts, width, blocks, block_cols = _plain_geometry(spec, cfg)
    o_smems, accs, w_smems = refs[:parts], refs[parts:2 * parts], refs[2 * parts:]
    tm, tn, tk = cfg.block_m, cfg.block_n, PLAIN_TK
    m = pl.program_id(0)
    n = pl.program_id(1)
    itemsize = np.dtype(dtype).itemsize

    def step(_, x_smem, codes_smem, absmax_smem):
        absmax = column_absmax(absmax_smem, (tk, width), block_cols, blocks)
        for w, w_smem in zip(decode_parts(codes_smem[...], absmax, spec, dtype), w_smems):
            w_smem[...] = w
        plgpu.commit_smem()  # make the decoded tile visible to the tensor cores
        for acc, w_smem in zip(accs, w_smems):
            plgpu.wgmma(acc, x_smem, w_smem)
        plgpu.wgmma_wait(0)  # the next step overwrites w_smems

    plgpu.emit_pipeline(
        step,
        grid=(spec.k // tk,),
        in_specs=[plgpu.BlockSpec((tm, tk), lambda s: (m, s), transforms=_transforms(tk * itemsize, itemsize)),
                  plgpu.BlockSpec((tk, width), lambda s: (s, n), transforms=_transforms(width, 1)),
                  plgpu.BlockSpec((blocks, tk), lambda s: ((n * tn // spec.blocksize) // blocks, s))],
        max_concurrent_steps=cfg.max_concurrent_steps,
    )(x_gmem, codes_gmem, absmax_gmem)
    for o_smem, acc in zip(o_smems, accs):
        o_smem[...] = acc[...].astype(o_smem.dtype)


def _interleave(parts):
    """(even columns, odd columns) -> all columns; a single part is returned as is."""
    if len(parts) == 1:
        return parts[0]
    return jnp.stack(parts, axis=-1).reshape(parts[0].shape[:-1] + (2 * parts[0].shape[-1],))


@functools.partial(jax.jit, static_argnames=("spec", "cfg", "dtype"))
def _call_plain(x2, q, *, spec, cfg, dtype):
    m = x2.shape[0]
    parts, width, _, _ = _plain_geometry(spec, cfg)
    mp = _tiles.num_tiles(m, cfg.block_m) * cfg.block_m
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    codes, absmax = _tiles.storage_operands(q)
    itemsize = dtype.itemsize
    out_spec = plgpu.BlockSpec((cfg.block_m, width), lambda m, n: (m, n),
                               transforms=_transforms(width * itemsize, itemsize))
    outs = pl.pallas_call(
        functools.partial(_kernel_plain, spec=spec, cfg=cfg, dtype=dtype),
        grid=(mp // cfg.block_m, spec.n // cfg.block_n),
        in_specs=[pl.BlockSpec(memory_space=plgpu.GMEM)] * 3,
        out_specs=[out_spec] * parts,
        out_shape=[jax.ShapeDtypeStruct((mp, spec.n // parts), dtype)] * parts,
        scratch_shapes=([plgpu.ACC((cfg.block_m, width), jnp.float32)] * parts
                        + [plgpu.SMEM((PLAIN_TK, width), dtype, transforms=_transforms(width * itemsize, itemsize))]
                        * parts),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        name=f"qmatmul_mosaic_plain_{spec.format}",
    )(x2, codes, absmax.T)  # absmax: (K, N / bs) -> (N / bs, K), a row per block of columns
    return _interleave(outs)[:m]


def check(x_shape, q: QuantizedArray, dtype, config: MosaicConfig | None = None) -> _tiles.WeightSpec:
    """Validates the operands for the Mosaic GPU kernel; raises ValueError naming what it cannot take."""
    spec = _tiles.weight_spec(x_shape, q, dtype, "qmatmul_mosaic")
    cfg = config or MosaicConfig()
    cfg.validate()
    problems = []
    if np.dtype(dtype) not in _HALF_DTYPES:
        problems.append(f"compute dtype {np.dtype(dtype).name} is not bfloat16/float16 (wgmma would use tf32)")
    if not spec.transposed:
        if cfg.block_n != 128:
            problems.append(f"a plain (K, N) weight needs block_n=128, got block_n={cfg.block_n}")
        if spec.k % PLAIN_TK:
            problems.append(f"a plain (K, N) weight needs K={spec.k} to be a multiple of {PLAIN_TK}")
    if spec.n % cfg.block_n:
        problems.append(f"N={spec.n} must be a multiple of block_n={cfg.block_n}")
    if problems:
        raise ValueError(f"qmatmul_mosaic cannot take x shape={tuple(x_shape)} with {q!r}: " + "; ".join(problems))
    return spec


def qmatmul_mosaic(x, q: QuantizedArray, *, compute_dtype=None, config: MosaicConfig | None = None) -> jax.Array:
    """`x @ dequantize(q)` through the Hopper Mosaic GPU kernel (needs an sm_90 GPU to run).

    x: (..., K) float array, cast to compute_dtype (bfloat16 or float16; default x.dtype).
    q: structured QuantizedArray (nf4/fp4 with or without double quant, blockwise int8),
    logical (K, N), plain or transposed, N a multiple of block_n. Returns (..., N) in compute_dtype.
    Raises ValueError for anything else (see `check`).
    """
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    cfg = config or MosaicConfig()
    spec = check(np.shape(x), q, dtype, cfg)
    x2, lead = _tiles.flatten_x(jnp.asarray(x), spec.k, dtype)
    call = _call if spec.transposed else _call_plain
    return call(x2, q, spec=spec, cfg=cfg, dtype=dtype).reshape(lead + (spec.n,))


def emulate(x, q: QuantizedArray, *, compute_dtype=None, config: MosaicConfig | None = None) -> jax.Array:
    """The kernel's schedule in jnp (runs anywhere): same tiles, split, decode and absmax rows.

    Only the data movement (TMA, SMEM, wgmma) is replaced: each step's products are
    float32-accumulated dots. Used by the tests as the CPU check of the kernel's indexing.
    """
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    cfg = config or MosaicConfig()
    spec = check(np.shape(x), q, dtype, cfg)
    x2, lead = _tiles.flatten_x(jnp.asarray(x), spec.k, dtype)
    emulated = _emulate_transposed if spec.transposed else _emulate_plain
    return emulated(x2, q, spec, cfg, dtype)[: x2.shape[0]].reshape(lead + (spec.n,))


def _emulate_transposed(x2, q, spec, cfg, dtype):
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
    return out_t.T


def _emulate_plain(x2, q, spec, cfg, dtype):
    parts, width, blocks, block_cols = _plain_geometry(spec, cfg)
    tm, tn, tk = cfg.block_m, cfg.block_n, PLAIN_TK
    mp = _tiles.num_tiles(x2.shape[0], tm) * tm
    x2 = jnp.pad(x2, ((0, mp - x2.shape[0]), (0, 0)))
    codes, absmax = _tiles.storage_operands(q)
    absmax_t = absmax.T
    outs = [jnp.zeros((mp, spec.n // parts), dtype) for _ in range(parts)]
    for mi in range(mp // tm):
        for n in range(spec.n // tn):
            accs = [jnp.zeros((tm, width), jnp.float32) for _ in range(parts)]
            row0 = (n * tn // spec.blocksize) // blocks * blocks
            for s in range(spec.k // tk):
                xt = x2[mi * tm:(mi + 1) * tm, s * tk:(s + 1) * tk]
                c = codes[s * tk:(s + 1) * tk, n * width:(n + 1) * width]
                am = column_absmax(absmax_t[row0:row0 + blocks, s * tk:(s + 1) * tk], (tk, width), block_cols, blocks)
                for p, w in enumerate(decode_parts(c, am, spec, dtype)):
                    accs[p] = accs[p] + jnp.dot(xt, w, preferred_element_type=jnp.float32)
            for p in range(parts):
                outs[p] = outs[p].at[mi * tm:(mi + 1) * tm, n * width:(n + 1) * width].set(accs[p].astype(dtype))
    return _interleave(outs)
