"""Parameter-level conversion: a converted parameter stays where the model keeps it and the model's own
matmuls read it.

A parameter selected by `qjax.nnx.convert` / `qjax.linen.convert` that is not the kernel of a Flax
linear layer (tunix's `Einsum.w`, a MoE layer's `(experts, d, f)` weights, MaxText's `DenseGeneral`
kernel) keeps its place in the model: its value becomes the quantized base, its adapters sit beside it,
and while a converted module runs, the parameter reads as a `RoutedWeight`: base + adapters + how they
are stored (`Route`). The model's code then does what it always did (`jnp.einsum(eq, x, w)`,
`x @ w.T`, `jnp.dot`, `jax.lax.dot_general`, `jnp.astype(w, dtype)`, `w[i]` for one expert) and those
operations compute `qmatmul` of the base plus the adapter's delta (`lora.adapted`) without a dense
weight. Any other operation on it raises a TypeError naming the parameter.

`discover` finds the parameters to route: one abstract pass of the model with each candidate parameter
read as a `Probe`, which records, per parameter, how every matmul that reads it contracts its axes
("in"), keeps them ("out") or maps over them ("batch": per-expert weights; "lead": stacked layers a
transform such as `scan` slices), and every other operation that reads it (a gather, a slice, an add:
such a parameter cannot be routed and stays dense).

The operations are routed by wrapping a few public functions of `jax.numpy` and `jax.lax` (`install`):
the wrappers hand anything that holds no `RoutedWeight` / `Probe` to the original function unchanged.
Code that bound the original functions before qjax was imported (`from jax.numpy import einsum`) is
not routed: `discover` then reports the parameter as read by an operation it cannot follow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax._src.adapters import lora as L
from qjax._src.core.family import is_quantized
from qjax._src.flax import planner as P
from qjax._src.matmul import base as B

LEAD, BATCH, IN, OUT = "lead", "batch", "in", "out"
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------- how a parameter is stored


def layout_of(shape: Sequence[int], roles: Sequence[str]) -> P.KernelLayout:
    """The KernelLayout of a parameter whose axes play `roles`: "lead" axes (first) stack layers, "batch"
    axes one matrix per index, "in" axes are contracted with the input, "out" axes produced.

    The base is stored as (prod(in), prod(out)) matrices stacked over (*lead, *batch), in and out axes in
    the parameter's order; a parameter stored as (*lead, *batch, *in, *out) already needs no equation.
    """
    shape, roles = tuple(int(d) for d in shape), tuple(roles)
    n_lead = sum(r == LEAD for r in roles)
    pick = lambda role: tuple(d for d, r in zip(shape, roles) if r == role)  # noqa: E731
    lead, batch, ins, outs = pick(LEAD), pick(BATCH), pick(IN), pick(OUT)
    rest = roles[n_lead:]
    if list(rest) == sorted(rest, key=(BATCH, IN, OUT).index):
        return P.KernelLayout(ins, outs, lead, batch)
    labels = _LETTERS[:len(rest)]
    by = lambda role: "".join(c for c, r in zip(labels, rest) if r == role)  # noqa: E731
    eq = f"{by(BATCH)}...{by(IN)},{labels}->{by(BATCH)}...{by(OUT)}"
    return P.KernelLayout(ins, outs, lead, batch, eq)


@dataclasses.dataclass(frozen=True)
class Route:
    """How one converted parameter is stored and read (static, hashable).

    path: the parameter's path ("layers/0/attn/q_proj/w"), for messages. shape / dtype: its dense
    shape and dtype. roles: per axis "lead" / "batch" / "in" / "out" (`layout_of`).
    lora_config: its adapters' config (None: no adapters). quant_config: its base's config (None: dense).
    """

    path: str
    shape: tuple[int, ...]
    dtype: Any
    roles: tuple[str, ...]
    lora_config: Any = None
    quant_config: Any = None
    backend: str = "auto"

    @property
    def layout(self) -> P.KernelLayout:
        return layout_of(self.shape, self.roles)

    @property
    def stack_axes(self) -> tuple[int, ...]:
        """The parameter axes the stored leaves are stacked over, in storage order (lead, then batch)."""
        return tuple(a for a, r in enumerate(self.roles) if r in (LEAD, BATCH))


# ----------------------------------------------------------------------------- the views


class _View:
    """What RoutedWeight and Probe share: a view (axis order, indexed-away axes, dtype) of one parameter."""

    axes: tuple[int, ...]  # view axis -> parameter axis
    gone: tuple[int, ...]  # parameter axes removed by integer indexing

    def _present(self) -> tuple[int, ...]:
        """Parameter axes still in the view, in view order (axes a transform has sliced away are dropped)."""
        consumed = self._consumed()
        return tuple(a for a in self.axes if a not in consumed)

    @property
    def ndim(self) -> int:
        return len(self._present())

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def T(self):
        return self._with(axes=tuple(reversed(self._present())))

    def transpose(self, *axes):
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
            axes = axes[0]
        present = self._present()
        if not axes:
            return self._with(axes=tuple(reversed(present)))
        return self._with(axes=tuple(present[int(a) % len(present)] for a in axes))

    def swapaxes(self, a1: int, a2: int):
        present = list(self._present())
        a1, a2 = a1 % len(present), a2 % len(present)
        present[a1], present[a2] = present[a2], present[a1]
        return self._with(axes=tuple(present))

    def __matmul__(self, other):
        return _matmul(self, other)

    def __rmatmul__(self, other):
        return _matmul(other, self)

    @staticmethod
    def _indices(idx) -> tuple | None:
        """The leading integer indices of `idx` (a trailing Ellipsis / full slices allowed), or None."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        ints = []
        for i, k in enumerate(idx):
            if k is Ellipsis or (isinstance(k, slice) and k == slice(None)):
                if all(j is Ellipsis or (isinstance(j, slice) and j == slice(None)) for j in idx[i:]):
                    break
                return None
            is_int = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
            is_int = is_int or (hasattr(k, "dtype") and np.ndim(k) == 0 and jnp.issubdtype(k.dtype, jnp.integer))
            if not is_int:
                return None
            ints.append(k)
        return tuple(ints)


