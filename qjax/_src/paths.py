"""Tree paths: a jax key path as plain keys or an "a/b/0/kernel" string, lookups by such paths, and the
patterns that select paths (QuantConfig's target / skip, QuantRules, LoraConfig's target_modules).

A pattern is one of:
- a bare name: a str with no glob character (`*`, `?`, `[`) that does not start with "re:". It
  matches a path when it equals one of the path's "/"-separated components ("lm_head" matches
  "lm_head/kernel" and "params/lm_head/kernel", not "lm_head_2/kernel"); a name with "/"
  ("attn/q_proj") matches a run of consecutive components. Like bitsandbytes'
  `llm_int8_skip_modules` and PEFT's module names.
- a glob (`fnmatch` over the whole path: `*` also crosses "/", so "*attn*" matches at any depth),
- a string starting with "re:" (a regular expression searched in the path), or a compiled
  `re.Pattern` (searched too).
Names and globs compare case-sensitively first, then ignoring case.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence, Union

Pattern = Union[str, "re.Pattern[str]"]
Path = tuple  # of str (dict keys / attribute names) and int (sequence indices)


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


_GLOB_CHARS = frozenset("*?[")


def is_name(pattern) -> bool:
    """True for a bare-name pattern: a str with no glob character (`*?[`) that does not start with "re:"."""
    return isinstance(pattern, str) and not pattern.startswith("re:") and _GLOB_CHARS.isdisjoint(pattern)


def _has_run(parts: list, name: list) -> bool:
    n = len(name)
    return any(parts[i:i + n] == name for i in range(len(parts) - n + 1))


def matches_name(path: str, name: str) -> bool:
    """True when the bare name ("lm_head", "attn/q_proj") equals a run of consecutive components of
    the "a/b/kernel" path (compared as they are, then ignoring case)."""
    parts, want = path.split("/"), name.strip("/").split("/")
    return _has_run(parts, want) or _has_run([p.lower() for p in parts], [w.lower() for w in want])


def matches(path: str, pattern: Pattern, *, names: bool = True) -> bool:
    """True when the pattern (bare name, glob, "re:" or compiled regex) matches the "a/b/kernel" path.

    names=False: a bare name is a glob like any other, matching only the whole path (the meaning
    every str pattern had before bare names).
    """
    if isinstance(pattern, re.Pattern):
        return pattern.search(path) is not None
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    if names and is_name(pattern):
        return matches_name(path, pattern)
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path.lower(), pattern.lower())


def matches_any(path: str, patterns: Sequence[Pattern] | None, *, names: bool = True) -> bool:
    return any(matches(path, p, names=names) for p in (patterns or ()))


def json_key(k):
    """A path key as JSON stores it: ints and strs as they are, anything else as its str."""
    return k if isinstance(k, (int, str)) else str(k)


def lookup(tree, path: Path):
    """tree[path[0]][path[1]]..., matching a str key to an int index and back."""
    node = tree
    for k in path:
        if isinstance(node, (list, tuple)):
            node = node[int(k)]
        elif k in node:
            node = node[k]
        elif str(k) in node:
            node = node[str(k)]
        else:
            node = node[int(k)]
    return node


def set_in(tree, path, value) -> None:
    """tree[path[0]]...[path[-1]] = value in place, matching a str key to an int index and back."""
    node = lookup(tree, path[:-1]) if len(path) > 1 else tree
    k = path[-1]
    if isinstance(node, list):
        node[int(k)] = value
    else:
        node[k if k in node else str(k)] = value
