"""Multi-device tests: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py does)."""

import jax
import pytest

N_DEVICES = 8


@pytest.fixture(scope="session", autouse=True)
def _need_devices():
    if jax.device_count() < N_DEVICES:
        pytest.skip(f"needs {N_DEVICES} devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8")