# ----------------------------------------------------------------------------- runtime: RoutedWeight


@jax.tree_util.register_pytree_node_class
class RoutedWeight(_View):
    """A converted parameter as the model reads it: base (QuantizedArray matrices or the dense parameter),
    adapters ({leaf: array} or None), a dropout key (or None), and the view the model took of it.

    Behaves like the dense parameter for `shape` / `dtype` / `ndim`, `.T`, `transpose`, `astype`, integer
    indexing of stacked (per-expert, per-layer) axes, and every matmul routed by `install`; anything
    else raises TypeError naming the parameter.
    """

    def __init__(self, base, adapters, key, route: Route, axes=None, gone=(), dtype=None):
        self.base, self.adapters, self.key, self.route = base, adapters, key, route
        self.axes = tuple(range(len(route.shape))) if axes is None else tuple(axes)
        self.gone, self.view_dtype = tuple(gone), dtype

    def tree_flatten(self):
        return (self.base, self.adapters, self.key), (self.route, self.axes, self.gone, self.view_dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.route.shape[a] for a in self._present())

    def _with(self, **changes):
        kw = dict(axes=self.axes, gone=self.gone, dtype=self.view_dtype) | changes
        return RoutedWeight(self.base, self.adapters, self.key, self.route, **kw)

    def _remaining(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.route.shape)) if a not in self.gone)

    def _consumed(self) -> tuple[int, ...]:
        """Stack axes a transform (scan / vmap over stacked layers) has sliced off the leaves."""
        remaining = self._remaining()
        stack = [a for a in remaining if a in self.route.stack_axes]
        if is_quantized(self.base):
            deficit = len(stack) - self.base.stack_ndim()
        else:
            deficit = len(remaining) - jnp.ndim(self.base)
        consumed = tuple(remaining[:max(deficit, 0)])
        if any(a not in self.route.stack_axes for a in consumed):
            raise ValueError(f"{self.route.path}: its leaves lost leading axes {consumed} that are not stacked "
                             f"layers or experts (roles {self.route.roles}); it was read with other shapes")
        return consumed

    @property
    def dtype(self):
        return jnp.dtype(self.view_dtype or self.route.dtype)

    def astype(self, dtype, **_):
        return self._with(dtype=jnp.dtype(dtype))

    def __getitem__(self, idx):
        ints = self._indices(idx)
        present = self._present()
        if ints is None or len(ints) > len(present):
            raise TypeError(f"{self.route.path}: qjax routes only integer indexing of its stacked axes "
                            f"({self._stack_names()}), not {idx!r}; leave this parameter unconverted")
        w = self
        for i in ints:
            w = w._index(w._present()[0], i)
        return w

    def _stack_names(self) -> str:
        return ", ".join(f"axis {a}" for a in self.route.stack_axes) or "none"

    def _index(self, axis: int, i) -> "RoutedWeight":
        """The view with parameter axis `axis` (a stack axis still present) fixed at index i."""
        if axis not in self.route.stack_axes:
            raise TypeError(f"{self.route.path}: indexing axis {axis} (role {self.route.roles[axis]!r}) would cut "
                            f"into its quantized matrices; only its stacked axes ({self._stack_names()}) can be "
                            "indexed")
        consumed = self._consumed()
        stack = [a for a in self._remaining() if a in self.route.stack_axes and a not in consumed]
        pos = stack.index(axis)
        take = lambda x: x[(slice(None),) * pos + (i,)]  # noqa: E731
        if is_quantized(self.base):
            base = jax.tree_util.tree_map(take, self.base)
        else:
            dense = [a for a in self._remaining() if a not in consumed]
            base = jnp.asarray(self.base)[(slice(None),) * dense.index(axis) + (i,)]
        adapters = None if self.adapters is None else {k: take(v) for k, v in self.adapters.items()}
        key = None if self.key is None else jax.random.fold_in(self.key, i)
        return RoutedWeight(base, adapters, key, self.route, tuple(a for a in self.axes if a != axis),
                            tuple(sorted(self.gone + (axis,))), self.view_dtype)

    def contract(self, x, x_labels: str, w_labels: str, out_labels: str, *, precision=None, preferred=None,
                 op: str = "matmul"):
        """The matmul `x_labels,w_labels->out_labels` (an einsum over x and this view) as
        base + adapter delta (`lora.adapted`), in the output order asked for."""
        route, present = self.route, self._present()
        if is_quantized(self.base):  # a tree_map over the layer's arguments would have cast the codes
            self.base.check_leaves(route.path, stacked=True)
        roles = _roles(route.path, len(route.shape), present, self._consumed(), self.gone, x_labels, w_labels,
                       out_labels, op)
        if not isinstance(roles, tuple):
            raise TypeError(roles)
        if _stackless(roles) != _stackless(route.roles):
            raise ValueError(f"{route.path}: read by {op} with axis roles {roles}, but it was converted for "
                             f"roles {route.roles} (found by tracing the model at conversion); convert with "
                             "inputs that take this code path, or leave the parameter unconverted")
        label = dict(zip(present, w_labels))
        order = sorted(present)
        pick = lambda role: [label[a] for a in order if roles[a] == role]  # noqa: E731
        batch, outs = pick(BATCH), pick(OUT)
        x_free = [c for c in x_labels if c in out_labels and c not in label.values()]
        res = "".join(batch + x_free + outs)
        eq = f"{x_labels},{''.join(label[a] for a in order)}->{res}"
        dtype = jnp.dtype(preferred) if preferred is not None else jnp.promote_types(x.dtype, self.dtype)
        quant = route.quant_config
        compute = dtype
        if is_quantized(self.base) and getattr(quant, "compute_dtype", None) is not None:
            compute = quant.compute_dtype
        lora = route.lora_config if self.adapters is not None else None
        drop = None
        if lora is not None and self.key is not None and lora.dropout > 0:
            drop = lambda t: L.dropout(t, lora.dropout, self.key)  # noqa: E731
        y = L.adapted(x, self.base, None, self.adapters, variant=lora.variant if lora is not None else None,
                      scaling=lora.scaling if lora is not None else 0.0,
                      out_shape=tuple(route.shape[a] for a in order if roles[a] == OUT), compute_dtype=compute,
                      out_dtype=dtype, plan=B.EinsumPlan(eq, where=route.path), precision=precision, drop=drop,
                      backend=route.backend, int8_threshold=B.llm_int8_threshold(self.base, quant))
        return y if res == out_labels else jnp.transpose(y, [res.index(c) for c in out_labels])

    def _refuse(self, *_, **__):
        raise TypeError(f"{self.route.path} is a qjax-converted parameter ({self._describe()}); qjax routes only "
                        "matmuls (einsum, dot, matmul, @, tensordot, lax.dot_general), astype, transposes and "
                        "integer indexing of stacked axes. Leave it unconverted (LoraConfig.exclude / "
                        "QuantConfig.skip) to read it otherwise")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __neg__ = __pow__ = __iter__ = __array__ = __float__ = _refuse

    def _describe(self) -> str:
        base = self.base.format_label if is_quantized(self.base) else "dense"
        lora = f" + LoRA r={self.route.lora_config.r}" if self.adapters is not None else ""
        return f"shape {self.shape}, dtype {self.dtype.name}, {base}{lora}"

    def __repr__(self) -> str:
        return f"RoutedWeight({self.route.path!r}, {self._describe()})"


