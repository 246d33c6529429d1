"""AdapterVariant: what an adapter adds to a frozen layer, and the registry of variants.

A frozen layer maps x (..., *in) to base(x) = x . W (..., *out) with its `kernel` W. A variant owns
named leaves beside that kernel and says, once for Linen, NNX, the optimizer, sharding and the
file formats:
  - `axes`: each leaf's layout, a tuple of `Axis` roles: LEAD (the stacked-layer / per-expert axes
    every leaf carries first), IN (the layer's in axes), OUT (its out axes), RANK (one axis of size r).
    Shapes, shape checks and PartitionSpecs (relative to the kernel's) follow from it.
  - `init` / `loftq`: initial values (LoftQ also returns the kernel's new quantized form).
  - `delta`: what the adapter adds to base(x), given x, base(x) and the kernel (one matrix).
  - `merge`: the dense kernel that computes base(x) + delta(x) without the adapter.
  - `trainable`: which leaves the optimizer updates.
  - `peft_names`, `to_peft` / `from_peft`: the leaves as PEFT tensors (torch layout) and back.
Code that sees only a params tree asks the registry (`adapter_names`, `trainable_names`,
`variant_for`) which leaves are adapters and which train.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from qjax._src.errors import describe
from qjax._src.matmul.base import vmap_lead
from qjax._src.matmul.qmatmul import explicit_sharding

class Axis:
    """The roles of an adapter leaf's axes, in `AdapterVariant.axes`."""

    LEAD = "lead"  # the stacked-layer / per-expert axes (every leaf starts with them)
    IN = "in"  # the layer's in axes (*in)
    OUT = "out"  # the layer's out axes (*out)
    RANK = "rank"  # one axis of size r


LEAD, IN, OUT, RANK = Axis.LEAD, Axis.IN, Axis.OUT, Axis.RANK
_ROLES = (LEAD, IN, OUT, RANK)


class Layout(NamedTuple):
    """One adapter's geometry: `lead` stacked axes, the layer's in / out shapes, the rank r."""

    lead: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    r: int


