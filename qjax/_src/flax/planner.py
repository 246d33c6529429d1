"""The conversion planner shared by `qjax.linen.convert` and `qjax.nnx.convert`: pure functions, no Flax.

A conversion is three steps:

1. A *finder* lists the model's layers as `Candidate`s: module path, how errors name the layer,
   the stored kernel, its `KernelLayout` (or why it cannot be converted) and a handle of its own. The
   Linen finder (`linen_convert`) reads the params tree, or traces one abstract forward pass when
   given inputs; the NNX finder (`nnx_convert`) walks the module graph.
2. `plan(finder, lora_config, quant_config)` selects and validates (patterns matched by
   `select`, rank vs layer size, float kernels, layers that cannot be converted) and returns one
   `Planned` per layer to convert, with each error message written once here.
3. The finder's module applies the plan its own way: Linen writes `adapter_params(...)` into the
   variables and intercepts the layers' calls; NNX swaps in QLoRA modules built from the plain
   ones (their constructors quantize and make the adapters, as they do for a fresh layer).
   Merging back goes through `merged_kernel` in both.

A new finder plugs in by producing `Candidate`s (say, one per rank >= 2 parameter read by an
intercepted matmul: path = the parameter's module path, layout = how that matmul contracts it,
handle = whatever it needs to substitute the quantized base) and satisfying `Finder`; it then
calls `plan` and `adapter_params` and stores their results where its model reads parameters.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Protocol, Sequence

import jax.numpy as jnp

from qjax._src.adapters import lora as L
from qjax._src.core.family import is_quantized
from qjax._src.errors import named
from qjax._src.flax import select as S
from qjax._src.matmul import base as B


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a stored kernel maps onto stacks of 2-D (prod(in_shape), prod(out_shape)) matrices.

    lead: the axes of stacked (scanned / vmapped) layers, first on every leaf. batch: axes after
    `lead` with one matrix per index (per-expert einsums, batched DenseGeneral). einsum: None for a
    kernel stored as (*lead, *batch, *in_shape, *out_shape); else the equation of a kernel stored
    in its own layout (*lead, *kernel_shape), whose `EinsumPlan` names the in/out/batch axes.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    lead: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    einsum: str | None = None

    @property
    def stack(self) -> tuple[int, ...]:
        """The axes every 2-D matrix (and adapter pair) is stacked over: (*lead, *batch)."""
        return self.lead + self.batch

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """The stored dense kernel's shape."""
        if self.einsum is not None:
            return self.lead + B.EinsumPlan(self.einsum).kernel_shape(self.in_shape, self.out_shape, self.batch)
        return self.stack + self.in_shape + self.out_shape


@dataclasses.dataclass(frozen=True, eq=False)
class Candidate:
    """A layer a finder found.

    path: module path relative to the model ("layers/0/attn/q_proj"), what patterns match.
    where: the layer as error messages name it (Linen: "params/<path>").
    kernel: the stored dense kernel (an array, or anything with shape/dtype/size), `layout.dense_shape`.
    layout: None for a layer that cannot be converted; `why` says why (raised if it is selected).
    handle: the finder's own reference for applying the plan (the planner never reads it).
    """

    path: str
    where: str
    kernel: Any
    layout: KernelLayout | None
    why: str = ""
    handle: Any = None
    kernel_path: str = ""  # the path QuantConfig patterns see; default "<path>/kernel"

    @property
    def quant_path(self) -> str:
        return self.kernel_path or f"{self.path}/kernel"


@dataclasses.dataclass(frozen=True)
class LeftDense:
    """A parameter that feeds a matmul (or may: `why` says so) and that conversion left as it was."""

    path: str  # the parameter's path
    shape: tuple[int, ...]
    dtype: Any
    why: str

    def __str__(self) -> str:
        return f"{self.path} {self.shape} {jnp.dtype(self.dtype).name}: {self.why}"


@dataclasses.dataclass(frozen=True, eq=False)
class Planned:
    """A layer to convert: lora (it gets adapters), quant_config (its base's config; None: stays dense)."""

    candidate: Candidate
    lora: bool
    quant_config: Any

    @property
    def path(self) -> str:
        return self.candidate.path

    @property
    def layout(self) -> KernelLayout:
        return self.candidate.layout


class Finder(Protocol):
    """What `plan` needs from a way of finding layers."""

    model_name: str  # for messages: the model's class name
    layer_kinds: str  # for messages: the layer classes it finds, e.g. "nnx.Linear / nnx.LinearGeneral / nnx.Einsum"

    def candidates(self) -> Sequence[Candidate]:
        """Every layer it found, in a fixed order (the order adapters draw their keys in)."""

    def unconvertible(self) -> Sequence[LeftDense]:
        """Optional: parameters it saw that cannot be converted (read by other operations too, or not
        traced); `plan` names them when a target pattern matches only them, `left_dense` lists them."""


