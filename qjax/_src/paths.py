"""Tree paths: a jax key path as plain keys or an "a/b/0/kernel" string, lookups by such paths, and the
glob / regex patterns that select paths (QuantConfig's skip, LoraConfig's target_modules).

A pattern is a glob (`fnmatch`: `*` also crosses "/", so "*attn*" matches at any depth), a string
starting with "re:" (a regular expression searched in the path), or a compiled `re.Pattern`.
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


def matches(path: str, pattern: Pattern) -> bool:
    """True when the glob / "re:" / compiled pattern matches the "a/b/kernel" path."""
    if isinstance(pattern, re.Pattern):
        return pattern.search(path) is not None
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path.lower(), pattern.lower())


def matches_any(path: str, patterns: Sequence[Pattern] | None) -> bool:
    return any(matches(path, p) for p in (patterns or ()))


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
