"""Which leaves of a parameter tree get quantized, and how: QuantConfig and quantize_params.

Paths are the leaf's key path joined with "/" (`{"params": {"mlp": {"kernel": ...}}}` ->
"params/mlp/kernel"; sequence indices become numbers). A pattern is either a glob
(`fnmatch`: `*` also crosses "/", so "*attn*" matches at any depth), a string starting with
"re:" (a regular expression searched in the path), or a compiled `re.Pattern`.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.core import formats
from qjax._src.paths import Pattern, matches, matches_any, path_str
from qjax._src.errors import float_dtype, named
from qjax._src.core.qarray import QuantizedArray, is_quantized
from qjax._src.core.quantize import (check_blocksize, check_flag, check_report, dequantize, quantize,
                                quantize_with_report)

# Leaves kept in 16-bit by default: embeddings, the output head and normalization scales.
DEFAULT_SKIP: tuple[str, ...] = ("*embed*", "*lm_head*", "*norm*", "*ln_*", "*layernorm*")


def _pattern_text(pattern: Pattern) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)


def as_patterns(value, name: str) -> tuple | None:
    """value (None, a pattern, or a sequence of patterns) as a tuple; raises TypeError naming `name`."""
    if value is None:
        return None
    if isinstance(value, (str, re.Pattern)):
        value = (value,)
    if not isinstance(value, (Sequence, set, frozenset)) or isinstance(value, bytes):
        raise TypeError(f"{name}={value!r} must be a pattern (str or re.Pattern) or a sequence of patterns, "
                        f"got {type(value).__name__}")
    patterns = tuple(value)
    for p in patterns:
        if not isinstance(p, (str, re.Pattern)):
            raise TypeError(f"{name} entries must be str or re.Pattern, got {p!r} ({type(p).__name__})")
        if isinstance(p, str) and p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{name} pattern {p!r} is not a valid regular expression: {e}") from None
    return patterns


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a parameter tree.

    format: "nf4", "fp4", "nf3", "nf2" or "int8". blocksize: int elements per absmax (None:
      per-channel int8). double_quant: 8-bit quantize the absmax too (about 0.37 bits/param
      saved for nf4 at 64). compute_dtype: float dtype the matmuls run in. target: patterns a
      leaf's path must match to be quantized (None: every float leaf of rank >= 2). skip:
      patterns never quantized (default: embeddings, lm_head, norms). min_size: leaves with fewer
      elements stay dense.
    llm_int8_threshold: for format="int8" with blocksize=None, the LLM.int8 outlier threshold
      the layers pass to `int8_matmul` (0 disables the decomposition); ignored otherwise.
    Raises TypeError for a field of the wrong type, ValueError for a bad value (each naming it).
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
        if not isinstance(self.format, str):
            raise TypeError(f"QuantConfig.format={self.format!r} must be a str, one of {sorted(formats.FORMATS)}")
        object.__setattr__(self, "blocksize", check_blocksize(formats.get_format(self.format), self.blocksize))
        object.__setattr__(self, "double_quant", check_flag(self.double_quant, "QuantConfig.double_quant"))
        float_dtype(self.compute_dtype, "QuantConfig.compute_dtype")
        if isinstance(self.min_size, (bool, np.bool_)) or not isinstance(self.min_size, (int, np.integer)) \
                or self.min_size < 0:
            raise TypeError(f"QuantConfig.min_size={self.min_size!r} must be an int >= 0")
        threshold = self.llm_int8_threshold
        if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"QuantConfig.llm_int8_threshold={threshold!r} must be a number >= 0, "
                            f"got {type(threshold).__name__}")
        if not threshold >= 0:
            raise ValueError(f"QuantConfig.llm_int8_threshold must be >= 0, got {threshold!r}")
        if self.double_quant and self.is_llm_int8:
            raise ValueError(f"QuantConfig(format={self.format!r}, blocksize=None) is LLM.int8 (per-channel int8 for "
                             "int8_matmul), which has no double quantization: pass double_quant=False")
        object.__setattr__(self, "target", as_patterns(self.target, "QuantConfig.target"))
        object.__setattr__(self, "skip", as_patterns(self.skip, "QuantConfig.skip") or ())

    def user_patterns(self) -> list[tuple[str, Pattern]]:
        """(field, pattern) for every pattern a user chose: target, and skip beyond DEFAULT_SKIP."""
        return ([("target", p) for p in self.target or ()]
                + [("skip", p) for p in self.skip if p not in DEFAULT_SKIP])

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
        return formats.get_format(self.format).is_llm_int8(self.blocksize)

    def quantize(self, x, *, transposed: bool = False, check_finite: bool = True) -> QuantizedArray:
        return quantize(x, self.format, blocksize=self.blocksize, double_quant=self.double_quant,
                        transposed=transposed, check_finite=check_finite)


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _check_policy(config) -> None:
    if not callable(getattr(config, "config_for", None)):
        raise TypeError(f"config must be a QuantConfig or QuantRules (anything with config_for(path)), "
                        f"got {type(config).__name__} {config!r}")


def quantize_tree(params, config, on_report: Callable[[str, Any, Any, int], None]):
    """`quantize_params` without its checks: on_report(path, leaf, report, blocks) gets each report."""
    _check_policy(config)

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
            q, report = quantize_with_report(x, chosen.format, blocksize=chosen.blocksize,
                                             double_quant=chosen.double_quant)
        except (TypeError, ValueError) as e:
            raise type(e)(f"parameter {named(name, x)}: {e}") from None
        on_report(name, x, report, q.num_blocks)
        return q

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)


def warn_unmatched_patterns(config, params, quantized) -> None:
    """UserWarning for each user pattern of `config` that matches no leaf path of `params`.

    A target pattern that matches only leaves kept dense (rank < 2, non-float, skipped, below
    min_size) warns too. quantized: the tree `params` quantized to (to see which leaves changed).
    """
    if not callable(getattr(config, "user_patterns", None)):
        return
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    paths = [path_str(p) for p, _ in leaves]
    done = {path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(quantized, is_leaf=is_quantized)[0]
            if is_quantized(x)}
    problems = []
    for field, pattern in dict.fromkeys(config.user_patterns()):
        hits = [path for path in paths if matches(path, pattern)]
        if not hits:
            problems.append(f"{field} pattern {_pattern_text(pattern)} matched no parameter path")
        elif field.endswith("target") and not done.intersection(hits):
            problems.append(f"{field} pattern {_pattern_text(pattern)} matched only parameters that stay dense "
                            f"(rank < 2, non-float, skipped or below min_size), e.g. {hits[:3]}")
    if problems:
        warnings.warn("quantize_params: " + "; ".join(problems) + f". Paths look like {paths[:4]} "
                      "(globs match the whole path: write '*up*', not 'up')", UserWarning, stacklevel=3)


def quantize_params(params, config: QuantConfig = QuantConfig(), *, check_finite: bool = True):
    """Quantizes the selected leaves of a parameter tree.

    config: a QuantConfig, or any policy with `config_for(path) -> QuantConfig | None` (e.g.
      `QuantRules` for mixed precision).
    Every float leaf of rank >= 2 for which `config.config_for(path)` gives a config becomes a QuantizedArray;
    everything else (biases, norms, embeddings in `skip`, integer leaves) is returned as is.
    check_finite: raise ValueError naming the leaf (path, shape, dtype) if it holds NaN/Inf or its
      statistics overflow; under jit each quantized leaf checks in a `jax.debug.callback` (a host
      round trip; `quantize_params_sharded` checks all leaves with one read instead). False skips it.
    Warns (UserWarning) for target / skip / rule patterns that match no parameter.
    Raises ValueError if the tree already holds QuantizedArrays, or (checked) a leaf holds NaN/Inf;
    TypeError if an explicit `target` pattern selects a non-float leaf (naming its path).
    """
    check = check_flag(check_finite, "check_finite")

    def on_report(name, x, report, blocks):
        if check:
            check_report(report, f"parameter {name!r}", x, blocks)

    out = quantize_tree(params, config, on_report)
    warn_unmatched_patterns(config, params, out)
    return out


def dequantize_params(params, dtype=None):
    """The dense tree: every QuantizedArray replaced by `dequantize(q, dtype)` (a float dtype).

    Raises TypeError for a non-float dtype, ValueError naming the parameter whose leaves do not
    fit its static shape and format.
    """
    if dtype is not None:
        float_dtype(dtype)

    def visit(path, x):
        if not is_quantized(x):
            return x
        try:
            return dequantize(x, dtype)
        except (TypeError, ValueError) as e:
            raise type(e)(f"parameter {path_str(path)!r}: {e}") from None

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)