def _stackless(roles) -> tuple:
    return tuple(BATCH if r == LEAD else r for r in roles)


# ----------------------------------------------------------------------------- discovery: Probe


class _Record(threading.local):
    def __init__(self):
        self.uses: dict[str, set] | None = None  # path -> {roles tuple}
        self.other: dict[str, list[str]] | None = None  # path -> what else read it
        self.matmuls: set[str] | None = None  # paths some matmul read (routable or not)


_record = _Record()


@jax.tree_util.register_pytree_node_class
class Probe(_View):
    """A candidate parameter during `discover`: the dense (abstract) value in view order, recording every
    operation that reads it."""

    def __init__(self, value, path: str, ndim: int, axes=None, gone=(), bound: str = "", derived: str = ""):
        self.value, self.path, self.n = value, path, ndim
        self.axes = tuple(range(ndim)) if axes is None else tuple(axes)
        self.gone, self.bound, self.derived = tuple(gone), bound, derived

    def tree_flatten(self):
        return (self.value,), (self.path, self.n, self.axes, self.gone, self.bound, self.derived)

    def bind(self, where: str = "bound") -> "Probe":
        """The probe as the methods of the module holding it read it (`bound` names that module)."""
        return Probe(self.value, self.path, self.n, self.axes, self.gone, where, self.derived)

    def _derive(self, value, what: str):
        """`value` computed from this weight by `what` (an add, a slice): a matmul reading it still counts as
        reading this parameter (which then cannot be routed) when it keeps a weight's rank."""
        if jnp.ndim(value) < 2:
            return value
        return Probe(value, self.path, jnp.ndim(value), None, (), self.bound, self.derived or what)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def _consumed(self) -> tuple[int, ...]:
        return self.axes[:max(len(self.axes) - jnp.ndim(self.value), 0)]

    @property
    def shape(self):
        return tuple(jnp.shape(self.value))

    @property
    def dtype(self):
        return self.value.dtype

    def _with(self, axes=None, **_):
        present = self._present()
        perm = [present.index(a) for a in axes]
        return Probe(jnp.transpose(self.value, perm), self.path, self.n, axes, self.gone, self.bound, self.derived)

    def astype(self, dtype, **_):
        return Probe(self.value.astype(dtype), self.path, self.n, self._present(), self.gone, self.bound,
                     self.derived)

    def other(self, what: str):
        """Records a read this parameter cannot be routed through; returns the dense value."""
        if _record.other is not None:
            _record.other.setdefault(self.path, []).append(what)
        return self.value

    def __getitem__(self, idx):
        ints = self._indices(idx)
        if ints is None or len(ints) > self.ndim:
            what = f"indexing [{_short(idx)}]"
            value = self.other(what)[idx]
            static = all(isinstance(k, (int, slice, type(Ellipsis), type(None))) or k is None
                         for k in (idx if isinstance(idx, tuple) else (idx,)))
            return self._derive(value, what) if static else value  # a gather gives activations, not a weight
        present = self._present()
        return Probe(self.value[tuple(ints)], self.path, self.n, present[len(ints):], self.gone + present[:len(ints)],
                     self.bound, self.derived)

    def record(self, x_labels, w_labels, out_labels, op: str) -> None:
        if _record.matmuls is not None:
            _record.matmuls.add(self.path)
        if self.derived:
            self.other(f"{op} after {self.derived}")
            return
        if not self.bound:
            self.other(f"{op} outside the methods of the module that holds it")
            return
        roles = _roles(self.path, self.n, self._present(), self._consumed(), self.gone, x_labels, w_labels,
                       out_labels, op)
        if isinstance(roles, tuple):
            if _record.uses is not None:
                _record.uses.setdefault(self.path, set()).add(roles)
        else:
            self.other(roles)

    def __repr__(self) -> str:
        return f"Probe({self.path!r}, shape={self.shape})"


