"""Memory footprint of a parameter tree: what every leaf costs, counting every byte."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from qjax._src.errors import describe
from qjax._src.paths import path_str
from qjax._src.core.family import is_quantized


@dataclasses.dataclass(frozen=True)
class LeafFootprint:
    path: str
    kind: str           # "quantized" or "dense"
    shape: tuple[int, ...]
    dtype: str          # original dtype (for quantized leaves) or the array's dtype
    format: str | None  # the array's `format_label` ("nf4", ..., or a family's name), None for dense leaves
    params: int         # logical number of parameters
    nbytes: int         # bytes held, every leaf of a quantized array included

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / max(self.params, 1)


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Report of `memory_footprint`: per-leaf rows and totals by kind."""

    leaves: tuple[LeafFootprint, ...]

    @property
    def total_bytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    @property
    def total_params(self) -> int:
        return sum(leaf.params for leaf in self.leaves)

    def bytes_by_kind(self) -> dict[str, int]:
        out = {"quantized": 0, "dense": 0}
        for leaf in self.leaves:
            out[leaf.kind] += leaf.nbytes
        return out

    @property
    def quantized_bits_per_param(self) -> float:
        """Effective bits per quantized parameter (codes, absmax and nested statistics)."""
        q = [leaf for leaf in self.leaves if leaf.kind == "quantized"]
        return 8 * sum(x.nbytes for x in q) / max(sum(x.params for x in q), 1)

    def bits_by_format(self) -> dict[str, float]:
        """Bits per quantized parameter for each format present (mixed precision), every byte counted."""
        by: dict[str, tuple[int, int]] = {}
        for leaf in self.leaves:
            if leaf.kind == "quantized":
                params, nbytes = by.get(leaf.format, (0, 0))
                by[leaf.format] = (params + leaf.params, nbytes + leaf.nbytes)
        return {fmt: 8 * nb / max(p, 1) for fmt, (p, nb) in sorted(by.items())}

    @property
    def bits_per_param(self) -> float:
        """Average bits over every parameter of the tree."""
        return 8 * self.total_bytes / max(self.total_params, 1)

    def __str__(self) -> str:
        rows = [("path", "kind", "shape", "dtype", "params", "bytes", "bits/param")]
        for leaf in self.leaves:
            kind = f"{leaf.kind}:{leaf.format}" if leaf.format else leaf.kind
            rows.append((leaf.path, kind, str(leaf.shape), leaf.dtype, f"{leaf.params:,}",
                         _human(leaf.nbytes), f"{leaf.bits_per_param:.3f}"))
        by_kind = self.bytes_by_kind()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"total: {_human(self.total_bytes)} for {self.total_params:,} params "
                     f"({self.bits_per_param:.3f} bits/param); quantized {_human(by_kind['quantized'])} "
                     f"({self.quantized_bits_per_param:.3f} bits/param), dense {_human(by_kind['dense'])}")
        formats = self.bits_by_format()
        if len(formats) > 1:
            lines.append("quantized bits/param by format: " +
                         ", ".join(f"{fmt} {bits:.3f}" for fmt, bits in formats.items()))
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _nbytes(x) -> int:
    return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


def memory_footprint(tree) -> Footprint:
    """Bytes of every leaf of a (possibly quantized, possibly abstract) tree.

    Works on concrete arrays and on `jax.ShapeDtypeStruct` trees (e.g. from `jax.eval_shape`),
    so the footprint of a model too large to build can be read off its shapes.
    Raises TypeError naming a leaf that is not an array (a str, an object), ValueError naming a
    quantized array whose leaves disagree with its static data.
    """
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]:
        name = path_str(path)
        if is_quantized(x):
            x.check_leaves(name, stacked=True)
            stack = x.stack_shape
            rows.append(LeafFootprint(name, "quantized", stack + tuple(x.shape), np.dtype(x.dtype).name,
                                      x.format_label, x.size * math.prod(stack), x.nbytes))
        elif hasattr(x, "dtype") and hasattr(x, "shape"):
            rows.append(LeafFootprint(name, "dense", tuple(np.shape(x)), np.dtype(x.dtype).name,
                                      None, math.prod(np.shape(x)), _nbytes(x)))
        else:
            raise TypeError(f"memory_footprint counts arrays, but leaf {name!r} is {describe(x)}: pass a tree "
                            "of arrays, jax.ShapeDtypeStructs and QuantizedArrays")
    return Footprint(tuple(rows))
