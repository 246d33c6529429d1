"""optax helpers for QLoRA training: adapters_only, split_adapters, merge_adapters."""

from qjax._src.optim import AdaptersOnlyState, adapters_only, is_adapter_path, merge_adapters, split_adapters

__all__ = ["AdaptersOnlyState", "adapters_only", "is_adapter_path", "merge_adapters", "split_adapters"]
