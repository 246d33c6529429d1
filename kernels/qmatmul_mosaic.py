"""Fused dequantize-matmul for Hopper on the Mosaic GPU backend (TMA + wgmma): prefill/training shapes.

Structure (both layouts). A `plgpu.kernel` over a grid of CTAs, each CTA with
`compute_wgs + 1` warpgroups, run by `plgpu.emit_pipeline_warp_specialized`: the last warpgroup
(40 registers) only issues the TMA copies of each K step into `max_concurrent_steps` SMEM
buffers; the `compute_wgs` (1 or 2) compute warpgroups sit side by side along N, each owning
`block_n` of the CTA's output columns: each decodes only its own codes and runs its own wgmmas
into its own float32 accumulator, and all of them read the same x tile. With two, one
warpgroup's decode (CUDA cores) can overlap the other's wgmma (tensor cores). When the K loop
ends, each compute warpgroup writes its tile back through SMEM: (64, 64) tiles rounded to the
compute dtype, alternating between two SMEM slots, each copied out by TMA.

Transposed `(N, K)` storage (a transposed QuantizedArray, as bitsandbytes/PEFT checkpoints hold
it) is exactly the shape wgmma wants for a *register* left operand, so each compute warpgroup
computes its output tile transposed:

    acc (block_n, block_m) += decode(W^T tile) (block_n, tk) @ x^T tile (tk, block_m)

  - TMA streams, per K step, the packed codes (compute_wgs * block_n, tk / 2) uint8, the
    matching x tiles and one float32 absmax per weight row (the decoded statistics, transposed
    to (K / bs, N) so a step reads one contiguous row).
  - Codes are decoded in registers: the high nibble of byte j is element 2j, the low nibble
    element 2j + 1, so instead of interleaving registers the kernel splits the contraction into
    even and odd k: x is de-interleaved once outside (x[:, 0::2], x[:, 1::2]) and each step
    issues two wgmmas, `decode(hi) @ x_even^T` and `decode(lo) @ x_odd^T`. Decoding is a shift,
    a mask, a 15-select tree over the codebook and one multiply by the row's absmax (broadcast
    along K), rounded once to bf16/f16: the same numbers as `qjax.dequantize`.
  - int8 (blockwise) needs no split: one wgmma per step on `codes * absmax / 127`.
  - The output is (N, M) (the accumulator's orientation); the wrapper transposes it back. M is
    padded to block_m with zero rows.

Each K step stays inside one quantization block (tk <= blocksize), so a step needs one absmax
per row.

A plain `(K, N)` weight (quantized from a JAX `(in, out)` kernel, and the backward pass of a
torch-ordered one) is packed along N, so its decoded tile is the *right* wgmma operand, which
must live in shared memory: each K step (64 rows), a compute warpgroup decodes its (64, 128)
columns in registers into their even-column and odd-column halves, stores both as bf16/f16 into
its own swizzled SMEM tiles, fences, and issues `x tile @ half` into two accumulators (the even
and odd output columns, written to two outputs and interleaved by the wrapper). The absmax,
transposed to (N / bs, K), gives each block of columns its row; a column iota selects between
them when a tile spans several blocks.

Limits, checked with clear errors: bf16/f16 compute (wgmma f32 would be tf32, not the oracle's
numbers), a structured weight, N a multiple of compute_wgs * block_n (plain layout: block_n =
128 and K a multiple of 64). Without a config, `default_config` takes two compute warpgroups
when N % 256 == 0 and one otherwise.

Mosaic GPU kernels do not run in Pallas interpret mode (no discharge rule for TMA copies), so
this file also has `emulate`, a jnp transcription of the kernel's schedule (same CTAs and
warpgroup tiles, same even/odd split, same decode function, same per-step absmax rows), which
the tests run on the CPU; the kernel itself is checked by lowering it for CUDA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from qjax._src.core.codes import lookup
from qjax._src.core.qarray import QuantizedArray
from qjax.kernels import _tiles
from qjax.kernels._tiles import reference  # noqa: F401  (the jnp oracle, beside the kernel)

_HALF_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


# Registers a compute thread keeps free for codes, decoded values, absmax and addresses.
_DECODE_REGISTERS = 64


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiles of one compute warpgroup, and how many compute warpgroups share a CTA.

    block_n: 64 or 128 output columns per compute warpgroup (transposed weight: wgmma M, rows of
      W^T; plain weight: 128). block_m: 64, 128 or 256 rows of x per CTA (transposed: wgmma N).
    max_concurrent_steps: K steps in flight (SMEM buffers per TMA input).
    compute_wgs: 1 or 2 compute warpgroups side by side along N (a CTA covers compute_wgs *
      block_n columns), beside the one producer warpgroup that issues the TMA copies.
    """

    block_n: int = 128
    block_m: int = 128
    max_concurrent_steps: int = 2
    compute_wgs: int = 2

    def registers(self) -> int:
        """Registers a thread of a compute warpgroup gets: what the producer's 40 leave, at most 255."""
        return min(255, (512 - 40) // self.compute_wgs // 8 * 8)

    def accumulator_registers(self) -> int:
        """Registers a thread holds for its warpgroup's (block_n, block_m) float32 accumulator."""
        return self.block_n * self.block_m // 128

    def validate(self) -> None:
        problems = []
        if self.block_n not in (64, 128):
            problems.append(f"block_n={self.block_n} must be 64 or 128")
        if self.block_m not in (64, 128, 256):
            problems.append(f"block_m={self.block_m} must be 64, 128 or 256")
        if self.max_concurrent_steps < 1:
            problems.append(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1")
        if self.compute_wgs not in (1, 2):
            problems.append(f"compute_wgs={self.compute_wgs} must be 1 or 2")
        elif self.accumulator_registers() > self.registers() - _DECODE_REGISTERS:
            problems.append(f"a ({self.block_n}, {self.block_m}) float32 accumulator takes "
                            f"{self.accumulator_registers()} of a compute warpgroup's {self.registers()} registers "
                            f"a thread, leaving under {_DECODE_REGISTERS} for the decode (it would spill)")
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


EPI = 64  # the epilogue stores (EPI, EPI) output tiles: registers -> SMEM slot -> TMA
_PARAMS = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _out_smem(cfg: MosaicConfig, dtype):
    """Two epilogue slots per compute warpgroup: (compute_wgs, 2, EPI, EPI) in dtype."""
    itemsize = np.dtype(dtype).itemsize
    return plgpu.SMEM((cfg.compute_wgs, 2, EPI, EPI), dtype, transforms=_transforms(EPI * itemsize, itemsize))


def _store(tiles, slots):
    """[(tile (r, c) in registers, its out_gmem (r, c))] -> GMEM by TMA, EPI x EPI at a time.

    The epilogue tiles alternate between the two SMEM slots (2, EPI, EPI), across all outputs,
    so a slot is rewritten only once the copy before last (its previous use) has read it.
    """
    epi = [(tile, out_gmem, slice(i, i + EPI), slice(j, j + EPI)) for tile, out_gmem in tiles
           for i in range(0, tile.shape[0], EPI) for j in range(0, tile.shape[1], EPI)]
    for t, (tile, out_gmem, rows, cols) in enumerate(epi):
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        slot = slots.at[t % 2]
        slot[...] = tile[rows, cols]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(slot, out_gmem.at[rows, cols])


def _kernel(codes_gmem, absmax_gmem, *refs, spec, cfg: MosaicConfig, dtype):
    """Transposed layout; one CTA: out_t rows [n * compute_wgs * block_n, ...) x columns [m * block_m, ...).

    codes (N, K * bits / 8) uint8; absmax (K / bs, N) float32; x parts (Mp, K / parts) dtype;
    out_t (N, Mp) dtype. Compute warpgroup w owns block_n of the CTA's rows of W^T.
    """
    *x_gmems, out_gmem, out_smem = refs
    parts = len(x_gmems)
    tn, tm = cfg.block_n, cfg.block_m
    cta_n = cfg.compute_wgs * tn
    tkp = step_k(spec) // parts  # columns of codes / of each x part per step
    steps_per_block = spec.blocksize // step_k(spec)
    n, m = jax.lax.axis_index("n"), jax.lax.axis_index("m")
    itemsize = np.dtype(dtype).itemsize

    def step(_, codes_smem, absmax_smem, *x_smems_acc):
        *x_smems, acc = x_smems_acc
        rows = pl.ds(jax.lax.axis_index("wg") * tn, tn)
        ws = decode_step(codes_smem[rows], absmax_smem[rows], spec, dtype)
        for w, x_smem in zip(ws, x_smems):
            plgpu.wgmma(acc, w, plgpu.transpose_ref(x_smem, (1, 0)))
        plgpu.wgmma_wait(0)
        return acc

    def compute_context(run):
        @functools.partial(pl.run_scoped, acc=plgpu.ACC((tn, tm), jnp.float32))
        def _(acc):
            run(acc)
            wg = jax.lax.axis_index("wg")
            _store([(acc[...].astype(dtype), out_gmem.at[pl.ds(n * cta_n + wg * tn, tn), pl.ds(m * tm, tm)])],
                   out_smem.at[wg])

    x_spec = plgpu.BlockSpec((tm, tkp), lambda s: (0, s), transforms=_transforms(tkp * itemsize, itemsize),
                             memory_space=plgpu.SMEM)
    plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(spec.k // step_k(spec),),
        memory_registers=40,
        in_specs=[plgpu.BlockSpec((cta_n, tkp), lambda s: (0, s), transforms=_transforms(tkp, 1),
                                  memory_space=plgpu.SMEM),
                  plgpu.BlockSpec((None, cta_n), lambda s: (s // steps_per_block, 0), memory_space=plgpu.SMEM)]
        + [x_spec] * parts,
        wg_axis="wg",
        num_compute_wgs=cfg.compute_wgs,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )(codes_gmem.at[pl.ds(n * cta_n, cta_n)], absmax_gmem.at[:, pl.ds(n * cta_n, cta_n)],
      *(x.at[pl.ds(m * tm, tm)] for x in x_gmems))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


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
    out_t = plgpu.kernel(
        functools.partial(_kernel, spec=spec, cfg=cfg, dtype=dtype),
        out_type=jax.ShapeDtypeStruct((spec.n, mp), dtype),
        scratch_types=[_out_smem(cfg, dtype)],
        grid=(spec.n // (cfg.compute_wgs * cfg.block_n), mp // cfg.block_m),
        grid_names=("n", "m"),
        num_threads=cfg.compute_wgs + 1,
        thread_name="wg",
        compiler_params=_PARAMS,
        kernel_name=f"qmatmul_mosaic_{spec.format}",
    )(codes, absmax_t, *parts)
    return out_t[:, :m].T


PLAIN_TK = 64  # K rows per step for a plain (K, N) weight


def _plain_geometry(spec: _tiles.WeightSpec, cfg: MosaicConfig):
    """(parts, width of a part per warpgroup, absmax rows per warpgroup, columns of a part per
    absmax row, absmax rows per CTA).

    A CTA spans compute_wgs * block_n columns: one absmax row, shared by its warpgroups, when the
    blocksize covers that span; else compute_wgs * blocks rows, warpgroup w reading [w * blocks, ...).
    """
    parts = 2 if spec.bits == 4 else 1
    blocks = max(1, cfg.block_n // spec.blocksize)
    cta_rows = max(1, cfg.compute_wgs * cfg.block_n // spec.blocksize)
    return parts, cfg.block_n // parts, blocks, min(cfg.block_n, spec.blocksize) // parts, cta_rows


def _kernel_plain(x_gmem, codes_gmem, absmax_gmem, *refs, spec, cfg: MosaicConfig, dtype):
    """Plain layout; one CTA: output rows [m * block_m, ...) x columns [n * compute_wgs * block_n, ...).

    x (Mp, K) dtype; codes (K, N * bits / 8) uint8; absmax (N / bs, K) float32; outputs: parts
    (Mp, N / parts) dtype (even/odd columns for 4-bit). Compute warpgroup w owns block_n of the
    CTA's columns: it decodes them into its own SMEM tiles w_smems[p].at[w] and runs the wgmmas.
    """
    parts, width, blocks, block_cols, cta_rows = _plain_geometry(spec, cfg)
    out_gmems, (out_smem, *w_smems) = refs[:parts], refs[parts:]
    tm, tk = cfg.block_m, PLAIN_TK
    cta_w = cfg.compute_wgs * width
    m, n = jax.lax.axis_index("m"), jax.lax.axis_index("n")
    itemsize = np.dtype(dtype).itemsize

    def step(_, x_smem, codes_smem, absmax_smem, accs):
        wg = jax.lax.axis_index("wg")
        codes = codes_smem[:, pl.ds(wg * width, width)]
        rows = absmax_smem if cta_rows == 1 else absmax_smem.at[pl.ds(wg * blocks, blocks)]
        rows = [plgpu.layout_cast(rows[b], plgpu.Layout.WGMMA.reduce(1)) for b in range(blocks)]
        absmax = column_absmax(rows, (tk, width), block_cols, blocks)
        for w, w_smem in zip(decode_parts(codes, absmax, spec, dtype), w_smems):
            w_smem[wg] = w
        plgpu.commit_smem()  # make the decoded tile visible to the tensor cores
        for acc, w_smem in zip(accs, w_smems):
            plgpu.wgmma(acc, x_smem, w_smem.at[wg])
        plgpu.wgmma_wait(0)  # the next step overwrites w_smems
        return accs

    def compute_context(run):
        @functools.partial(pl.run_scoped, accs=[plgpu.ACC((tm, width), jnp.float32)] * parts)
        def _(accs):
            run(tuple(accs))
            wg = jax.lax.axis_index("wg")
            cols = pl.ds(n * cta_w + wg * width, width)
            _store([(acc[...].astype(dtype), out_gmem.at[pl.ds(m * tm, tm), cols])
                    for acc, out_gmem in zip(accs, out_gmems)], out_smem.at[wg])

    plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(spec.k // tk,),
        memory_registers=40,
        in_specs=[plgpu.BlockSpec((tm, tk), lambda s: (0, s), transforms=_transforms(tk * itemsize, itemsize),
                                  memory_space=plgpu.SMEM),
                  plgpu.BlockSpec((tk, cta_w), lambda s: (s, 0), transforms=_transforms(width, 1),
                                  memory_space=plgpu.SMEM),
                  plgpu.BlockSpec((cta_rows, tk), lambda s: (0, s), memory_space=plgpu.SMEM)],
        wg_axis="wg",
        num_compute_wgs=cfg.compute_wgs,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )(x_gmem.at[pl.ds(m * tm, tm)], codes_gmem.at[:, pl.ds(n * cta_w, cta_w)],
      absmax_gmem.at[pl.ds(n * cfg.compute_wgs * cfg.block_n // spec.blocksize, cta_rows)])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _interleave(parts):
    """(even columns, odd columns) -> all columns; a single part is returned as is."""
    if len(parts) == 1:
        return parts[0]
    return jnp.stack(parts, axis=-1).reshape(parts[0].shape[:-1] + (2 * parts[0].shape[-1],))


@functools.partial(jax.jit, static_argnames=("spec", "cfg", "dtype"))
def _call_plain(x2, q, *, spec, cfg, dtype):
    m = x2.shape[0]
    parts, width = _plain_geometry(spec, cfg)[:2]
    mp = _tiles.num_tiles(m, cfg.block_m) * cfg.block_m
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    codes, absmax = _tiles.storage_operands(q)
    itemsize = dtype.itemsize
    w_smem = plgpu.SMEM((cfg.compute_wgs, PLAIN_TK, width), dtype, transforms=_transforms(width * itemsize, itemsize))
    outs = plgpu.kernel(
        functools.partial(_kernel_plain, spec=spec, cfg=cfg, dtype=dtype),
        out_type=[jax.ShapeDtypeStruct((mp, spec.n // parts), dtype)] * parts,
        scratch_types=[_out_smem(cfg, dtype)] + [w_smem] * parts,
        grid=(mp // cfg.block_m, spec.n // (cfg.compute_wgs * cfg.block_n)),
        grid_names=("m", "n"),
        num_threads=cfg.compute_wgs + 1,
        thread_name="wg",
        compiler_params=_PARAMS,
        kernel_name=f"qmatmul_mosaic_plain_{spec.format}",
    )(x2, codes, absmax.T)  # absmax: (K, N / bs) -> (N / bs, K), a row per block of columns
    return _interleave(outs)[:m]


def default_config(spec: _tiles.WeightSpec) -> MosaicConfig:
    """The config used when none is given: two compute warpgroups when N % 256 == 0, else one."""
    return MosaicConfig(compute_wgs=2 if spec.n % 256 == 0 else 1)


def check(x_shape, q: QuantizedArray, dtype, config: MosaicConfig | None = None) -> _tiles.WeightSpec:
    """Validates the operands for the Mosaic GPU kernel; raises ValueError naming what it cannot take."""
    spec = _tiles.weight_spec(x_shape, q, dtype, "qmatmul_mosaic")
    cfg = config or default_config(spec)
    cfg.validate()
    problems = []
    if np.dtype(dtype) not in _HALF_DTYPES:
        problems.append(f"compute dtype {np.dtype(dtype).name} is not bfloat16/float16 (wgmma would use tf32)")
    if not spec.transposed:
        if cfg.block_n != 128:
            problems.append(f"a plain (K, N) weight needs block_n=128, got block_n={cfg.block_n}")
        if spec.k % PLAIN_TK:
            problems.append(f"a plain (K, N) weight needs K={spec.k} to be a multiple of {PLAIN_TK}")
    if spec.n % (cfg.compute_wgs * cfg.block_n):
        wgs = f" x compute_wgs={cfg.compute_wgs}" if cfg.compute_wgs > 1 else ""
        problems.append(f"N={spec.n} must be a multiple of block_n={cfg.block_n}{wgs}")
    if problems:
        raise ValueError(f"qmatmul_mosaic cannot take x shape={tuple(x_shape)} with {q!r}: " + "; ".join(problems))
    return spec


def qmatmul_mosaic(x, q: QuantizedArray, *, compute_dtype=None, config: MosaicConfig | None = None) -> jax.Array:
    """`x @ dequantize(q)` through the Hopper Mosaic GPU kernel (needs an sm_90 GPU to run).

    x: (..., K) float array, cast to compute_dtype (bfloat16 or float16; default x.dtype).
    q: structured QuantizedArray (nf4/fp4 with or without double quant, blockwise int8),
    logical (K, N), plain or transposed, N a multiple of compute_wgs * block_n (config None:
    `default_config`). Returns (..., N) in compute_dtype. Raises ValueError for anything else
    (see `check`).
    """
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    spec = check(np.shape(x), q, dtype, config)
    cfg = config or default_config(spec)
    x2, lead = _tiles.flatten_x(jnp.asarray(x), spec.k, dtype)
    call = _call if spec.transposed else _call_plain
    return call(x2, q, spec=spec, cfg=cfg, dtype=dtype).reshape(lead + (spec.n,))


def emulate(x, q: QuantizedArray, *, compute_dtype=None, config: MosaicConfig | None = None) -> jax.Array:
    """The kernel's schedule in jnp (runs anywhere): same CTAs, warpgroup tiles, split, decode and absmax rows.

    Only the data movement (TMA, SMEM, wgmma, epilogue) is replaced: each step's products are
    float32-accumulated dots. Used by the tests as the CPU check of the kernel's indexing.
    """
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    spec = check(np.shape(x), q, dtype, config)
    cfg = config or default_config(spec)
    x2, lead = _tiles.flatten_x(jnp.asarray(x), spec.k, dtype)
    emulated = _emulate_transposed if spec.transposed else _emulate_plain
    return emulated(x2, q, spec, cfg, dtype)[: x2.shape[0]].reshape(lead + (spec.n,))


def _emulate_transposed(x2, q, spec, cfg, dtype):
    codes, absmax_t, parts = _operands(x2, q, spec, cfg.block_m)
    tn, tm, tk = cfg.block_n, cfg.block_m, step_k(spec)
    cta_n = cfg.compute_wgs * tn
    tkp = tk // len(parts)
    steps_per_block = spec.blocksize // tk
    mp = parts[0].shape[0]
    out_t = jnp.zeros((spec.n, mp), dtype)
    for n in range(spec.n // cta_n):
        for mi in range(mp // tm):
            for wg in range(cfg.compute_wgs):
                r0 = n * cta_n + wg * tn
                acc = jnp.zeros((tn, tm), jnp.float32)
                for s in range(spec.k // tk):
                    c = codes[r0:r0 + tn, s * tkp:(s + 1) * tkp]
                    am = absmax_t[s // steps_per_block, r0:r0 + tn]
                    for w, xp in zip(decode_step(c, am, spec, dtype), parts):
                        xt = xp[mi * tm:(mi + 1) * tm, s * tkp:(s + 1) * tkp]
                        acc = acc + jnp.dot(w, xt.T, preferred_element_type=jnp.float32)
                out_t = out_t.at[r0:r0 + tn, mi * tm:(mi + 1) * tm].set(acc.astype(dtype))
    return out_t.T


def _emulate_plain(x2, q, spec, cfg, dtype):
    parts, width, blocks, block_cols, cta_rows = _plain_geometry(spec, cfg)
    tm, tk = cfg.block_m, PLAIN_TK
    cta_w = cfg.compute_wgs * width
    mp = _tiles.num_tiles(x2.shape[0], tm) * tm
    x2 = jnp.pad(x2, ((0, mp - x2.shape[0]), (0, 0)))
    codes, absmax = _tiles.storage_operands(q)
    absmax_t = absmax.T
    outs = [jnp.zeros((mp, spec.n // parts), dtype) for _ in range(parts)]
    for mi in range(mp // tm):
        for n in range(spec.n // (cfg.compute_wgs * cfg.block_n)):
            cta_row0 = n * cfg.compute_wgs * cfg.block_n // spec.blocksize
            for wg in range(cfg.compute_wgs):
                row0 = cta_row0 + (0 if cta_rows == 1 else wg * blocks)
                c0 = n * cta_w + wg * width
                accs = [jnp.zeros((tm, width), jnp.float32) for _ in range(parts)]
                for s in range(spec.k // tk):
                    xt = x2[mi * tm:(mi + 1) * tm, s * tk:(s + 1) * tk]
                    c = codes[s * tk:(s + 1) * tk, c0:c0 + width]
                    rows = absmax_t[row0:row0 + blocks, s * tk:(s + 1) * tk]
                    am = column_absmax(rows, (tk, width), block_cols, blocks)
                    for p, w in enumerate(decode_parts(c, am, spec, dtype)):
                        accs[p] = accs[p] + jnp.dot(xt, w, preferred_element_type=jnp.float32)
                for p in range(parts):
                    outs[p] = outs[p].at[mi * tm:(mi + 1) * tm, c0:c0 + width].set(accs[p].astype(dtype))
    return _interleave(outs)