def _probe_operator(name: str):
    def method(self, *args):
        vals = [a.value if isinstance(a, Probe) else a for a in args]
        what = f"operator {name}"
        value = getattr(self.other(what), name)(*vals)
        return self._derive(value, what) if jnp.shape(value) == self.shape else value
    return method


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
              "__neg__", "__pow__"):
    setattr(Probe, _name, _probe_operator(_name))


def _short(idx) -> str:
    parts = idx if isinstance(idx, tuple) else (idx,)
    return ", ".join(f"<array {tuple(jnp.shape(k))}>" if hasattr(k, "shape") else repr(k)[:20] for k in parts)


def _roles(path: str, n: int, present, consumed, gone, x_labels: str, w_labels: str, out_labels: str, op: str):
    """The role of each parameter axis in one matmul: a tuple, or a str saying why it is not a projection."""
    if len(w_labels) != len(present) or len(set(w_labels)) != len(w_labels) or len(set(x_labels)) != len(x_labels):
        return f"{op} with repeated labels or a rank mismatch"
    if any(a != i for i, a in enumerate(consumed)):
        return f"{op} inside a transform that sliced non-leading axes"
    roles = {a: LEAD for a in consumed} | {a: BATCH for a in gone}
    for a, c in zip(present, w_labels):
        in_x, in_out = c in x_labels, c in out_labels
        if in_x and in_out:
            roles[a] = BATCH
        elif in_x:
            roles[a] = IN
        elif in_out:
            roles[a] = OUT
        else:
            return f"{op} summing the weight's axis {a} alone"
    out = tuple(roles[a] for a in range(n))
    if IN not in out or OUT not in out:
        return f"{op} that contracts no axis of it or produces none (not a projection)"
    if LEAD in out and out[:out.count(LEAD)] != (LEAD,) * out.count(LEAD):
        return f"{op} with stacked axes after others"
    return out


