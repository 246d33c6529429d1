"""tests/gpu: the Pallas kernels and a QLoRA train step on a real GPU; skipped everywhere else.

Run on the device with `python -m benchmarks.gpu_suite --out DIR` (docs/gpu_suite.md), or
`python -m pytest tests/gpu` on a machine whose first JAX device is a GPU.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _needs_gpu():
    if jax.devices()[0].platform != "gpu":
        pytest.skip(f"needs a GPU (jax.devices()[0] is {jax.devices()[0].platform})")


@pytest.fixture
def key(rng):
    """A fresh jax PRNG key drawn from the seeded `rng` fixture (its seed is printed on failure)."""
    return jax.random.key(int(rng.integers(2**31)))
