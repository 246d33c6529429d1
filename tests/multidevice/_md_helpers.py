"""Helpers for the multi-device tests."""

import jax
import numpy as np
from jax.sharding import AxisType


def make_mesh(shape=(2, 4), names=("data", "model"), explicit=False, devices=None):
    """A mesh with Auto (default) or Explicit axes over the first prod(shape) devices."""
    kind = AxisType.Explicit if explicit else AxisType.Auto
    devs = np.array(devices if devices is not None else jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devs, names, axis_types=(kind,) * len(shape))


def hlo_collectives(compiled_text: str, op: str = "all-gather") -> list[str]:
    """The HLO instruction lines of a compiled module that are collective `op`s."""
    return [ln.strip() for ln in compiled_text.splitlines() if f" {op}(" in ln or f" {op}-start(" in ln]
