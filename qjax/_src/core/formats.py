"""Storage formats: codebooks, their decision boundaries, and the 8-bit dynamic map.

Everything here is a NumPy constant computed once at import; the array code in
`quantize.py` turns the constants into comparisons and select trees so that XLA
fuses them. The constructions reproduce bitsandbytes' float32 values exactly
(see `docs/formats.md`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

_F32 = np.float32

# bitsandbytes' NF4 codebook: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=_F32,
)

# Normal-float codebooks at 2 and 3 bits, built as bitsandbytes builds NF4 (and as LoftQ's
# reference `NFQuantizer` builds its 2/3-bit codes): 2^(k-1) positive quantiles of N(0, 1) at
# linspace(0.9677083, 0.5, 2^(k-1) + 1)[:-1], 2^(k-1) - 1 negative ones at
# linspace(0.9677083, 0.5, 2^(k-1))[:-1], an exact zero, sorted and divided by the largest.
# The float32 values below come from that construction (scipy's norm.ppf in float64, torch's
# float32 linspace), which reproduces NF4_CODE bit for bit; tests/test_formats_lowbit.py
# rebuilds all three. With the same offset, every positive NF2/NF3 code is also an NF4 code.
NF3_CODE = np.array(
    [
        -1.0, -0.4786292016506195, -0.21714179217815399, 0.0,
        0.16093020141124725, 0.33791524171829224, 0.5626170039176941, 1.0,
    ],
    dtype=_F32,
)
NF2_CODE = np.array([-1.0, 0.0, 0.33791524171829224, 1.0], dtype=_F32)

# bitsandbytes' FP4 (e2m1 with a sign bit in bit 3), normalised so that the largest magnitude is 1.
_FP4_MAGNITUDES = [0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4]
FP4_CODE = np.array(_FP4_MAGNITUDES + [-m if m else 0.0 for m in _FP4_MAGNITUDES], dtype=_F32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 on the CPU: fused multiply-add from whichever end is nearer."""
    start, end = _F32(start), _F32(end)
    step = _F32((end - start) / _F32(steps - 1))
    i = np.arange(steps)
    # float64 holds start + step * i exactly, so one rounding to float32 is what an FMA gives.
    lo = (np.float64(start) + np.float64(step) * i).astype(_F32)
    hi = (np.float64(end) - np.float64(step) * (steps - 1 - i)).astype(_F32)
    return np.where(i < steps // 2, lo, hi).astype(_F32)


def _dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The 256-entry "dynamic" code of 8-bit blockwise quantization (Dettmers, 2015), sorted."""
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[np.ndarray] = []

    def add(scale_exponent: int, boundaries: np.ndarray) -> None:
        means = ((boundaries[:-1] + boundaries[1:]) / _F32(2)).astype(_F32)
        values = (_F32(10.0**scale_exponent) * means).astype(_F32)
        data.append(values)
        if signed:
            data.append(-values)

    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        items = 2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1
        add(-(max_exponent_bits - 1) + i, _torch_linspace_f32(0.1, 1.0, items))
    if additional_items > 0:
        add(-(max_exponent_bits - 1) + max_exponent_bits - 1,
            _torch_linspace_f32(0.1, 1.0, additional_items + 1))
    values = np.concatenate(data + [np.array([0.0, 1.0], _F32)])
    values = np.concatenate([values, np.zeros(256 - values.size, _F32)])
    return np.sort(values).astype(_F32)


DYNAMIC_CODE = _dynamic_map(signed=True)


@dataclasses.dataclass(frozen=True)
class Codebook:
    """A sorted view of a codebook: `index = order[#(bounds < v)]` is bitsandbytes' nearest code.

    Ties (v exactly on a midpoint) go to the lower code, as `torch.bucketize` does.
    """

    code: np.ndarray  # (n,) float32, in storage-index order
    order: np.ndarray  # (n,) int: storage index of the k-th smallest code
    bounds: np.ndarray  # (n - 1,) float32 midpoints between consecutive sorted codes

    @classmethod
    def from_code(cls, code: np.ndarray) -> "Codebook":
        code = np.asarray(code, _F32)
        order = np.argsort(code, kind="stable")
        s = code[order]
        bounds = ((s[:-1] + s[1:]) / _F32(2)).astype(_F32)
        return cls(code=code, order=order, bounds=bounds)

    @property
    def is_sorted(self) -> bool:
        return bool(np.all(self.order == np.arange(self.order.size)))


def _dynamic_thresholds(code: np.ndarray) -> np.ndarray:
    """Decision thresholds of bitsandbytes' CPU 8-bit quantizer, in the normalised domain.

    The CPU quantizer does not search the code: it maps v in [-1, 1] to one of 65536 bins,
    `trunc(((v + 1) * 0.5) * 65535 + 0.5)`, and reads the code index from a table whose
    entry i is the number of code midpoints below `-1 + 2 i / 65535`. That map is monotone
    in v, so it is exactly `#(thresholds <= v)` for the 255 float32 values computed here
    (the smallest v that reaches each index), found by bisection over float32 bit patterns.
    """
    mids = (_F32(0.5) * (code[:-1] + code[1:])).astype(_F32)
    lut_x = (_F32(-1.0) + (_F32(2.0) * np.arange(65536, dtype=_F32)) / _F32(65535)).astype(_F32)
    lut = np.searchsorted(mids, lut_x, side="left")

    def index_of(v: np.ndarray) -> np.ndarray:
        t = ((np.clip(v, _F32(-1), _F32(1)) + _F32(1)) * _F32(0.5)).astype(_F32)
        bins = (t * _F32(65535) + _F32(0.5)).astype(_F32).astype(np.int64)
        return lut[bins]

    def key(v):  # float32 -> order-preserving int
        b = v.view(np.int32).astype(np.int64)
        return np.where(b < 0, -(b & 0x7FFFFFFF), b)

    def unkey(k):
        b = np.where(k < 0, (-k) | (1 << 31), k).astype(np.int64)
        return (b & 0xFFFFFFFF).astype(np.uint32).view(_F32)

    targets = np.arange(1, code.size)
    lo = np.full(targets.shape, key(np.array([-1.0], _F32))[0])  # index(lo) < target
    hi = np.full(targets.shape, key(np.array([1.0], _F32))[0])  # index(hi) >= target
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        reached = index_of(unkey(mid)) >= targets
        hi = np.where(reached, mid, hi)
        lo = np.where(reached, lo, mid)
    return unkey(hi)


DYNAMIC_THRESHOLDS = _dynamic_thresholds(DYNAMIC_CODE)


@dataclasses.dataclass(frozen=True)
class Format:
    """A storage format. `bits` per code; `codebook` is None for linear (int8) formats.

    Codebook formats pack their indices as a big-endian bit stream: code j takes bits
    [bits * j, bits * (j + 1)) counted from the most significant bit of byte 0, so the first
    code of a byte sits in its high bits (NF4's "first element in the high nibble"). A group of
    `group` codes fills exactly `group_bytes` bytes (nf4: 2 in 1, nf2: 4 in 1, nf3: 8 in 3).
    """

    name: str
    bits: int
    codebook: Codebook | None
    kernel: bool = False  # the Pallas kernels in `qjax.kernels` decode it

    @property
    def is_linear(self) -> bool:
        return self.codebook is None

    @property
    def is_bnb_4bit(self) -> bool:
        """A 4-bit codebook format, as bitsandbytes' `Params4bit` stores (nf4, fp4)."""
        return self.bits == 4 and not self.is_linear

    def is_llm_int8(self, blocksize) -> bool:
        """True for per-output-channel int8 (blocksize None), the weights LLM.int8 multiplies."""
        return self.is_linear and blocksize is None

    @property
    def group(self) -> int:
        """Codes in the smallest whole number of bytes."""
        return 8 // math.gcd(8, self.bits)

    @property
    def group_bytes(self) -> int:
        return self.group * self.bits // 8


FORMATS: dict[str, Format] = {
    "nf4": Format("nf4", 4, Codebook.from_code(NF4_CODE), kernel=True),
    "fp4": Format("fp4", 4, Codebook.from_code(FP4_CODE), kernel=True),
    "nf3": Format("nf3", 3, Codebook.from_code(NF3_CODE)),
    "nf2": Format("nf2", 2, Codebook.from_code(NF2_CODE)),
    "int8": Format("int8", 8, None, kernel=True),
}

# Blocksizes bitsandbytes accepts for 4-bit and 8-bit blockwise quantization.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def get_format(name: str) -> Format:
    """Looks a format up by name; raises ValueError listing the valid names."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown format {name!r}. It needs to be one of {sorted(FORMATS)}.") from None
