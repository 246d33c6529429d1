"""Elementwise code helpers shared by the jnp path and the Pallas kernels.

They use only shifts, masks, comparisons and selects against Python constants, so XLA
fuses them into neighbouring ops and Pallas kernels can call them (no captured arrays,
no gathers).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from qjax._src.formats import Codebook


def lookup(idx, table: Sequence[float], dtype=jnp.float32):
    """`table[idx]` as a select tree over the bits of `idx`.

    idx: integer array with values in [0, len(table)); len(table) a power of two.
    Returns an array of idx's shape in `dtype`. Costs len(table) - 1 selects.
    """
    level = list(table.tolist() if hasattr(table, "tolist") else table)
    n = len(level)
    if n < 2 or n & (n - 1):
        raise ValueError(f"lookup needs a table of 2, 4, 8, ... entries, got len(table)={n}")
    b = 0
    while len(level) > 1:
        bit = ((idx >> b) & 1) != 0
        level = [jnp.where(bit, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
        b += 1
    return level[0].astype(dtype)


def code_index(v, codebook: Codebook):
    """Index of the nearest code to normalised values `v` (float32), bitsandbytes' tie rule.

    Returns uint8 of v's shape: the storage index of the code.
    """
    idx = None
    for b in codebook.bounds:
        step = (v > float(b)).astype(jnp.uint8)
        idx = step if idx is None else idx + step
    if not codebook.is_sorted:
        idx = lookup(idx, codebook.order, dtype=jnp.uint8)
    return idx


def pack_nibbles(idx):
    """(..., 2L) uint8 codes in [0, 16) -> (..., L) uint8, first code of a pair in the high nibble."""
    pairs = idx.reshape(idx.shape[:-1] + (idx.shape[-1] // 2, 2))
    return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack_nibbles(packed):
    """(..., L) uint8 -> (..., 2L) uint8 codes, inverse of `pack_nibbles`."""
    hi = packed >> 4
    lo = packed & 0xF
    return jnp.stack([hi, lo], axis=-1).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))
