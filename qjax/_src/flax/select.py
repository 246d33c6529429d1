"""Which layers a config selects: patterns matched against module paths, the same way for Linen and NNX.

The convention: a layer is named by its module path relative to the model ("layers/0/attn/q_proj"
in NNX, "layers_0/attn/q_proj" for a Linen model's `params`). `LoraConfig.target_modules` /
`exclude` and `prepare_for_kbit_training(remat=...)` patterns match the module path in full or its
trailing names (PEFT); `QuantConfig.target` / `skip` (and `QuantRules`) patterns see the kernel's
path "<module path>/kernel", as `quantize_params` sees the leaves of a params tree.

Before Linen and NNX shared this, `qjax.linen.convert` asked QuantConfig patterns about
"params/<module path>/kernel". A policy whose patterns still need that form (one matches a layer
only as "params/...", e.g. "params/layers_0/*" or "*/lm_head/*") is asked with it, in Linen and
NNX alike, so such patterns keep selecting what they did; mixing both forms in one policy is an error.
"""

from __future__ import annotations

import warnings
from typing import Sequence

from qjax._src.paths import matches, matches_any

# Module names "all-linear" leaves alone: PEFT skips the model's output head.
HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "classifier", "score", "output_head")

# The prefix of a kernel path as `qjax.linen.convert` matched QuantConfig patterns before the two
# frameworks shared one convention (the Linen variables' collection).
LEGACY_PREFIX = "params/"


def module_matches(path: str, pattern) -> bool:
    """A module pattern matches a module path "a/b/q_proj" in full or as its trailing part (PEFT's
    target_modules / exclude_modules: "q_proj" and "attn/q_proj" match it, "attn" does not). QuantConfig's
    bare names match any component instead (bitsandbytes' llm_int8_skip_modules; `paths.matches`)."""
    if isinstance(pattern, str) and not pattern.startswith("re:"):
        return matches_any(path, (pattern, "*/" + pattern), names=False)
    return matches_any(path, (pattern,), names=False)


def select_layers(paths: Sequence[str], lora_config, others: Sequence[str] = ()) -> list[str]:
    """The module paths that get adapters.

    Raises ValueError for a target pattern that matches nothing and for a config that selects no
    layer at all (say "all-linear" minus an `exclude` of everything); warns for an `exclude`
    pattern that matches no layer (nor any of `others`: parameters that cannot be converted, which an
    exclude pattern may name to say they stay dense on purpose).

    "all-linear": every path whose last name is not an output head (HEAD_NAMES). Otherwise a path
    is chosen when a target pattern matches it in full or matches its trailing names. `exclude`
    patterns always win.
    """
    if lora_config.target_modules == "all-linear":
        chosen = [p for p in paths if p.rsplit("/", 1)[-1].lower() not in HEAD_NAMES]
    else:
        for pattern in lora_config.target_modules:
            if not any(module_matches(p, pattern) for p in paths):
                raise ValueError(f"LoraConfig.target_modules pattern {pattern!r} matches no linear layer; "
                                 f"the linear layers are {list(paths)}")
        chosen = [p for p in paths if any(module_matches(p, t) for t in lora_config.target_modules)]
    for pattern in lora_config.exclude:
        if not any(module_matches(p, pattern) for p in list(paths) + list(others)):  # PEFT warns too: likely a typo
            warnings.warn(f"LoraConfig.exclude pattern {pattern!r} matches no linear layer, so it excludes nothing; "
                          f"the linear layers are {list(paths)}", stacklevel=4)
    kept = [p for p in chosen if not any(module_matches(p, e) for e in lora_config.exclude)]
    if not kept:
        raise ValueError(f"LoraConfig(target_modules={lora_config.target_modules!r}, exclude={lora_config.exclude!r}) "
                         f"selects no layer for adapters; the linear layers are {list(paths)}. Change the patterns, "
                         "or pass lora_config=None to quantize without adapters")
    return kept


def kernel_paths(quant_config, kernels: dict[str, str]) -> dict[str, str]:
    """{module path: the path `quant_config.config_for` is asked about}: `kernels`' ("<module path>/kernel"
    for a Flax layer, the parameter's own path for a routed parameter).

    Or "params/<module path>/kernel" for every layer when some pattern of the policy (its
    `user_patterns()`, if it has them) matches a layer only in that older Linen form. Raises
    ValueError naming the patterns when some match only the old form and others only the new one.
    """
    new = dict(kernels)
    user = getattr(quant_config, "user_patterns", None)
    patterns = [pattern for _, pattern in user()] if callable(user) else []
    hits = {id(pattern): (any(matches(k, pattern) for k in new.values()),
                          any(matches(LEGACY_PREFIX + k, pattern) for k in new.values())) for pattern in patterns}
    only_old = [p for p in patterns if hits[id(p)] == (False, True)]
    if not only_old:
        return new
    only_new = [p for p in patterns if hits[id(p)] == (True, False)]
    if only_new:
        raise ValueError(f"quant_config patterns {only_old} match layers only as '{LEGACY_PREFIX}<module path>/kernel' "
                         f"and {only_new} only as '<module path>/kernel'; write them all for '<module path>/kernel' "
                         f"(the kernels are {list(new.values())[:6]}{' ...' if len(new) > 6 else ''})")
    return {p: LEGACY_PREFIX + k for p, k in new.items()}
