"""LoraConfig: PEFT's vocabulary for which layers get adapters and how they start."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Sequence, Union

import numpy as np

from qjax._src.errors import describe
from qjax._src.adapters.variant import AdapterVariant, LoRA, variants

_INITS = ("default", "gaussian", "loftq")
LOFTQ_METHODS = ("svd", "randomized")


def _got(value) -> str:
    return f"got {value!r} ({describe(value)})"


def check_patterns(value, name: str, *, allow_none: bool = False) -> tuple:
    """Module path patterns as a tuple: a str / re.Pattern, or a sequence of them.

    Raises TypeError (naming `name`, the value and its type) for anything else, and ValueError
    for an invalid "re:" regex.
    """
    if value is None and allow_none:
        return ()
    patterns = (value,) if isinstance(value, (str, re.Pattern)) else value
    if isinstance(patterns, (set, frozenset)):
        patterns = tuple(sorted(patterns, key=str))
    if not isinstance(patterns, Sequence) or not all(isinstance(p, (str, re.Pattern)) for p in patterns):
        raise TypeError(f"{name} must be a str, an re.Pattern or a sequence of them (globs or 're:' regexes "
                        f"matched against module paths such as 'layers/0/q_proj'), {_got(value)}")
    for p in patterns:
        if isinstance(p, str) and p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{name} pattern {p!r} is not a valid regular expression: {e}") from None
    return tuple(patterns)


def _int(value, name: str, minimum: int) -> int:
    """value as a Python int >= minimum (numpy integers accepted; bool and floats are not ints)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"LoraConfig.{name} must be a positive int, {_got(value)}")
    if value < minimum:
        raise ValueError(f"LoraConfig.{name} must be a positive int (>= {minimum}), {_got(value)}")
    return int(value)


def _real(value, name: str) -> float:
    """value as a Python int/float (numpy scalars accepted; bool, str, None and arrays are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"LoraConfig.{name} must be a real number, {_got(value)}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _choice(value, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"LoraConfig.{name} must be one of {list(choices)}, {_got(value)}")
    return value


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: rank `r`, scaling `alpha / r` (`alpha / sqrt(r)` with rsLoRA).

    r: int >= 1 (numpy integers accepted). alpha: finite number > 0 (0 would switch the adapters
      off, a negative one only flips B's sign and breaks LoftQ's sqrt(scaling)).
    dropout: in [0, 1). use_rslora: bool.
    target_modules: "all-linear" (every Dense/Linear except the output head) or patterns
      (globs or "re:" regexes, see QuantConfig) matched against module paths; a str or
      re.Pattern is one pattern. exclude: patterns never converted (None: none).
    init: "default" (A random, B zero: the converted model computes what the quantized base
      computes), "gaussian" or "loftq" (loftq_iter >= 1 rounds).
    loftq_method: "svd" (exact) or "randomized" (randomized range finder: only matmuls and thin
      QRs touch the full matrix, for large kernels; see docs/loftq.md).
    variant: the adapter's kind, an instance of a registered AdapterVariant (default LoRA(); see
      docs/extending.md): which leaves it adds, its delta, merge and PEFT form.
    Every field is checked here: TypeError for a wrong type, ValueError for a value out of
    range, each naming the field, the value and its type (and the valid choices).
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
    variant: AdapterVariant = LoRA()

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("r", _int(self.r, "r", 1))
        alpha = _real(self.alpha, "alpha")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoraConfig.alpha must be a finite number > 0 (the adapters' scaling is alpha / r), "
                             f"{_got(self.alpha)}")
        put("alpha", alpha)
        dropout = _real(self.dropout, "dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), {_got(self.dropout)}")
        put("dropout", float(dropout))
        if not isinstance(self.use_rslora, (bool, np.bool_)):
            raise TypeError(f"LoraConfig.use_rslora must be a bool, {_got(self.use_rslora)}")
        put("use_rslora", bool(self.use_rslora))
        put("init", _choice(self.init, "init", _INITS))
        put("loftq_iter", _int(self.loftq_iter, "loftq_iter", 1))
        put("loftq_method", _choice(self.loftq_method, "loftq_method", LOFTQ_METHODS))
        if not isinstance(self.variant, AdapterVariant):
            raise TypeError(f"LoraConfig.variant must be an AdapterVariant instance such as qjax.LoRA(), "
                            f"{_got(self.variant)}")
        if type(self.variant) not in variants():
            raise ValueError(f"LoraConfig.variant {self.variant!r} is not registered; decorate "
                             f"{type(self.variant).__name__} with qjax.register_variant")
        if self.target_modules is None:
            raise TypeError("LoraConfig.target_modules=None: pass 'all-linear' (every linear layer but the output "
                            "head) or patterns such as ['q_proj', 'v_proj'] or 're:.*attn.*'")
        if self.target_modules != "all-linear":
            targets = check_patterns(self.target_modules, "LoraConfig.target_modules")
            if not targets:
                raise ValueError(f"LoraConfig.target_modules={self.target_modules!r} selects no layer; pass "
                                 "'all-linear' or patterns, or lora_config=None to quantize without adapters")
            put("target_modules", targets)
        put("exclude", check_patterns(self.exclude, "LoraConfig.exclude", allow_none=True))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def check_configs(lora_config, quant_config) -> None:
    """The config arguments of `convert`: a LoraConfig or None, and a QuantConfig / per-path policy
    (anything with `config_for(path)`, such as QuantRules) or None, not both None."""
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a qjax.LoraConfig or None, {_got(lora_config)}; "
                        "build one with qjax.LoraConfig(r=..., alpha=...)")
    if quant_config is not None and not callable(getattr(quant_config, "config_for", None)):
        raise TypeError(f"quant_config must be a qjax.QuantConfig, a per-path policy (qjax.QuantRules) or None, "
                        f"{_got(quant_config)}; e.g. qjax.QuantConfig(format='nf4')")
    if lora_config is None and quant_config is None:
        raise ValueError("convert needs a lora_config, a quant_config, or both")