def plan(finder: Finder, lora_config, quant_config) -> list[Planned]:
    """The layers `finder` found that get adapters or a quantized base, validated.

    lora_config: a LoraConfig (its target_modules / exclude select by module path) or None.
    quant_config: a QuantConfig or per-path policy, asked `config_for` about each kernel path
    (`select.kernel_paths`); kernels smaller than the chosen config's min_size stay dense.
    Raises ValueError (naming paths) for a finder that found no layer, a target pattern matching
    nothing, a selected layer that cannot be converted, r larger than a layer's dimensions, or a
    config that selects no layer; TypeError for a selected layer whose kernel is not float.
    """
    found = list(finder.candidates())
    if not found:
        raise ValueError(f"{finder.model_name} has no {finder.layer_kinds} layer; there is nothing to convert"
                         + "".join(f"\n  {u}" for u in _unconvertible(finder)))
    paths = [c.path for c in found]
    if lora_config is not None and lora_config.target_modules != "all-linear":
        _check_targets(lora_config.target_modules, paths, _unconvertible(finder))
    others = [q for u in _unconvertible(finder) for q in (u.path, u.path.rpartition("/")[0])]
    lora_paths = set(S.select_layers(paths, lora_config, others)) if lora_config is not None else set()
    kernel_paths = S.kernel_paths(quant_config, {c.path: c.quant_path for c in found}) \
        if quant_config is not None else {}

    def quant_for(c: Candidate):
        qc = quant_config.config_for(kernel_paths[c.path]) if quant_config is not None else None
        return qc if qc is not None and int(c.kernel.size) >= qc.min_size else None

    chosen = []
    for c in found:
        lora, qc = c.path in lora_paths, quant_for(c)
        if lora or qc is not None:
            chosen.append(Planned(c, lora, qc))
    for p in chosen:  # every layer that cannot be converted before any other complaint
        if p.candidate.layout is None:
            raise ValueError(f"{p.candidate.why}. To leave this layer unconverted, exclude it from LoRA "
                             "(LoraConfig.exclude) and from quantization (QuantConfig.skip)")
    for p in chosen:
        if p.lora:
            L.check_rank(lora_config.r, p.layout.in_shape, p.layout.out_shape, p.candidate.where)
    if not chosen:
        raise ValueError(f"no layer of {finder.model_name} was selected for LoRA or quantization; "
                         f"its linear layers are {paths}")
    for p in chosen:
        if not jnp.issubdtype(p.candidate.kernel.dtype, jnp.floating):
            raise TypeError(f"{named(p.candidate.where + '/kernel', p.candidate.kernel)} is not a float kernel; only "
                            "float kernels can be quantized or get adapters (exclude this layer or load float weights)")
    return chosen


def _unconvertible(finder) -> list[LeftDense]:
    """The finder's unconvertible parameters (a finder without `unconvertible` has none)."""
    get = getattr(finder, "unconvertible", None)
    return list(get()) if get is not None else []


def _check_targets(patterns, paths, unconvertible) -> None:
    """ValueError for a target pattern that matches no convertible layer but some parameter that cannot be."""
    for pattern in patterns:
        if any(S.module_matches(p, pattern) for p in paths):
            continue
        hits = [u for u in unconvertible if S.module_matches(u.path, pattern)
                or S.module_matches(u.path.rsplit("/", 1)[0], pattern)]
        if hits:
            raise ValueError(f"LoraConfig.target_modules pattern {pattern!r} matches only parameters that cannot be "
                             "converted: " + "; ".join(str(u) for u in hits[:4]))


def left_dense(finder: Finder, chosen: Sequence[Planned], lora_config, quant_config) -> list[LeftDense]:
    """Every parameter that feeds a matmul and that the plan leaves untouched (no adapters, no quantized
    base), with why: the finder's unconvertible ones, and its layers no config selected. A parameter the
    user excluded by name (`LoraConfig.exclude` matching it or its module) is their choice, not listed."""
    done = {id(p.candidate) for p in chosen}
    found = list(finder.candidates())
    paths = [c.path for c in found]
    with warnings.catch_warnings():  # plan has warned about exclude patterns already
        warnings.simplefilter("ignore")
        lora_paths = set(S.select_layers(paths, lora_config)) if lora_config is not None else set()
    kernel_paths = S.kernel_paths(quant_config, {c.path: c.quant_path for c in found}) \
        if quant_config is not None else {}

    def excluded(path: str) -> bool:
        return lora_config is not None and any(S.module_matches(q, e) for e in lora_config.exclude
                                               for q in (path, path.rpartition("/")[0]))

    out = [u for u in _unconvertible(finder) if not excluded(u.path)]
    for c in found:
        if id(c) in done or excluded(c.path):
            continue
        why = []
        if lora_config is None:
            why.append("no LoraConfig")
        elif c.path not in lora_paths:
            head = lora_config.target_modules == "all-linear" and c.path.rsplit("/", 1)[-1].lower() in S.HEAD_NAMES
            why.append("an output head (\"all-linear\" leaves heads alone)" if head
                       else "not selected by LoraConfig target_modules / exclude")
        if quant_config is None:
            why.append("no QuantConfig")
        else:
            qc = quant_config.config_for(kernel_paths[c.path])
            why.append("skipped by the QuantConfig" if qc is None else
                       f"smaller than QuantConfig.min_size={qc.min_size}")
        out.append(LeftDense(c.quant_path, tuple(c.kernel.shape), c.kernel.dtype, "; ".join(why)))
    return out