# ----------------------------------------------------------------------------- the routed operations


def _routed(x) -> bool:
    return isinstance(x, (RoutedWeight, Probe))


def _unwrap(x):
    """An nnx.Variable whose value is routed reads as that value (models pass `self.w` itself)."""
    if isinstance(x, nnx.Variable):
        v = x.get_value()
        return v if _routed(v) else x
    return x


def _contract(a, a_labels: str, b, b_labels: str, out_labels: str, *, precision=None, preferred=None, op: str):
    """One of a / b routed: the einsum `a_labels,b_labels->out_labels`."""
    if _routed(a) and _routed(b):
        raise TypeError(f"{op} of two qjax-converted parameters ({a!r}, {b!r}) is not supported")
    w_first = _routed(a)
    w, x, w_labels, x_labels = (a, b, a_labels, b_labels) if w_first else (b, a, b_labels, a_labels)
    x = jnp.asarray(x)
    if isinstance(w, Probe):
        w.record(x_labels, w_labels, out_labels, op)
        ops = (w.value, x) if w_first else (x, w.value)
        return _ORIG["einsum"](f"{a_labels},{b_labels}->{out_labels}", *ops, precision=precision,
                               preferred_element_type=preferred)
    return w.contract(x, x_labels, w_labels, out_labels, precision=precision, preferred=preferred, op=op)


def _fresh(used: str, n: int) -> str:
    return "".join([c for c in _LETTERS if c not in used][:n])


def _einsum_labels(subscripts: str, ndims: tuple[int, int]) -> tuple[str, str, str] | None:
    """Explicit (lhs, rhs, out) labels of a two-operand einsum, ellipses expanded (numpy broadcasting)."""
    eq = subscripts.replace(" ", "")
    ops, _, res = eq.partition("->")
    parts = ops.split(",")
    if len(parts) != 2:
        return None
    explicit = "->" in eq
    used = "".join(c for c in eq if c.isalpha())
    n_ell = [nd - len(p.replace("...", "")) if "..." in p else 0 for p, nd in zip(parts, ndims)]
    ell = _fresh(used, max(n_ell + [0]))
    parts = [p.replace("...", ell[len(ell) - k:] if k else "") for p, k in zip(parts, n_ell)]
    if not explicit:
        counts = {c: (parts[0] + parts[1]).count(c) for c in set(parts[0] + parts[1])}
        res = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    else:
        res = res.replace("...", ell)
    if any(len(p) != nd for p, nd in zip(parts, ndims)):
        return None
    return parts[0], parts[1], res


