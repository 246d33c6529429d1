"""bitsandbytes 0.50.2 on the CPU, the golden reference (skips when torch/bitsandbytes are absent)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default import ops as bnb_default_ops  # noqa: E402

torch.set_num_threads(1)  # torch's mean is order-sensitive; bitsandbytes' offset uses it
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_torch(x):
    x = np.asarray(x)
    name = x.dtype.name
    return torch.from_numpy(x.astype(np.float32)).to(_TORCH_DTYPES[name])


def to_numpy(t):
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def quantize_4bit(x, fmt, blocksize, double_quant):
    """(packed bytes (n,), QuantState) from bitsandbytes.functional.quantize_4bit."""
    packed, state = F.quantize_4bit(to_torch(x), blocksize=blocksize, compress_statistics=double_quant,
                                    quant_type=fmt)
    return packed.numpy().reshape(-1), state


def dequantize_4bit(packed, state):
    """bitsandbytes' reference dequantization (its pure-torch path: the native CPU kernel
    mis-indexes blocks that span rows)."""
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    fn = getattr(bnb_default_ops._dequantize_4bit_compute, "__wrapped__",
                 bnb_default_ops._dequantize_4bit_compute)
    out = fn(torch.from_numpy(np.asarray(packed).reshape(-1)), absmax, state.code, state.blocksize,
             state.shape, state.dtype)
    return to_numpy(out)
