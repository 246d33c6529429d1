"""pytest setup: rank-promotion errors, a fresh seeded `rng` fixture, the multi-device folder."""

import os

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng(request):
    """A numpy Generator seeded per test from the wall clock, printed on failure.

    QJAX_TEST_SEED=<seed> in the environment replays a printed seed.
    """
    fixed = os.environ.get("QJAX_TEST_SEED")
    seed = int(fixed) if fixed else np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                print(f"\n[{item.nodeid}] random seed = {value}")


# tests/multidevice/ needs 8 simulated devices, which must be set before jax starts; the normal
# run skips that folder and tests/test_sharding.py runs it in a subprocess with the flag set.
collect_ignore_glob = []
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    collect_ignore_glob.append("multidevice/*")