def _einsum(orig, subscripts, *operands, precision=None, preferred_element_type=None, **kw):
    operands = tuple(_unwrap(o) for o in operands)
    if not isinstance(subscripts, str) or not any(_routed(o) for o in operands):
        return orig(subscripts, *operands, precision=precision, preferred_element_type=preferred_element_type, **kw)
    labels = _einsum_labels(subscripts, tuple(jnp.ndim(o) if not _routed(o) else o.ndim for o in operands)) \
        if len(operands) == 2 else None
    if labels is None:
        return _unsupported(f"jnp.einsum({subscripts!r}) with {len(operands)} operands", operands,
                            lambda *ops: orig(subscripts, *ops, precision=precision,
                                              preferred_element_type=preferred_element_type, **kw))
    lhs, rhs, res = labels
    return _contract(operands[0], lhs, operands[1], rhs, res, precision=precision,
                     preferred=preferred_element_type, op=f"jnp.einsum({subscripts!r})")


def _dot_general_labels(nd_a: int, nd_b: int, dimension_numbers) -> tuple[str, str, str]:
    (ca, cb), (ba, bb) = dimension_numbers
    a = list(_LETTERS[:nd_a])
    b = list(_LETTERS[nd_a:nd_a + nd_b])
    for i, j in zip(tuple(ca), tuple(cb)):
        b[j] = a[i]
    for i, j in zip(tuple(ba), tuple(bb)):
        b[j] = a[i]
    out = [a[i] for i in ba] + [a[i] for i in range(nd_a) if i not in ca and i not in ba] + \
          [b[j] for j in range(nd_b) if j not in cb and j not in bb]
    return "".join(a), "".join(b), "".join(out)


