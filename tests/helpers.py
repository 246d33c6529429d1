"""Test data helpers shared by the test modules (import as `from helpers import ...`)."""

import jax
import numpy as np

DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


def random_weights(rng, shape, dtype="float32", dist="normal"):
    """Gaussian or heavy-tailed (Student t, 2 dof) weights, exactly representable in dtype."""
    if dist == "normal":
        x = rng.standard_normal(shape)
    else:
        x = rng.standard_t(2.0, size=shape)
    x = (x * 0.05).astype(np.float32)
    return np.array(jax.numpy.asarray(x, DTYPES[dtype]))
