"""Module names between Flax paths and torch state dicts: a small, user-overridable regex map."""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

Rule = tuple[str, str]  # (regex, replacement) for re.sub


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Maps a Flax module path ("params/layers_0/self_attn/q_proj") to a torch module name
    ("model.layers.0.self_attn.q_proj") and back.

    to_torch_rules: `re.sub` rules applied in order to the "/"-joined Flax path; "/" then
      becomes ".". to_flax_rules: applied in order to the torch name with "." made "/".
    The default, `LLAMA`, fits Hugging Face causal LMs (`model.` prefix, `lm_head` at the top)
    and Flax trees whose layers are `layers_0`, `layers_1` (Linen) or `layers/0` (NNX).
    Override it with your own rules, e.g. `NameMap(to_torch_rules=((r"^params/", ""),))`.
    """

    to_torch_rules: Sequence[Rule] = ()
    to_flax_rules: Sequence[Rule] = ()

    def __post_init__(self):
        """Checks every rule now: a bare ("a", "b") pair or a bad regex would fail only at first use, cryptically."""
        for field in ("to_torch_rules", "to_flax_rules"):
            rules = getattr(self, field)
            if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
                raise TypeError(f"NameMap.{field} must be a sequence of (regex, replacement) pairs, got {rules!r}")
            for rule in rules:
                if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(r, str) for r in rule)):
                    raise TypeError(f"NameMap.{field} holds {rule!r}; each rule is a (regex, replacement) pair of "
                                    "str (one rule is written ((regex, replacement),))")
                try:
                    re.compile(rule[0])
                except re.error as e:
                    raise ValueError(f"NameMap.{field} rule {tuple(rule)!r}: {rule[0]!r} is not a valid regex: "
                                     f"{e}") from None
            object.__setattr__(self, field, tuple(tuple(r) for r in rules))

    def to_torch(self, flax_path: str) -> str:
        s = flax_path
        for pattern, repl in self.to_torch_rules:
            s = re.sub(pattern, repl, s)
        return s.strip("/").replace("/", ".")

    def to_flax(self, torch_name: str) -> str:
        s = torch_name.replace(".", "/")
        for pattern, repl in self.to_flax_rules:
            s = re.sub(pattern, repl, s)
        return s.strip("/")


LLAMA = NameMap(
    to_torch_rules=((r"^params/", ""),
                    (r"(^|/)layers_(\d+)(?=/|$)", r"\1layers/\2"),
                    (r"^(?!lm_head(/|$))", "model/")),
    to_flax_rules=((r"^model/", ""),
                   (r"(^|/)layers/(\d+)(?=/|$)", r"\1layers_\2"),
                   (r"^", "params/")),
)
"""Hugging Face Llama-style names <-> Linen variables ({"params": {"layers_0": ...}})."""

LLAMA_NNX = NameMap(
    to_torch_rules=LLAMA.to_torch_rules,
    to_flax_rules=((r"^model/", ""),),
)
"""Hugging Face Llama-style names <-> NNX state paths ("layers/0/self_attn/q_proj")."""

IDENTITY = NameMap()
"""Flax path "a/b/0/c" <-> torch name "a.b.0.c"."""
