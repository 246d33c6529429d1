"""optax helpers for QLoRA training: adapters_only, split_adapters, merge_adapters, skip_nonfinite."""

from qjax._src.optim import AdaptersOnlyState as AdaptersOnlyState
from qjax._src.optim import SkipNonfiniteState as SkipNonfiniteState
from qjax._src.optim import adapters_only as adapters_only
from qjax._src.optim import is_adapter_path as is_adapter_path
from qjax._src.optim import merge_adapters as merge_adapters
from qjax._src.optim import raise_if_nonfinite as raise_if_nonfinite
from qjax._src.optim import skip_nonfinite as skip_nonfinite
from qjax._src.optim import split_adapters as split_adapters

__all__ = ["AdaptersOnlyState", "SkipNonfiniteState", "adapters_only", "is_adapter_path", "merge_adapters",
           "raise_if_nonfinite", "skip_nonfinite", "split_adapters"]
