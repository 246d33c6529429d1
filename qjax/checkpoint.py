"""Checkpoints of qjax trees with orbax: quantized trees, adapter-only saves, exact resume.

Plain orbax already saves and restores QuantizedArray trees bit for bit onto a target
(`ocp.StandardCheckpointer().restore(path, target)`); what `save` adds is the static metadata
(format, blocksize, shape, dtype, layout) and CRC32 checksums in orbax's custom metadata, so
that `restore(path)` rebuilds QuantizedArrays without a target and detects damaged data. With
plain orbax, pass `custom_metadata=qjax.checkpoint.tree_metadata(tree)` for the same effect.
"""

from qjax._src.io.adapter_io import load_adapters, read_adapter_config, save_adapters
from qjax._src.io.checkpoint import CheckpointError, read_metadata, restore, save, tree_metadata
from qjax._src.io.resume import ResumeManager, ResumeState

__all__ = [
    "CheckpointError",
    "ResumeManager",
    "ResumeState",
    "load_adapters",
    "read_adapter_config",
    "read_metadata",
    "restore",
    "save",
    "save_adapters",
    "tree_metadata",
]
