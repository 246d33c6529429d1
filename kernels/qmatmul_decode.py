"""Fused dequantize-matmul for decode shapes (M <= 16): a split-K GEMV, bandwidth-bound.

At M <= 16 the weight is read once and each byte feeds at most 32 flops, so the goal is
memory bandwidth: 4.127 of 16 bits per parameter (NF4 with double quant) instead of bf16's 16.
The grid is (N / block_n, split_k): every program streams a contiguous K range of one
block_n-wide column strip (wide tiles, long bursts), decodes it in registers (table
lookups, in-kernel nested absmax: see `_tiles.Decode`) and accumulates
a (16, block_n) float32 partial; the split_k partials are summed in float32 outside. Splitting
K keeps enough programs in flight to cover all SMs when N / block_n alone would not
(4096 / 128 = 32 programs vs 132 SMs on an H100). Rows beyond M are masked (the dot is padded
to 16 rows, tl.dot's minimum).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from qjax._src.core.qarray import QuantizedArray
from qjax.kernels import _tiles
from qjax.kernels._tiles import reference  # noqa: F401  (the jnp oracle, beside the kernel)

MAX_M = 16


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """block_n/block_k: powers of two >= 16; split_k: programs per column strip (None: auto)."""

    block_n: int = 128
    block_k: int = 256
    split_k: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    decode: _tiles.Decode = _tiles.Decode()

    def validate(self) -> None:
        problems = [f"{name}={v} must be a power of two >= 16"
                    for name, v in (("block_n", self.block_n), ("block_k", self.block_k))
                    if not _tiles.is_pow2(v) or v < 16]
        if self.split_k is not None and self.split_k < 1:
            problems.append(f"split_k={self.split_k} must be >= 1")
        if problems:
            raise ValueError(f"Invalid {self!r}: " + "; ".join(problems))

    def splits(self, k: int, n: int, target_programs: int = 264) -> int:
        """split_k, or enough splits for ~2 waves of programs on a 132-SM GPU, at most one per K tile."""
        k_tiles = _tiles.num_tiles(k, self.block_k)
        if self.split_k is not None:
            return max(1, min(self.split_k, k_tiles))
        strips = _tiles.num_tiles(n, self.block_n)
        return max(1, min(k_tiles, -(-target_programs // strips)))


def _kernel(x_ref, *refs, spec, m: int, cfg: DecodeConfig, tiles_per_split: int,
            dtype, precision):
    *wrefs, o_ref = refs
    tn, tk = cfg.block_n, cfg.block_k
    n0 = pl.program_id(0) * tn
    first = pl.program_id(1) * tiles_per_split
    k_tiles = _tiles.num_tiles(spec.k, tk)

    def body(step, acc):
        k0 = (first + step) * tk
        xt = _tiles.load_x_tile(x_ref, 0, k0, MAX_M, tk, m, spec.k)
        wt = _tiles.weight_tile(spec, cfg.decode, wrefs, k0, n0, tk, tn, dtype)
        return acc + _tiles.tile_dot(xt, wt, spec, precision)

    steps = jnp.minimum(tiles_per_split, k_tiles - first)
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((MAX_M, tn), jnp.float32))
    rows = jnp.arange(MAX_M, dtype=jnp.int32)[:, None]
    cols = n0 + jnp.arange(tn, dtype=jnp.int32)[None, :]
    pltr.store(o_ref.at[pl.program_id(1), pl.ds(0, MAX_M), pl.ds(n0, tn)], acc,
               mask=(rows < m) & (cols < spec.n))


@functools.partial(jax.jit, static_argnames=("spec", "cfg", "dtype", "interpret", "precision"))
def _call(x2, wops, *, spec, cfg, dtype, interpret, precision):
    m = x2.shape[0]
    split = cfg.splits(spec.k, spec.n)
    tiles_per_split = _tiles.num_tiles(_tiles.num_tiles(spec.k, cfg.block_k), split)
    split = _tiles.num_tiles(_tiles.num_tiles(spec.k, cfg.block_k), tiles_per_split)  # no empty splits
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    partial = pl.pallas_call(
        functools.partial(_kernel, spec=spec, m=m, cfg=cfg, tiles_per_split=tiles_per_split, dtype=dtype,
                          precision=precision),
        grid=(_tiles.num_tiles(spec.n, cfg.block_n), split),
        in_specs=[any_spec] * (1 + len(wops)),
        out_specs=any_spec,
        out_shape=jax.ShapeDtypeStruct((split, m, spec.n), jnp.float32),
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"qmatmul_decode_{spec.format}",
    )(x2, *wops)
    return jnp.sum(partial, axis=0).astype(dtype)


def qmatmul_decode(x, q: QuantizedArray, *, compute_dtype=None, config: DecodeConfig | None = None,
                   interpret: bool = False, precision=None) -> jax.Array:
    """`x @ dequantize(q)` for at most 16 rows of x, through the split-K GEMV kernel.

    x: (..., K) float32/bfloat16/float16 with prod(leading dims) <= 16. q: 2-D structured
    QuantizedArray (nf4/fp4 with or without double quant, blockwise int8), plain or transposed.
    precision: of the in-kernel dot (`jax.lax.dot_general`'s; HIGHEST: IEEE float32 products).
    Returns (..., N) in compute_dtype (default x.dtype).
    Raises ValueError for more than 16 rows, a layout the kernel cannot take, or a bad config.
    """
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    spec = _tiles.weight_spec(np.shape(x), q, dtype, "qmatmul_decode")
    cfg = config or DecodeConfig()
    cfg.validate()
    x2, lead = _tiles.flatten_x(jnp.asarray(x), spec.k, dtype)
    if x2.shape[0] > MAX_M:
        raise ValueError(f"qmatmul_decode takes at most {MAX_M} rows, got x shape={tuple(np.shape(x))} "
                         f"({x2.shape[0]} rows); use qmatmul_triton or qmatmul_mosaic")
    wops = _tiles.weight_operands(q, cfg.decode)
    y = _call(x2, wops, spec=spec, cfg=cfg, dtype=dtype, interpret=interpret, precision=precision)
    return y.reshape(lead + (spec.n,))