@dataclasses.dataclass(frozen=True)
class AdapterVariant(abc.ABC):
    """An adapter kind. Subclasses set `name`, `axes` (and `trainable`, default every leaf) and
    implement `init`, `delta` and `merge`; `loftq` and the PEFT methods are optional.

    Instances are frozen dataclasses (their fields are the variant's hyperparameters) and go into
    `LoraConfig(variant=...)`; register the class with `register_variant` so params trees,
    checkpoints and configs can name it.
    """

    name: ClassVar[str]
    axes: ClassVar[Mapping[str, tuple[str, ...]]]
    trainable: ClassVar[tuple[str, ...] | None] = None  # None: every leaf of `axes`

    @classmethod
    def leaves(cls) -> tuple[str, ...]:
        return tuple(cls.axes)

    @classmethod
    def trained(cls) -> tuple[str, ...]:
        return tuple(cls.axes) if cls.trainable is None else tuple(cls.trainable)

    # ----------------------------------------------------------------- geometry (from `axes`)

    def shapes(self, in_shape: Sequence[int], out_shape: Sequence[int], r: int,
               lead: Sequence[int] = ()) -> dict[str, tuple[int, ...]]:
        """{leaf: shape} of a layer (*in) -> (*out) with rank r, under the stacked axes `lead`."""
        parts = {LEAD: tuple(lead), IN: tuple(in_shape), OUT: tuple(out_shape), RANK: (r,)}
        return {name: tuple(d for role in roles for d in parts[role]) for name, roles in self.axes.items()}

    @classmethod
    def layout(cls, shapes: Mapping[str, Sequence[int]], n_lead: int | None = None) -> Layout | None:
        """The Layout that gives these leaf shapes (None: no layout does).

        n_lead: how many stacked axes (None: the largest number that fits; a stack of as many
        layers as the rank cannot be told apart from a rank axis by shapes alone).
        """
        shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        if set(shapes) != set(cls.axes):
            return None
        top = min(len(s) for s in shapes.values())
        for k in ([n_lead] if n_lead is not None else reversed(range(top + 1))):
            found = cls._parse(shapes, k)
            if found is not None:
                return found
        return None

    @classmethod
    def _parse(cls, shapes, k: int) -> Layout | None:
        """The Layout with k stacked axes that gives these shapes, or None."""
        got: dict[str, tuple] = {}
        for name, roles in cls.axes.items():
            shape = shapes[name]
            fixed = sum(1 for r in roles if r == RANK) + (k if LEAD in roles else 0)
            free = len(shape) - fixed
            if free < (1 if IN in roles or OUT in roles else 0) or (free and IN not in roles and OUT not in roles):
                return None
            at = 0
            for role in roles:
                n = k if role == LEAD else 1 if role == RANK else free
                part = shape[at:at + n]
                at += n
                if got.setdefault(role, part) != part:  # every leaf agrees on lead, in, out and r
                    return None
        if RANK in got and (len(got[RANK]) != 1 or got[RANK][0] < 1):
            return None
        return Layout(got.get(LEAD, ()), got.get(IN, ()), got.get(OUT, ()), got.get(RANK, (0,))[0])

    def check(self, params: Mapping[str, Any], *, in_shape, out_shape, r: int, lead: Sequence[int] = ()) -> list[str]:
        """Problems (empty: none) of one layer's stored leaves: missing ones and wrong shapes."""
        problems = []
        for name, want in self.shapes(in_shape, out_shape, r, lead).items():
            x = params.get(name)
            if x is None:
                problems.append(f"{name} is missing")
            elif tuple(np.shape(x)) != want:
                problems.append(f"{name} ({describe(x)}) should have shape {want}")
        return problems

    def specs(self, lead, ins, outs, *, split_rank: bool = False) -> dict[str, tuple]:
        """{leaf: spec entries} from the kernel's: `lead`, `ins` (one entry per in axis), `outs`.

        A RANK axis is replicated; with split_rank it is split over the kernel's mesh axes that
        the leaf does not use already (A (in, r): the out axes; B (r, out): the in axes).
        """
        def merged(entries):
            axes = tuple(a for e in entries for a in ((e,) if isinstance(e, str) else tuple(e or ())))
            return None if not axes else (axes[0] if len(axes) == 1 else axes)

        out = {}
        for name, roles in self.axes.items():
            rank = merged(outs if IN in roles else ins if OUT in roles else ()) if split_rank else None
            parts = {LEAD: tuple(lead), IN: tuple(ins), OUT: tuple(outs), RANK: (rank,)}
            out[name] = tuple(e for role in roles for e in parts[role])
        return out

    # ----------------------------------------------------------------- values

    @abc.abstractmethod
    def init(self, key, in_shape: Sequence[int], out_shape: Sequence[int], r: int, *, init: str,
             dtype=jnp.float32, lead: Sequence[int] = ()) -> dict[str, jax.Array]:
        """{leaf: array} of `shapes(...)`, in dtype: the layer must start out computing its base."""

    def loftq(self, kernel, n_in: int, lora_config, quant_config, lead: int = 0):
        """(q, {leaf: array}): LoftQ init of dense kernel (*lead, *in, *out); see `LoRA.loftq`."""
        raise ValueError(f"adapter variant {self.name!r} has no LoftQ init; use LoraConfig(init='default')")

    @abc.abstractmethod
    def delta(self, params: Mapping[str, jax.Array], x, base, kernel, *, n_in: int, scaling: float,
              precision=None) -> jax.Array:
        """What the adapter adds to one matrix's output (..., *out).

        x: (..., *in) (after dropout). base: x . W (..., *out) in the base's compute dtype (no
        bias). kernel: W, a 2-D QuantizedArray (prod(in), prod(out)) or dense (*in, *out).
        params: this matrix's leaves (without lead axes).
        """

    @abc.abstractmethod
    def merge(self, params: Mapping[str, jax.Array], w: jax.Array, *, scaling: float) -> jax.Array:
        """The dense kernel (*in, *out) float32 that computes base + delta; w: W (*in, *out) float32."""

    # ----------------------------------------------------------------- PEFT files

    peft_names: ClassVar[Mapping[str, str]] = {}  # leaf -> PEFT tensor suffix ("lora_A.weight"); {}: no PEFT form

    @classmethod
    def to_peft(cls, leaf: str, x: np.ndarray) -> np.ndarray:
        """One layer's leaf (no lead axes) as its PEFT tensor, in torch layout."""
        raise ValueError(f"adapter variant {cls.name!r} has no PEFT format")

    @classmethod
    def from_peft(cls, leaf: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """`to_peft`'s inverse for a leaf of `shape`; the value as found (another shape) when it does not fit."""
        raise ValueError(f"adapter variant {cls.name!r} has no PEFT format")

    def peft_config(self) -> dict:
        """adapter_config.json fields of this variant (PEFT's `use_dora`, ...)."""
        raise ValueError(f"adapter variant {self.name!r} has no PEFT format")

    @classmethod
    def rank_axis(cls, leaf: str, layout: Layout) -> int | None:
        """Index of `leaf`'s RANK axis in an adapter of `layout` (None: it has none)."""
        roles = cls.axes[leaf]
        if RANK not in roles:
            return None
        sizes = {LEAD: len(layout.lead), IN: len(layout.in_shape), OUT: len(layout.out_shape), RANK: 1}
        return sum(sizes[r] for r in roles[:roles.index(RANK)])

    def to_json(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


# ----------------------------------------------------------------------------- LoRA


def _explicit_delta_shardings(x, a, b, n_in: int):
    """Output specs of the two adapter dots on a mesh with Explicit axes (None elsewhere).

    Explicit axes make a dot over a sharded contraction ambiguous; the adapter's rank axis is
    small, so x @ A is reduced to x's batch sharding, and (x @ A) @ B is split like B's out axes.
    """
    specs = [explicit_sharding(t)[1] for t in (x, a, b)]
    if all(s is None for s in specs):
        return None, None
    pad = lambda spec, n: tuple(spec or ()) + (None,) * (n - len(tuple(spec or ())))  # noqa: E731
    batch = pad(specs[0], x.ndim)[: x.ndim - n_in]
    out = pad(specs[2], b.ndim)[1:]
    return PartitionSpec(*batch, None), PartitionSpec(*batch, *out)


def lora_delta(x, lora_a, lora_b, *, n_in: int, scaling: float, precision=None):
    """scaling * x (..., *in) . A (*in, r) . B (r, *out) -> (..., *out), in the promoted dtype of x and A."""
    dtype = jnp.promote_types(x.dtype, lora_a.dtype)
    x, a, b = x.astype(dtype), lora_a.astype(dtype), lora_b.astype(dtype)
    h_sharding, y_sharding = _explicit_delta_shardings(x, a, b, n_in)
    h = jax.lax.dot_general(x, a, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
                            precision=precision, out_sharding=h_sharding)
    y = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=precision,
                            out_sharding=y_sharding)
    return y * jnp.asarray(scaling, dtype)


@dataclasses.dataclass(frozen=True)
class LoRA(AdapterVariant):
    """LoRA: A (*in, r), B (r, *out); delta = scaling * x . A . B (scaling from LoraConfig: alpha / r,
    or alpha / sqrt(r) with rsLoRA). PEFT tensors `lora_A.weight` (r, prod(in)), `lora_B.weight`
    (prod(out), r)."""

    name: ClassVar[str] = "lora"
    axes: ClassVar[Mapping[str, tuple[str, ...]]] = {"lora_a": (LEAD, IN, RANK), "lora_b": (LEAD, RANK, OUT)}

    def init(self, key, in_shape, out_shape, r, *, init, dtype=jnp.float32, lead=()):
        """PEFT's init. "default": A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's
        kaiming_uniform_(a=sqrt(5))), B = 0. "gaussian": A ~ N(0, 1/r^2), B = 0. "loftq" needs the
        base weight (`loftq`); for a layer whose base stays dense there is no quantization error to
        correct, so it falls back to "default"."""
        shapes = self.shapes(in_shape, out_shape, r, lead)
        if init in ("default", "loftq"):
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            a = jax.random.uniform(key, shapes["lora_a"], jnp.float32, -bound, bound)
        elif init == "gaussian":
            a = jax.random.normal(key, shapes["lora_a"], jnp.float32) / r
        else:
            raise ValueError(f"Unknown LoRA init {init!r}. It needs to be one of ['default', 'gaussian', 'loftq'].")
        return {"lora_a": a.astype(dtype), "lora_b": jnp.zeros(shapes["lora_b"], dtype)}

    def loftq(self, kernel, n_in, lora_config, quant_config, lead=0):
        """LoftQ init of one layer (or a stack of `lead`-axis layers): (q, {"lora_a", "lora_b"}).

        kernel: dense (*lead, *in, *out): flattened to (prod(in), prod(out)) per layer and
        initialized by `qjax.loftq_init` (rank r, loftq_iter iterations, scaling folded in),
        stacked layers one by one with vmap. q: a 2-D QuantizedArray (lead axes on its leaves);
        lora_a (*lead, *in, r), lora_b (*lead, r, *out) float32, with
        `x . deq(q) + scaling * x . A . B ≈ x . kernel`.
        """
        from qjax._src.adapters.loftq import loftq_init

        shape = tuple(kernel.shape)
        in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
        flat = jnp.reshape(kernel, shape[:lead] + (math.prod(in_shape), math.prod(out_shape)))
        if lead and not isinstance(kernel, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(kernel))):
            raise ValueError(f"kernel of shape={shape} holds NaN/Inf values; quantizing it would give wrong codes")
        q, a, b = vmap_lead(lambda w: loftq_init(w, lora_config, quant_config), lead)(flat)
        shapes = self.shapes(in_shape, out_shape, lora_config.r, shape[:lead])
        return q, {"lora_a": jnp.reshape(a, shapes["lora_a"]).astype(jnp.float32),
                   "lora_b": jnp.reshape(b, shapes["lora_b"]).astype(jnp.float32)}

    def delta(self, params, x, base, kernel, *, n_in, scaling, precision=None):
        return lora_delta(x, params["lora_a"], params["lora_b"], n_in=n_in, scaling=scaling, precision=precision)

    def merge(self, params, w, *, scaling):
        a, b = params["lora_a"], params["lora_b"]
        r = a.shape[-1]
        a2 = jnp.reshape(a.astype(jnp.float32), (-1, r))
        b2 = jnp.reshape(b.astype(jnp.float32), (r, -1))
        delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * np.float32(scaling)
        return w + jnp.reshape(delta, w.shape)

    peft_names: ClassVar[Mapping[str, str]] = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}

    @classmethod
    def to_peft(cls, leaf, x):
        x = np.asarray(x)
        flat = (math.prod(x.shape[:-1]), x.shape[-1]) if leaf == "lora_a" else (x.shape[0], math.prod(x.shape[1:]))
        return np.ascontiguousarray(np.reshape(x, flat).T)

    @classmethod
    def from_peft(cls, leaf, value, shape):
        value, shape = np.asarray(value).T, tuple(shape)
        flat = (math.prod(shape[:-1]), shape[-1]) if leaf == "lora_a" else (shape[0], math.prod(shape[1:]))
        return np.reshape(value, shape) if value.shape == flat else value  # flattened: a DenseGeneral / Einsum

    def peft_config(self):
        return {"peft_type": "LORA", "use_dora": False}


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[AdapterVariant]] = {}


