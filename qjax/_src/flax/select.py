"""Which layers get adapters: LoraConfig's target_modules / exclude matched against module paths."""

from __future__ import annotations

import warnings
from typing import Sequence

from qjax._src.paths import matches_any

# Module names "all-linear" leaves alone: PEFT skips the model's output head.
HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "classifier", "score", "output_head")


def _pattern_hits(path: str, pattern) -> bool:
    """A LoRA target pattern matches a module path "a/b/q_proj" in full or as its trailing part (PEFT)."""
    if isinstance(pattern, str) and not pattern.startswith("re:"):
        return matches_any(path, (pattern, "*/" + pattern))
    return matches_any(path, (pattern,))


def select_layers(paths: Sequence[str], lora_config) -> list[str]:
    """The module paths that get adapters.

    Raises ValueError for a target pattern that matches nothing and for a config that selects no
    layer at all (say "all-linear" minus an `exclude` of everything); warns for an `exclude`
    pattern that matches no layer.

    "all-linear": every path whose last name is not an output head (HEAD_NAMES). Otherwise a path
    is chosen when a target pattern matches it in full or matches its trailing names. `exclude`
    patterns always win.
    """
    if lora_config.target_modules == "all-linear":
        chosen = [p for p in paths if p.rsplit("/", 1)[-1].lower() not in HEAD_NAMES]
    else:
        for pattern in lora_config.target_modules:
            if not any(_pattern_hits(p, pattern) for p in paths):
                raise ValueError(f"LoraConfig.target_modules pattern {pattern!r} matches no linear layer; "
                                 f"the linear layers are {list(paths)}")
        chosen = [p for p in paths if any(_pattern_hits(p, t) for t in lora_config.target_modules)]
    for pattern in lora_config.exclude:
        if not any(_pattern_hits(p, pattern) for p in paths):  # PEFT warns too: likely a typo
            warnings.warn(f"LoraConfig.exclude pattern {pattern!r} matches no linear layer, so it excludes nothing; "
                          f"the linear layers are {list(paths)}", stacklevel=3)
    kept = [p for p in chosen if not any(_pattern_hits(p, e) for e in lora_config.exclude)]
    if not kept:
        raise ValueError(f"LoraConfig(target_modules={lora_config.target_modules!r}, exclude={lora_config.exclude!r}) "
                         f"selects no layer for adapters; the linear layers are {list(paths)}. Change the patterns, "
                         "or pass lora_config=None to quantize without adapters")
    return kept
