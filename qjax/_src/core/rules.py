"""Per-path quantization policies: mixed precision (e.g. the first k blocks at 4 bits, the rest at 2).

A `QuantRules` answers the one question every consumer asks of a QuantConfig,
`config_for(path) -> QuantConfig | None`, with an ordered list of (pattern, config) rules, so
`quantize_params`, the Flax converters and LoftQ init take either object.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from qjax._src.core.policy import QuantConfig, as_patterns
from qjax._src.paths import Pattern, matches_any


@dataclasses.dataclass(frozen=True)
class QuantRules:
    """An ordered list of `(patterns, config)` rules; the first whose patterns match a path decides.

    rules: each entry is (a pattern or a sequence of patterns, QuantConfig or None); None keeps
      matching leaves dense. Patterns are QuantConfig's (bare names, globs, "re:" regexes, re.Pattern).
    default: the config for paths no rule matches (None: keep them dense).
    The chosen config's own target/skip/min_size still apply (so DEFAULT_SKIP keeps embeddings
    dense whatever the rule says).
    """

    rules: tuple[tuple[tuple[Pattern, ...], QuantConfig | None], ...] = ()
    default: QuantConfig | None = QuantConfig()

    def __post_init__(self):
        normalised = []
        if not isinstance(self.rules, Sequence) or isinstance(self.rules, str):
            raise TypeError(f"QuantRules.rules must be a sequence of (patterns, QuantConfig | None), "
                            f"got {type(self.rules).__name__}")
        for i, entry in enumerate(self.rules):
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise TypeError(f"QuantRules.rules entries must be (patterns, QuantConfig | None), got {entry!r}")
            patterns, config = entry
            patterns = as_patterns(patterns, f"QuantRules.rules[{i}] patterns") or ()
            if config is not None and not isinstance(config, QuantConfig):
                raise TypeError(f"QuantRules rule for {patterns} needs a QuantConfig or None, "
                                f"got {type(config).__name__}")
            normalised.append((patterns, config))
        object.__setattr__(self, "rules", tuple(normalised))
        if self.default is not None and not isinstance(self.default, QuantConfig):
            raise TypeError(f"QuantRules.default must be a QuantConfig or None, got {type(self.default).__name__}")

    def config_for(self, path: str) -> QuantConfig | None:
        for patterns, config in self.rules:
            if matches_any(path, patterns):
                return config if config is not None and config.selects(path) else None
        return self.default if self.default is not None and self.default.selects(path) else None

    def selects(self, path: str) -> bool:
        return self.config_for(path) is not None

    def user_patterns(self) -> list[tuple[str, Pattern]]:
        """(where, pattern) for the rules' patterns and their configs' (see QuantConfig.user_patterns)."""
        out = [(f"rules[{i}]", p) for i, (patterns, _) in enumerate(self.rules) for p in patterns]
        for c in self.configs:
            out += [(f"config {field}", p) for field, p in c.user_patterns()]
        return out

    @property
    def configs(self) -> tuple[QuantConfig, ...]:
        """Every distinct config the rules can return."""
        out = [c for _, c in self.rules if c is not None] + ([self.default] if self.default else [])
        return tuple(dict.fromkeys(out))


def first_blocks(k: int, high: QuantConfig, low: QuantConfig, *,
                 block_pattern: str = r"(?:^|/)layers[_/]?(\d+)(?:/|$)") -> QuantRules:
    """Mixed precision as in LoftQ's README: blocks 0 .. k-1 get `high`, every other leaf `low`.

    k: number of leading blocks at high precision (0: all low). block_pattern: a regex whose
    first group is the block index in a leaf path; the default matches Linen's "layers_3/..."
    and NNX's / Llama's "layers/3/...". Leaves outside any block (e.g. a final projection)
    get `low`. Example: `first_blocks(4, QuantConfig(format="nf4"), QuantConfig(format="nf2"))`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r} must be an int >= 0")
    if k == 0:
        return QuantRules((), low)
    indices = "|".join(str(i) for i in range(k))
    head, _, tail = block_pattern.partition(r"(\d+)")
    if not _:
        raise ValueError(f"block_pattern={block_pattern!r} needs a (\\d+) group for the block index")
    return QuantRules((((f"re:{head}(?:{indices}){tail}",), high),), low)

