"""One way to name a bad input in an error message: its path, shape and dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def describe(x) -> str:
    """'shape=(4, 8) dtype=float32' for an array-like, 'type=str' for anything else."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        if x.dtype == jax.dtypes.float0:  # numpy would call it void
            return f"shape={tuple(np.shape(x))} dtype=float0"
        try:
            dtype = np.dtype(x.dtype).name
        except TypeError:  # extended dtypes (PRNG keys) have no numpy equivalent
            dtype = str(x.dtype)
        return f"shape={tuple(np.shape(x))} dtype={dtype}"
    return f"type={type(x).__name__}"


def float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """dtype as a numpy float dtype; raises TypeError naming `name` for anything else."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name}={dtype!r} must be a float dtype (jnp.float32, jnp.bfloat16, jnp.float16)")
    return dt


def named(path, x) -> str:
    """"'a/b/kernel' (shape=(4, 8) dtype=float32)": a leaf named by its path."""
    return f"{path!r} ({describe(x)})"


class ConversionWarning(UserWarning):
    """`convert` left parameters that feed a matmul untouched (listed with path, shape, dtype and why)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted or does not fit the target."""
