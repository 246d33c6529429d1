"""Elementwise code helpers shared by the jnp path and the Pallas kernels.

They use only shifts, masks, comparisons and selects against Python constants, so XLA
fuses them into neighbouring ops and Pallas kernels can call them (no captured arrays,
no gathers).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from qjax._src.core.formats import Codebook


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


def _pad_last(x, multiple: int):
    pad = -x.shape[-1] % multiple
    if not pad:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def pack_codes(idx, bits: int):
    """(..., L) uint8 codes of `bits` bits -> (..., ceil(L * bits / 8)) uint8, a big-endian bit stream.

    Code j takes bits [bits * j, bits * (j + 1)) counted from the top of byte 0: 4-bit codes
    are `pack_nibbles`, 2-bit codes go four to a byte (first in bits 7-6), 3-bit codes eight
    to three bytes. A last partial group is padded with code 0 and the bytes that hold only
    padding are dropped; callers that need bitsandbytes' padding value pad `idx` themselves.
    """
    if bits == 4 and idx.shape[-1] % 2 == 0:
        return pack_nibbles(idx)
    if bits not in (2, 3, 4):
        raise ValueError(f"pack_codes supports 2, 3 or 4 bits, got bits={bits}")
    group = {2: 4, 3: 8, 4: 2}[bits]
    nbytes = -(-idx.shape[-1] * bits // 8)
    g = _pad_last(idx, group)
    g = g.reshape(g.shape[:-1] + (g.shape[-1] // group, group)).astype(jnp.uint32)
    word = None  # group * bits bits, first code highest
    for j in range(group):
        part = g[..., j] << (bits * (group - 1 - j))
        word = part if word is None else word | part
    nb = group * bits // 8
    out = jnp.stack([(word >> (8 * (nb - 1 - k))) & 0xFF for k in range(nb)], axis=-1)
    out = out.reshape(out.shape[:-2] + (out.shape[-2] * nb,)).astype(jnp.uint8)
    return out[..., :nbytes]


def unpack_codes(packed, bits: int, n: int | None = None):
    """Inverse of `pack_codes`: (..., B) uint8 -> (..., n) uint8 codes (n defaults to 8B / bits)."""
    if n is None:
        n = packed.shape[-1] * 8 // bits
    if bits == 4 and n == 2 * packed.shape[-1]:
        return unpack_nibbles(packed)
    if bits not in (2, 3, 4):
        raise ValueError(f"unpack_codes supports 2, 3 or 4 bits, got bits={bits}")
    group = {2: 4, 3: 8, 4: 2}[bits]
    nb = group * bits // 8
    p = _pad_last(packed, nb)
    p = p.reshape(p.shape[:-1] + (p.shape[-1] // nb, nb)).astype(jnp.uint32)
    word = None
    for k in range(nb):
        part = p[..., k] << (8 * (nb - 1 - k))
        word = part if word is None else word | part
    mask = (1 << bits) - 1
    codes = jnp.stack([(word >> (bits * (group - 1 - j))) & mask for j in range(group)], axis=-1)
    codes = codes.reshape(codes.shape[:-2] + (codes.shape[-2] * group,)).astype(jnp.uint8)
    return codes[..., :n]
