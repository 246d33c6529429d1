"""LoraConfig: PEFT's vocabulary for which layers get adapters and how they start."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

_INITS = ("default", "gaussian", "loftq")
LOFTQ_METHODS = ("svd", "randomized")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: rank `r`, scaling `alpha / r` (`alpha / sqrt(r)` with rsLoRA).

    target_modules: "all-linear" (every Dense/Linear except the output head) or patterns
      (globs or "re:" regexes, see QuantConfig) matched against module paths.
    exclude: patterns never converted. init: "default" (A random, B zero: the converted model
      computes what the quantized base computes), "gaussian" or "loftq" (loftq_iter rounds).
    loftq_method: "svd" (exact) or "randomized" (randomized range finder: only matmuls and thin
      QRs touch the full matrix, for large kernels; see `qjax.low_rank`).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: Union[str, Sequence[str]] = "all-linear"
    exclude: Sequence[str] = ()
    use_rslora: bool = False
    init: str = "default"
    loftq_iter: int = 1
    loftq_method: str = "svd"

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise ValueError(f"LoraConfig.init must be one of {_INITS}, got {self.init!r}")
        if self.loftq_iter < 1:
            raise ValueError(f"LoraConfig.loftq_iter must be >= 1, got {self.loftq_iter!r}")
        if self.loftq_method not in LOFTQ_METHODS:
            raise ValueError(f"LoraConfig.loftq_method must be one of {LOFTQ_METHODS}, got {self.loftq_method!r}")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        elif self.target_modules != "all-linear":
            object.__setattr__(self, "target_modules", (self.target_modules,))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