def register_variant(cls: type[AdapterVariant]) -> type[AdapterVariant]:
    """Registers an AdapterVariant subclass under its `name` (usable as a class decorator).

    Registering a class of the same module and qualified name again (a re-run script) replaces it.
    Raises TypeError for a class that is not an AdapterVariant subclass, ValueError for another
    class under the same name, unknown roles in `axes`, a leaf with both IN and OUT axes, a
    trainable leaf not in `axes`, or a leaf name that another variant trains and this one
    freezes (or the other way round): a leaf name means one thing in every params tree.
    """
    if not (isinstance(cls, type) and issubclass(cls, AdapterVariant)):
        raise TypeError(f"register_variant takes an AdapterVariant subclass, got {cls!r} ({describe(cls)})")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty str, got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"adapter variant name {name!r} is taken by {old.__module__}.{old.__qualname__}")
    # the same class defined again (a re-run script or notebook cell) replaces the old definition
    for leaf, roles in cls.axes.items():
        if any(r not in _ROLES for r in roles) or (IN in roles and OUT in roles) or roles.count(LEAD) != 1 \
                or roles[0] != LEAD:
            raise ValueError(f"{cls.__name__}.axes[{leaf!r}]={roles}: roles are {list(_ROLES)}, LEAD first and "
                             "once, and a leaf holds IN or OUT axes, not both")
    if not set(cls.trained()) <= set(cls.axes):
        raise ValueError(f"{cls.__name__}.trainable={cls.trainable} names leaves not in axes {list(cls.axes)}")
    for other in (c for c in _REGISTRY.values() if c is not old):
        for leaf in set(cls.axes) & set(other.axes):
            if (leaf in cls.trained()) != (leaf in other.trained()):
                raise ValueError(f"{cls.__name__} and {other.__name__} disagree on whether leaf {leaf!r} trains")
    _REGISTRY[name] = cls
    return cls


