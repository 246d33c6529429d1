"""Which leaves of a parameter tree get quantized, and how: QuantConfig and quantize_params.

Paths are the leaf's key path joined with "/" (`{"params": {"mlp": {"kernel": ...}}}` ->
"params/mlp/kernel"; sequence indices become numbers). A pattern is either a glob
(`fnmatch`: `*` also crosses "/", so "*attn*" matches at any depth), a string starting with
"re:" (a regular expression searched in the path), or a compiled `re.Pattern`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src import formats
from qjax._src.errors import named
from qjax._src.qarray import QuantizedArray, is_quantized
from qjax._src.quantize import check_blocksize, dequantize, quantize

Pattern = Union[str, "re.Pattern[str]"]

# Leaves kept in 16-bit by default: embeddings, the output head and normalization scales.
DEFAULT_SKIP: tuple[str, ...] = ("*embed*", "*lm_head*", "*norm*", "*ln_*", "*layernorm*")


def _plain_key(key):
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def path_keys(path) -> tuple:
    """A jax key path as a tuple of plain keys: ("params", "layers_0", "lora_a"); indices stay ints."""
    return tuple(_plain_key(k) for k in path)


def path_str(path) -> str:
    """A jax key path as "a/b/0/kernel"."""
    return "/".join(str(k) for k in path_keys(path))


def _matches(path: str, pattern: Pattern) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.search(path) is not None
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path.lower(), pattern.lower())


def matches_any(path: str, patterns: Sequence[Pattern] | None) -> bool:
    return any(_matches(path, p) for p in (patterns or ()))


def _as_patterns(value, name: str) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (str, re.Pattern)):
        return (value,)
    patterns = tuple(value)
    for p in patterns:
        if not isinstance(p, (str, re.Pattern)):
            raise TypeError(f"QuantConfig.{name} entries must be str or re.Pattern, got {type(p).__name__}")
    return patterns


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a parameter tree.

    format: "nf4", "fp4" or "int8". blocksize: elements per absmax (None: per-channel int8).
    double_quant: 8-bit quantize the absmax too (about 0.37 bits/param saved for nf4 at 64).
    compute_dtype: dtype the matmuls run in. target: patterns a leaf's path must match to be
      quantized (None: every float leaf of rank >= 2). skip: patterns never quantized
      (default: embeddings, lm_head, norms). min_size: leaves with fewer elements stay dense.
    llm_int8_threshold: for format="int8" with blocksize=None, the LLM.int8 outlier threshold
      the layers pass to `int8_matmul` (0 disables the decomposition); ignored otherwise.
    """

    format: str = "nf4"
    blocksize: int | None = 64
    double_quant: bool = True
    compute_dtype: Any = jnp.bfloat16
    target: Any = None
    skip: Any = DEFAULT_SKIP
    min_size: int = 0
    llm_int8_threshold: float = 6.0

    def __post_init__(self):
        check_blocksize(formats.get_format(self.format), self.blocksize)
        if not self.llm_int8_threshold >= 0:
            raise ValueError(f"QuantConfig.llm_int8_threshold must be >= 0, got {self.llm_int8_threshold!r}")
        object.__setattr__(self, "target", _as_patterns(self.target, "target"))
        object.__setattr__(self, "skip", _as_patterns(self.skip, "skip") or ())

    def selects(self, path: str) -> bool:
        """True when a leaf at `path` is chosen by target and not excluded by skip."""
        if matches_any(path, self.skip):
            return False
        return self.target is None or matches_any(path, self.target)

    def config_for(self, path: str) -> "QuantConfig | None":
        """The config that quantizes the leaf at `path` (self), or None to keep it dense.

        Per-path policies (`QuantRules`) answer the same question with different configs.
        """
        return self if self.selects(path) else None

    @property
    def is_llm_int8(self) -> bool:
        """True when matmuls should use `int8_matmul` (per-channel int8 weights)."""
        return self.format == "int8" and self.blocksize is None

    def quantize(self, x, *, transposed: bool = False) -> QuantizedArray:
        return quantize(x, self.format, blocksize=self.blocksize, double_quant=self.double_quant,
                        transposed=transposed)


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def quantize_params(params, config: QuantConfig = QuantConfig()):
    """Quantizes the selected leaves of a parameter tree.

    config: a QuantConfig, or any policy with `config_for(path) -> QuantConfig | None` (e.g.
      `QuantRules` for mixed precision).
    Every float leaf of rank >= 2 for which `config.config_for(path)` gives a config becomes a QuantizedArray;
    everything else (biases, norms, embeddings in `skip`, integer leaves) is returned as is.
    Raises ValueError if the tree already holds QuantizedArrays, if a leaf holds NaN/Inf,
    or if an explicit `target` pattern selects a non-float leaf (naming its path).
    """
    def visit(path, x):
        name = path_str(path)
        if is_quantized(x):
            raise ValueError(f"parameter {name!r} is already quantized ({x!r}); "
                             "quantize_params takes a dense tree")
        chosen = config.config_for(name) if np.ndim(x) >= 2 else None
        if chosen is None or np.size(x) < chosen.min_size:
            return x
        if not _is_float(x):
            if chosen.target is not None:
                raise TypeError(f"target pattern selects non-float parameter {named(name, x)}")
            return x
        try:
            return chosen.quantize(x)
        except (TypeError, ValueError) as e:
            raise type(e)(f"parameter {named(name, x)}: {e}") from None

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)


def dequantize_params(params, dtype=None):
    """The dense tree: every QuantizedArray replaced by `dequantize(q, dtype)`."""
    return jax.tree_util.tree_map(lambda x: dequantize(x, dtype) if is_quantized(x) else x,
                                  params, is_leaf=is_quantized)
