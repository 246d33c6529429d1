"""Fused dequantize-matmul on the Pallas Triton backend: the portable (Ampere) GEMM path.

Each program owns a (block_m, block_n) output tile and walks K in block_k steps: it loads
an x tile and the packed codes + absmax of the matching weight tile, decodes the codes in
registers (nibble shifts, a 16-entry codebook table load, one multiply by the absmax decoded
in-kernel from its 8-bit code when double-quantized; see `_tiles.Decode`), rounds to the compute dtype and feeds `tl.dot` with float32 accumulation. The weight is read
in its storage orientation, so a torch-ordered `(N, K)` weight is contracted along its
stored last axis (a transposed-B dot) without moving bytes. Tails of M, N and K are masked
loads (zeros) and masked stores.
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


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tile sizes (powers of two >= 16) and Triton launch parameters."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    decode: _tiles.Decode = _tiles.Decode()

    def validate(self) -> None:
        problems = [f"{name}={v} must be a power of two >= 16"
                    for name, v in (("block_m", self.block_m), ("block_n", self.block_n),
                                    ("block_k", self.block_k)) if not _tiles.is_pow2(v) or v < 16]
        if problems:
            raise ValueError(f"Invalid {self!r}: " + "; ".join(problems))


def _kernel(x_ref, *refs, spec: _tiles.WeightSpec, m: int, cfg: TritonConfig, dtype, precision):
    *wrefs, o_ref = refs
    tm, tn, tk = cfg.block_m, cfg.block_n, cfg.block_k
    m0 = pl.program_id(0) * tm
    n0 = pl.program_id(1) * tn

    def body(step, acc):
        k0 = step * tk
        xt = _tiles.load_x_tile(x_ref, m0, k0, tm, tk, m, spec.k)
        wt = _tiles.weight_tile(spec, cfg.decode, wrefs, k0, n0, tk, tn, dtype)
        return acc + _tiles.tile_dot(xt, wt, spec, precision)

    acc = jax.lax.fori_loop(0, _tiles.num_tiles(spec.k, tk), body, jnp.zeros((tm, tn), jnp.float32))
    rows = m0 + jnp.arange(tm, dtype=jnp.int32)[:, None]
    cols = n0 + jnp.arange(tn, dtype=jnp.int32)[None, :]
    pltr.store(o_ref.at[pl.ds(m0, tm), pl.ds(n0, tn)], acc.astype(o_ref.dtype),
               mask=(rows < m) & (cols < spec.n))


@functools.partial(jax.jit, static_argnames=("spec", "cfg", "dtype", "interpret", "precision"))
def _call(x2, wops, *, spec, cfg, dtype, interpret, precision):
    m = x2.shape[0]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec, m=m, cfg=cfg, dtype=dtype, precision=precision),
        grid=(_tiles.num_tiles(m, cfg.block_m), _tiles.num_tiles(spec.n, cfg.block_n)),
        in_specs=[any_spec] * (1 + len(wops)),
        out_specs=any_spec,
        out_shape=jax.ShapeDtypeStruct((m, spec.n), dtype),
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"qmatmul_triton_{spec.format}",
    )(x2, *wops)


def qmatmul_triton(x, q: QuantizedArray, *, compute_dtype=None, config: TritonConfig | None = None,
                   interpret: bool = False, precision=None) -> jax.Array:
    """`x @ dequantize(q)` through the Triton-backend kernel.

    x: (..., K) float32/bfloat16/float16. q: 2-D structured QuantizedArray (nf4/fp4 with or
    without double quant, blockwise int8), logical (K, N), plain or transposed.
    precision: of the in-kernel dot (`jax.lax.dot_general`'s; HIGHEST: IEEE float32 products).
    Returns (..., N) in compute_dtype (default x.dtype).
    Raises ValueError for a layout the kernel cannot take (flat, per-channel) or a bad config.
    """
    dtype = np.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    spec = _tiles.weight_spec(np.shape(x), q, dtype, "qmatmul_triton")
    cfg = config or TritonConfig()
    cfg.validate()
    x2, lead = _tiles.flatten_x(jnp.asarray(x), spec.k, dtype)
    wops = _tiles.weight_operands(q, cfg.decode)
    y = _call(x2, wops, spec=spec, cfg=cfg, dtype=dtype, interpret=interpret, precision=precision)
    return y.reshape(lead + (spec.n,))
