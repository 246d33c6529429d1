"""Quantized array families: the base class every quantized array derives from, and their registry.

A family is one frozen dataclass: its leaves (codes, scales, zero points, codebooks: any arrays)
and its static fields (at least the logical `shape` and original `dtype`), registered with
`@register_family(name)`. The base class gives every family the logical-array vocabulary
(`ndim`, `size`, `stack_shape`, `nbytes`, `T`), leaf validation, `dequantize`, an XLA matmul,
sharding of its leaves, checkpoint metadata and the guards that stop it being used as a dense
array; a family overrides what its layout does differently. Callers (qmatmul, kernels, sharding,
checkpoints, footprints) ask the array, never its format name.

Stacked layers (`jax.vmap` of a quantizer, scanned models) carry extra leading axes on every leaf;
the static fields describe one layer.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from qjax._src.core import partition
from qjax._src.errors import describe, float_dtype

_FAMILIES: dict[str, type] = {}
_METADATA_DTYPES = ("float32", "bfloat16", "float16")


def static_field(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is pytree aux data (hashed by `jit`, never traced): format, shape, dtype..."""
    return dataclasses.field(default=default, metadata={"static": True})


def dtype_name(dtype) -> str:
    """The JSON name of a float dtype: "float32", "float16" or "bfloat16" (as torch prints them)."""
    return np.dtype(dtype).name


def parse_dtype(name, what: str = "metadata"):
    """The numpy dtype of a JSON dtype name; raises ValueError naming `what` for anything else."""
    if name not in _METADATA_DTYPES:
        raise ValueError(f"{what} has dtype {name!r}; expected float32, bfloat16 or float16")
    return np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(name)


def _to_json(value):
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