register_variant(LoRA)


def variants() -> tuple[type[AdapterVariant], ...]:
    return tuple(_REGISTRY.values())


def adapter_names() -> frozenset[str]:
    """Every leaf name a registered variant owns (`lora_a`, `lora_b`, ...)."""
    return frozenset(n for cls in _REGISTRY.values() for n in cls.axes)


def trainable_names() -> frozenset[str]:
    """The adapter leaf names the optimizer updates."""
    return frozenset(n for cls in _REGISTRY.values() for n in cls.trained())


def variant_for(names, where: str = "module") -> type[AdapterVariant]:
    """The registered variant whose leaves are exactly `names`; ValueError naming them otherwise."""
    names = set(map(str, names))
    for cls in _REGISTRY.values():
        if set(cls.axes) == names:
            return cls
    known = {cls.name: sorted(cls.axes) for cls in _REGISTRY.values()}
    raise ValueError(f"{where} has adapter leaves {sorted(names)}, which no registered adapter variant owns "
                     f"exactly (registered: {known}); an adapter needs all of its variant's leaves")


def variant_from_json(d) -> AdapterVariant:
    """The variant of `AdapterVariant.to_json`'s dict; ValueError for an unregistered name."""
    if not isinstance(d, dict) or d.get("name") not in _REGISTRY:
        raise ValueError(f"unknown adapter variant {d!r}; registered: {sorted(_REGISTRY)} (register_variant it "
                         "before loading)")
    cls = _REGISTRY[d["name"]]
    return cls(**{k: v for k, v in d.items() if k != "name"})