def _dot_general(orig, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    lhs, rhs = _unwrap(lhs), _unwrap(rhs)
    if not (_routed(lhs) or _routed(rhs)):
        return orig(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type,
                    **kw)
    a, b, out = _dot_general_labels(lhs.ndim if _routed(lhs) else jnp.ndim(lhs),
                                    rhs.ndim if _routed(rhs) else jnp.ndim(rhs), dimension_numbers)
    return _contract(lhs, a, rhs, b, out, precision=precision, preferred=preferred_element_type,
                     op="lax.dot_general")


def _dot_labels(nd_a: int, nd_b: int) -> tuple[str, str, str] | None:
    """numpy.dot: a's last axis with b's second to last (b's only axis when 1-D)."""
    if nd_a == 0 or nd_b == 0:
        return None
    a = _LETTERS[:nd_a]
    b = list(_LETTERS[nd_a:nd_a + nd_b])
    j = nd_b - 2 if nd_b >= 2 else 0
    b[j] = a[-1]
    return a, "".join(b), a[:-1] + "".join(c for k, c in enumerate(b) if k != j)


def _matmul_labels(nd_a: int, nd_b: int, shape_a, shape_b) -> tuple[str, str, str] | None:
    """numpy.matmul: stacks of matrices with their leading axes broadcast (equal sizes only)."""
    if nd_a == 0 or nd_b == 0:
        return None
    if nd_a == 1 or nd_b == 1:
        return _dot_labels(nd_a, nd_b) if nd_b <= 2 else None
    n_lead = max(nd_a, nd_b) - 2
    lead = _LETTERS[:n_lead]
    la, lb = lead[n_lead - (nd_a - 2):], lead[n_lead - (nd_b - 2):]
    for k in range(1, min(nd_a, nd_b) - 1):
        if shape_a[-2 - k] != shape_b[-2 - k]:
            return None
    m, k, n = _LETTERS[n_lead:n_lead + 3]
    return la + m + k, lb + k + n, lead + m + n


def _dot(orig, a, b, *args, precision=None, preferred_element_type=None, **kw):
    a, b = _unwrap(a), _unwrap(b)
    if not (_routed(a) or _routed(b)) or args:
        return orig(a, b, *args, precision=precision, preferred_element_type=preferred_element_type, **kw)
    labels = _dot_labels(a.ndim if _routed(a) else jnp.ndim(a), b.ndim if _routed(b) else jnp.ndim(b))
    if labels is None:
        return _unsupported("jnp.dot with a scalar", (a, b), lambda *ops: orig(*ops))
    return _contract(a, labels[0], b, labels[1], labels[2], precision=precision, preferred=preferred_element_type,
                     op="jnp.dot")


def _matmul(a, b, *, precision=None, preferred_element_type=None):
    a, b = _unwrap(a), _unwrap(b)
    labels = _matmul_labels(a.ndim if _routed(a) else jnp.ndim(a), b.ndim if _routed(b) else jnp.ndim(b),
                            a.shape if _routed(a) else jnp.shape(a), b.shape if _routed(b) else jnp.shape(b))
    if labels is None:
        return _unsupported("matmul broadcasting axes of different sizes", (a, b),
                            lambda *ops: _ORIG["matmul"](*ops, precision=precision))
    return _contract(a, labels[0], b, labels[1], labels[2], precision=precision, preferred=preferred_element_type,
                     op="matmul (@)")


def _matmul_fn(orig, a, b, *args, precision=None, preferred_element_type=None, **kw):
    a, b = _unwrap(a), _unwrap(b)
    if not (_routed(a) or _routed(b)) or args or kw:
        return orig(a, b, *args, precision=precision, preferred_element_type=preferred_element_type, **kw)
    return _matmul(a, b, precision=precision, preferred_element_type=preferred_element_type)


def _tensordot(orig, a, b, axes=2, *, precision=None, preferred_element_type=None, **kw):
    a, b = _unwrap(a), _unwrap(b)
    if not (_routed(a) or _routed(b)):
        return orig(a, b, axes, precision=precision, preferred_element_type=preferred_element_type, **kw)
    nd_a, nd_b = (x.ndim if _routed(x) else jnp.ndim(x) for x in (a, b))
    if isinstance(axes, (int, np.integer)):
        ca, cb = tuple(range(nd_a - int(axes), nd_a)), tuple(range(int(axes)))
    else:
        ca, cb = (tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in axes)
        ca, cb = tuple(i % nd_a for i in ca), tuple(j % nd_b for j in cb)
    la, lb, out = _dot_general_labels(nd_a, nd_b, ((ca, cb), ((), ())))
    return _contract(a, la, b, lb, out, precision=precision, preferred=preferred_element_type, op="jnp.tensordot")


def _astype(orig, x, dtype, *args, **kw):
    x = _unwrap(x)
    return x.astype(dtype) if _routed(x) else orig(x, dtype, *args, **kw)


def _asarray(orig, a, dtype=None, *args, **kw):
    a = _unwrap(a)
    if _routed(a) and not args and not kw.get("copy"):
        return a.astype(dtype) if dtype is not None else a
    return orig(a, dtype, *args, **kw)


def _convert_element_type(orig, operand, new_dtype=None, *args, **kw):
    operand = _unwrap(operand)
    if _routed(operand) and new_dtype is not None and not args:
        return operand.astype(new_dtype)
    return orig(operand, new_dtype, *args, **kw)


def _transpose(orig, a, axes=None, *args, **kw):
    a = _unwrap(a)
    return a.transpose(axes) if _routed(a) and not args and not kw else orig(a, axes, *args, **kw)


def _swapaxes(orig, a, axis1, axis2, *args, **kw):
    a = _unwrap(a)
    return a.swapaxes(axis1, axis2) if _routed(a) and not args and not kw else orig(a, axis1, axis2, *args, **kw)


def _unsupported(what: str, operands, compute: Callable):
    """A routed operand in an operation qjax cannot route: a Probe records it and computes densely; a
    RoutedWeight raises."""
    for o in operands:
        if isinstance(o, RoutedWeight):
            o._refuse()
    vals = [o.other(what) if isinstance(o, Probe) else o for o in operands]
    return compute(*vals)


_HANDLERS: dict[tuple[str, str], Callable] = {
    ("jax.numpy", "einsum"): _einsum,
    ("jax.numpy", "dot"): _dot,
    ("jax.numpy", "matmul"): _matmul_fn,
    ("jax.numpy", "tensordot"): _tensordot,
    ("jax.numpy", "astype"): _astype,
    ("jax.numpy", "asarray"): _asarray,
    ("jax.numpy", "array"): _asarray,
    ("jax.numpy", "transpose"): _transpose,
    ("jax.numpy", "swapaxes"): _swapaxes,
    ("jax.lax", "dot_general"): _dot_general,
    ("jax.lax", "dot"): _dot,
    ("jax.lax", "convert_element_type"): _convert_element_type,
}
_ORIG: dict[str, Callable] = {}
_lock = threading.Lock()


def _module(name: str):
    return jnp if name == "jax.numpy" else jax.lax


def install() -> None:
    """Wraps the routed functions of jax.numpy / jax.lax (once per process; idempotent). The wrappers call
    the original function for every call that holds no routed parameter."""
    with _lock:
        if _ORIG:
            return
        for (mod, name), handler in _HANDLERS.items():
            orig = getattr(_module(mod), name)
            setattr(_module(mod), name, _wrapper(orig, handler))
            _ORIG.setdefault(name, orig)


def _wrapper(orig, handler):
    @functools.wraps(orig)
    def wrapped(*args, **kwargs):
        return handler(orig, *args, **kwargs)

    wrapped._qjax_routed = True
    return wrapped


# ----------------------------------------------------------------------------- discovery


@dataclasses.dataclass(frozen=True)
class Found:
    """What one abstract pass saw of a candidate parameter: roles (None: not routable) and why not."""

    path: str
    roles: tuple[str, ...] | None
    why: str = ""
    read_by_matmul: bool = False


_NETS = ("jax.numpy", "jax.lax", "jax.nn", "jax.numpy.linalg")
_METADATA = frozenset({"ndim", "shape", "size", "result_type", "iscomplexobj", "isrealobj", "isscalar"})


@contextlib.contextmanager
def _nets():
    """During discovery only: every other public function of jax.numpy / jax.lax / jax.nn records a Probe
    it reads (and computes on its dense value) instead of failing on it."""
    import importlib
    saved = []
    for modname in _NETS:
        mod = importlib.import_module(modname)
        for name in dir(mod):
            if name.startswith("_"):
                continue
            fn = getattr(mod, name)
            if not callable(fn) or isinstance(fn, type) or getattr(fn, "_qjax_routed", False):
                continue
            saved.append((mod, name, fn))
            setattr(mod, name, _net(f"{modname.replace('jax.numpy', 'jnp')}.{name}", fn, name in _METADATA))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


class _net:  # noqa: N801 - stands in for a function or a ufunc object
    def __init__(self, label, fn, metadata: bool):
        self._label, self._fn, self._metadata = label, fn, metadata
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args, **kwargs):
        def sub(x):
            x = _unwrap(x)
            if isinstance(x, Probe):
                return x.value if self._metadata else x.other(self._label)
            if isinstance(x, (list, tuple)) and any(isinstance(_unwrap(e), Probe) for e in x):
                return type(x)(sub(e) for e in x)
            return x
        return self._fn(*(sub(a) for a in args), **{k: sub(v) for k, v in kwargs.items()})

    def __getattr__(self, name):
        return getattr(self._fn, name)