class QuantizedBase(abc.ABC):
    """Base of every quantized array family (subclass it and decorate with `register_family`).

    A family defines `leaf_shapes` (the leaves of one layer) and `decode` (one layer's dense
    values); everything else has a default that a family overrides where its layout needs it:
    `xla_matmul` (default: decode, then one dot), `kernel_problems` (default: no Pallas kernel),
    `layer_leaf_specs` (default: leaves replicated), `shard_local`, `logical_spec`, `T`,
    `metadata` / `from_metadata`, `static_problems`, `format_label`.
    """

    family: ClassVar[str] = ""  # the registry name, set by `register_family`
    leaf_names: ClassVar[tuple[str, ...]] = ()  # the pytree children, in order
    static_names: ClassVar[tuple[str, ...]] = ()  # the aux data fields, in order
    transposed: bool = False  # a family with a transposed storage order declares it as a static field
    is_llm_int8: bool = False  # True for per-channel int8 weights that `int8_matmul` takes

    shape: tuple[int, ...]
    dtype: Any

    # ------------------------------------------------------------------ what a family defines

    @abc.abstractmethod
    def leaf_shapes(self) -> dict[str, tuple[tuple[int, ...], Any] | None]:
        """{leaf name: (shape, dtype) of one layer's leaf, or None where the leaf must be None}."""

    @abc.abstractmethod
    def decode(self, dtype) -> jax.Array:
        """One layer's dense values: an array of `self.shape` in dtype (leaves without stacked axes)."""

    # ------------------------------------------------------------------ logical array

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def format_label(self) -> str:
        """The name `memory_footprint` and error messages report for this array's format."""
        return self.family

    def leaves(self) -> dict[str, Any]:
        """{name: leaf} of the leaves that are not None, in pytree order."""
        return {n: getattr(self, n) for n in self.leaf_names if getattr(self, n) is not None}

    def _first_leaf(self) -> tuple[str, tuple[int, ...]]:
        """(name, one layer's shape) of the first leaf the static data asks for."""
        return next((n, tuple(s[0])) for n, s in self.leaf_shapes().items() if s is not None)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes of stacked layers on every leaf; () for one array (`shape` is one layer's)."""
        name, expected = self._first_leaf()
        leaf = getattr(self, name)
        return tuple(np.shape(leaf))[: np.ndim(leaf) - len(expected)]

    def stack_ndim(self) -> int:
        """len(stack_shape), checked: raises ValueError when the first leaf is neither one layer's
        shape nor that shape under leading axes."""
        name, expected = self._first_leaf()
        leaf = getattr(self, name)
        lead = np.ndim(leaf) - len(expected)
        if lead < 0 or tuple(np.shape(leaf))[lead:] != expected:
            raise ValueError(f"{self!r} has {name} of shape {tuple(np.shape(leaf))}, which is neither {expected} "
                             "nor that shape under stacked leading axes")
        return lead

    @property
    def T(self) -> "QuantizedBase":
        """The transpose of the last two axes as a view; families whose layout has none raise ValueError."""
        raise ValueError(f"{self!r}: the {self.family} family has no transposed view; dequantize it or "
                         "quantize the transpose instead")

    @property
    def nbytes(self) -> int:
        """Bytes of every leaf (all stacked layers)."""
        return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self))

    def replace(self, **changes) -> "QuantizedBase":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation

    def static_problems(self) -> str:
        """What is wrong with the static data, or "" (a family adds its own fields' checks)."""
        shape = self.shape
        if not isinstance(shape, tuple) or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            return f"shape={shape!r} is not a tuple of ints >= 0"
        if self.transposed and len(shape) < 2:
            return f"transposed=True needs rank >= 2, got shape={shape}"
        return ""

    def check_leaves(self, where: str = "", stacked: bool = False) -> None:
        """Raises ValueError if the leaves' shapes or dtypes disagree with the static data.

        where: prefixed to the message (a parameter path). stacked: also accept leaves that all
        carry the same extra leading axes (`stack_shape`).
        """
        prefix = f"{where}: " if where else ""
        static = self.static_problems()
        if static:
            raise ValueError(f"{prefix}{type(self).__name__} has invalid static data: {static}")
        expected = self.leaf_shapes()
        stack = ()
        first = getattr(self, self._first_leaf()[0])
        if stacked and hasattr(first, "shape"):
            lead = len(np.shape(first)) - len(self._first_leaf()[1])
            stack = tuple(np.shape(first))[:max(lead, 0)]
        problems = []
        for name, want in expected.items():
            leaf = getattr(self, name)
            if want is None:
                if leaf is not None:
                    problems.append(f"{name} should be None")
                continue
            if leaf is None:
                problems.append(f"{name} is missing")
                continue
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
                problems.append(f"{name} is a {type(leaf).__name__}, not an array")
                continue
            shape, dtype = stack + tuple(want[0]), np.dtype(want[1])
            if tuple(np.shape(leaf)) != shape or np.dtype(leaf.dtype) != dtype:
                problems.append(f"{name} has shape={tuple(np.shape(leaf))} dtype={np.dtype(leaf.dtype).name}, "
                                f"expected shape={shape} dtype={dtype.name}")
        if problems:
            raise ValueError(f"{prefix}{self!r} has inconsistent leaves: " + "; ".join(problems))

    # ------------------------------------------------------------------ compute

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense array: shape `stack_shape + shape` in dtype (a float dtype, default `self.dtype`).

        Raises TypeError for a non-float dtype, ValueError when the leaves do not fit the static data.
        """
        self.check_leaves("dequantize", stacked=True)
        dtype = float_dtype(dtype if dtype is not None else self.dtype)
        fn = lambda q: q.decode(dtype)  # noqa: E731
        for _ in self.stack_shape:  # stacked layers: one decode per layer
            fn = jax.vmap(fn)
        return fn(self)

    def xla_matmul(self, x, dtype, *, precision=None, adjoint: bool = False) -> jax.Array:
        """x (..., K) @ self (K, N) -> (..., N) in dtype, float32 accumulation, in plain jnp.

        adjoint=True computes x (..., N) @ self^T (the backward pass). One 2-D layer, leaves
        already checked. Default: decode the weight in dtype, then one dot.
        """
        w = self.decode(dtype)
        y = jax.lax.dot_general(x.astype(dtype), w, (((x.ndim - 1,), (1 if adjoint else 0,)), ((), ())),
                                precision=precision, preferred_element_type=jnp.float32)
        return y.astype(dtype)

    def kernel_problems(self) -> list[str]:
        """Why the Pallas kernels in `qjax.kernels` cannot take this array ([] when they can)."""
        return [f"the {self.family} family has no Pallas kernel; use backend='xla'"]

    # ------------------------------------------------------------------ sharding

    def leaf_specs(self, spec, mesh, what: str = "") -> dict[str, PartitionSpec | None]:
        """PartitionSpecs of the leaves for `spec`, written over the dense array's axes.

        spec: PartitionSpec (or None: replicated) over `stack_shape + shape` (stacked axes first).
        mesh: a Mesh or AbstractMesh. Leaves may be ShapeDtypeStructs (only static data and shapes
        are read). Returns {leaf name: PartitionSpec, or None where the leaf is None}.
        Raises ValueError naming the split that does not fit (and the ones that would).
        """
        what = what or repr(self)
        lead = self.stack_ndim()
        entries = partition.normalize(spec, lead + self.ndim, mesh, what)
        stack = tuple(np.shape(getattr(self, self._first_leaf()[0])))[:lead]
        for d, (size, e) in enumerate(zip(stack, entries)):
            partition.check_even(d, size, partition.shard_count(mesh, e), e, what)
        inner = self.layer_leaf_specs(entries[lead:], mesh, what)
        return {k: (None if v is None else PartitionSpec(*entries[:lead], *tuple(v))) for k, v in inner.items()}

    def layer_leaf_specs(self, entries: tuple, mesh, what: str) -> dict[str, PartitionSpec | None]:
        """One layer's leaf specs for `entries` (a normalized spec over `shape`); reads static data only.

        Default: every leaf replicated, which is the only split a family that does not override
        this can take. Raises ValueError for any other split.
        """
        split = [e for e in entries if partition.shard_count(mesh, e) > 1]
        if split:
            raise ValueError(f"{what}: the {self.family} family does not say how its leaves split, so it can only "
                             f"be replicated, got mesh axes {split}; override layer_leaf_specs in "
                             f"{type(self).__name__}, or replicate it (spec None)")
        return {n: (None if s is None else PartitionSpec()) for n, s in self.leaf_shapes().items()}

    def shard_local(self, leaves: dict, leaf_specs: dict, shape: tuple[int, ...]) -> "QuantizedBase":
        """The array one device holds inside `shard_map`: its slices of the leaves, logical `shape`.

        leaves / leaf_specs: {name: local leaf} and the specs they were split by (`leaf_specs`).
        A family whose leaves index each other globally (nested statistics) localizes them here.
        """
        return self.replace(**leaves, shape=tuple(shape))

    def logical_spec(self, leaf_specs: dict) -> PartitionSpec:
        """The spec over `shape` that `leaf_specs` (e.g. read off Explicit-sharded leaves) come from.

        Default: replicated leaves give PartitionSpec(); a split leaf raises ValueError.
        """
        if any(s is not None and any(e is not None for e in s) for s in leaf_specs.values()):
            raise ValueError(f"{self!r}: cannot tell the dense spec of leaves sharded as {leaf_specs}; pass spec=")
        return PartitionSpec()

    # ------------------------------------------------------------------ checkpoints

    def metadata(self) -> dict:
        """JSON-able static data to store beside the leaves: {"family", then every static field}."""
        out = {"family": self.family}
        for name in self.static_names:
            value = getattr(self, name)
            out[name] = dtype_name(value) if name == "dtype" else _to_json(value)
        return out

    @classmethod
    def from_metadata(cls, meta: dict, leaves: dict) -> "QuantizedBase":
        """The array from `metadata()` and its stored leaves ({name: array}; absent leaves are None)."""
        statics = {n: (parse_dtype(meta[n]) if n == "dtype" else _from_json(meta[n]))
                   for n in cls.static_names if n in meta}
        return cls(**{n: leaves.get(n) for n in cls.leaf_names}, **statics)

    # ------------------------------------------------------------------ not a dense array

    def _as_dense(self, *_, **__):
        raise TypeError(
            f"a {type(self).__name__} (shape={self.shape} dtype={np.dtype(self.dtype).name}, {self.format_label}) "
            "was used as a dense array: convert the model with qjax.linen.convert / qjax.nnx.convert, multiply "
            "with qjax.qmatmul(x, q), or dequantize it first (qjax.dequantize / qjax.dequantize_params)")

    # A model that was not converted gets that TypeError instead of an error deep inside jax, numpy or
    # flax: jnp.asarray / jnp.dot / `@` / flax's promote_dtype call __jax_array__, and lax ops look it
    # up with getattr while abstractifying (a property, so the lookup itself raises); numpy calls
    # __array__; nnx.Linear reads `kernel[...]`.
    __jax_array__ = property(_as_dense)
    __array__ = _as_dense
    __getitem__ = _as_dense

    def __repr__(self) -> str:
        try:
            stacked = f", stack_shape={self.stack_shape}" if self.stack_shape else ""
        except (TypeError, ValueError, IndexError, StopIteration):  # leaves that do not fit (check_leaves says)
            stacked = ", inconsistent leaves"
        return (f"{type(self).__name__}(family={self.family!r}, shape={self.shape}{stacked}, "
                f"dtype={np.dtype(self.dtype).name})")


def register_family(name: str):
    """Class decorator: makes a `QuantizedBase` subclass a frozen dataclass, a pytree and a family.

    Fields declared with `static_field()` are aux data (they must include `shape` and `dtype`),
    every other field is a leaf (an array or None). The class is registered with
    `jax.tree_util.register_dataclass`, with `flax.nnx.register_data_type` (so NNX modules hold
    it as data), and under `name` for checkpoints restored without a target. Re-running the same
    class definition (same module and name) replaces the earlier one.
    Raises TypeError for a class that does not derive from QuantizedBase or lacks shape/dtype
    static fields, ValueError for a name another class holds.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_family needs a non-empty str name, got {name!r}")

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, QuantizedBase)):
            raise TypeError(f"register_family({name!r}) decorates subclasses of qjax.QuantizedBase, got {cls!r}")
        held = _FAMILIES.get(name)
        if held is not None and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"family name {name!r} is taken by {held.__module__}.{held.__qualname__}; "
                             f"registered names: {sorted(_FAMILIES)}")
        cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
        fields = dataclasses.fields(cls)
        static = tuple(f.name for f in fields if f.metadata.get("static"))
        missing = [n for n in ("shape", "dtype") if n not in static]
        if missing:
            raise TypeError(f"{cls.__name__} must declare {missing} with qjax.static_field()")
        cls.family = name
        cls.static_names = static
        cls.leaf_names = tuple(f.name for f in fields if f.name not in static)
        jax.tree_util.register_dataclass(cls, data_fields=list(cls.leaf_names), meta_fields=list(static))
        from flax import nnx  # a dependency of qjax; the hook exists from flax 0.11
        if hasattr(nnx, "register_data_type"):
            nnx.register_data_type(cls)
        _FAMILIES[name] = cls
        return cls

    return wrap


def family(name: str) -> type:
    """The class registered under `name`; raises KeyError naming the registered families."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"no quantized array family {name!r} is registered (import the module that defines it); "
                       f"registered: {sorted(_FAMILIES)}") from None


def is_quantized(x: Any) -> bool:
    """True for an array of any quantized family."""
    return isinstance(x, QuantizedBase)


def check_quantized(q, what: str) -> None:
    """Raises TypeError naming `what` unless q is a quantized array."""
    if not is_quantized(q):
        raise TypeError(f"{what} needs a QuantizedArray, got {describe(q)} (or an array of another "
                        "qjax.QuantizedBase family)")


def check_leaves(q, where: str = "", stacked: bool = False) -> None:
    """`q.check_leaves(where, stacked)` for an array of any family; TypeError for anything else."""
    check_quantized(q, "check_leaves")
    q.check_leaves(where, stacked)