def adapter_params(where: str, layout: KernelLayout, kernel, lora_config, quant_config,
                   key) -> tuple[Any, dict[str, Any]]:
    """The converted parameters of one layer: (base kernel, {adapter leaf name: array}).

    kernel: dense, `layout.dense_shape`, or already quantized (kept as it is, codes untouched; LoftQ
    refused). quant_config None: the base stays `kernel`; else a 2-D
    QuantizedArray (prod(in), prod(out)) stacked over `layout.stack`. lora_config None: no adapters;
    else the leaves of its variant (LoRA: lora_a (*stack, *in, r) / lora_b (*stack, r, *out)) float32,
    by LoftQ when lora_config.init is "loftq" and the base is quantized (the base then comes from
    LoftQ too), else drawn with `key`.
    Raises what quantizing raises (TypeError / ValueError), prefixed with "<where>/kernel".
    """
    plan = B.EinsumPlan(layout.einsum) if layout.einsum is not None else None
    if is_quantized(kernel):  # already quantized (a bitsandbytes checkpoint): the codes stay as they are
        if L.wants_loftq(lora_config, quant_config):
            raise ValueError(f"{where}/kernel is already quantized; LoftQ needs the dense kernel (load 16-bit "
                             "weights, or use LoraConfig(init='default'))")
        if lora_config is None:
            return kernel, {}
        return kernel, L.init_params(key, layout.in_shape, layout.out_shape, lora_config, lead=layout.stack)
    try:
        if L.wants_loftq(lora_config, quant_config):
            n_in = len(layout.in_shape)
            if plan is not None:
                kernel, n_in = B.permute_einsum_kernel(plan, kernel, len(layout.lead)), len(plan.in_labels)
            return L.loftq_params(kernel, n_in, lora_config, quant_config, lead=len(layout.stack))
        if quant_config is not None:
            kernel = (B.quantize_einsum_kernel(plan, kernel, quant_config, lead=len(layout.lead)) if plan is not None
                      else B.quantize_kernel(kernel, len(layout.in_shape), quant_config, lead=len(layout.stack)))
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}/kernel: {e}") from None
    if lora_config is None:
        return kernel, {}
    return kernel, L.init_params(key, layout.in_shape, layout.out_shape, lora_config, lead=layout.stack)


def merged_kernel(where: str, layout: KernelLayout, kernel, adapters: Mapping[str, Any], lora_config, dtype=None):
    """The adapter folded into the base (its variant's merge; LoRA: W + scaling * A @ B, PEFT's merge) of
    one converted layer, as a dense kernel `layout.dense_shape`.

    kernel: the base (`adapter_params`' first result). adapters: its leaves (ignored without adapters,
    lora_config None). dtype: default the kernel's original dtype.
    Raises ValueError naming `where` and every leaf that does not fit the layout.
    """
    L.check_params(where, kernel, adapters, lora_config=lora_config, in_shape=layout.in_shape,
                   out_shape=layout.out_shape, stack=layout.stack, dense_shape=layout.dense_shape)
    params = dict(adapters) if lora_config is not None else None
    kw = dict(variant=lora_config.variant if lora_config is not None else None,
              scaling=lora_config.scaling if lora_config is not None else 0.0, dtype=dtype or B.kernel_dtype(kernel))
    if layout.einsum is not None:
        plan = B.EinsumPlan(layout.einsum)
        shape = plan.kernel_shape(layout.in_shape, layout.out_shape, layout.batch)
        fn = lambda k, p: L.einsum_merged_params(plan, k, p, kernel_shape=shape, **kw)  # noqa: E731
        return B.vmap_lead(fn, len(layout.lead))(kernel, params)
    fn = lambda k, p: L.merged_params(k, p, in_shape=layout.in_shape, out_shape=layout.out_shape, **kw)  # noqa: E731
    return B.vmap_lead(fn, len(layout.stack))(kernel, params)