def trace_failed(model_name: str, e: Exception) -> ValueError:
    """The error for a model whose discovery pass raised `e`."""
    hint = (" (a parameter reached a function qjax does not wrap, e.g. one bound with `from jax.numpy import "
            "...` before qjax first converted a model: exclude it, or call it as `jnp.<name>`)"
            if "Probe" in str(e) else "")
    return ValueError(f"tracing {model_name} on the given inputs (to find which parameters its matmuls read) "
                      f"failed{hint}: {type(e).__name__}: {e}")


@contextlib.contextmanager
def recording():
    """Collects what Probes see; yields a function returning {path: Found} for given candidate paths."""
    install()
    _record.uses, _record.other, _record.matmuls = {}, {}, set()
    uses, other, matmuls = _record.uses, _record.other, _record.matmuls
    try:
        with _nets():
            yield lambda paths: {p: _found(p, uses.get(p, set()), other.get(p, []), p in matmuls) for p in paths}
    finally:
        _record.uses = _record.other = _record.matmuls = None


def _found(path: str, uses: set, other: list[str], matmul: bool) -> Found:
    if other:
        seen = sorted(set(other))
        return Found(path, None, "also read by " + ", ".join(seen[:3]) + (" ..." if len(seen) > 3 else ""),
                     read_by_matmul=matmul)
    if not uses:
        return Found(path, None, "not read by any matmul in the traced call")
    if len(uses) > 1:
        return Found(path, None, f"read by matmuls with different axis roles {sorted(uses)}", read_by_matmul=True)
    return Found(path, next(iter(uses)), read_by_matmul=True)
