"""Sharding of adapters derived from their frozen kernel's PartitionSpec (each variant's `axes` say how)."""

from __future__ import annotations

from typing import Mapping

from jax.sharding import PartitionSpec

from qjax._src.adapters.tree import is_adapter_path
from qjax._src.adapters.variant import variant_for, variants
from qjax._src.core.qarray import is_quantized
from qjax._src.sharding.specs import as_spec, stacked_axes

KERNEL = "kernel"
ROUTED_SUFFIX = "_lora"  # qjax.linen.convert's node for the adapters of a module's param <name>: "<name>_lora"


def _routed_base(s, pget, names) -> str | None:
    """The key of the one param of rank >= 2 (not an adapter) beside adapters `names`: the base of a param
    converted where it is (qjax.linen.convert with inputs=), or None."""
    if not names:
        return None
    hits = [k for k in s if k not in names and (is_quantized(pget(k)) or len(shape_of(pget(k)) or ()) >= 2)]
    return hits[0] if len(hits) == 1 else None


def _adapter_specs(variant, kernel_spec, k_ndim: int, shapes: Mapping[str, tuple] | None, where: str,
                   split_rank: bool = False, lead: int | None = None) -> dict[str, PartitionSpec]:
    """{leaf: spec} of one layer's adapter from its kernel's spec (`AdapterVariant.specs`).

    k_ndim: the kernel's rank (a QuantizedArray's logical 2 plus its stacked axes). shapes: the
    adapter's leaf shapes (None: a plain (in, out) kernel with leading axes stacked). lead:
    stacked-layer axes (None: from the shapes and the kernel's rank). A kernel of rank lead + 2
    with more in / out axes is a flattened `(prod(in), prod(out))` kernel (qjax.linen's
    DenseGeneral): its `in` / `out` entries go to the first in / out axis of the adapter, which
    row-major flattening splits the same way.
    """
    ks = tuple(kernel_spec) + (None,) * (k_ndim - len(tuple(kernel_spec)))
    if shapes is None:
        lead, n_in, n_out = k_ndim - 2, 1, 1
    else:
        layout = None
        if lead is not None:
            layout = variant.layout(shapes, n_lead=lead)
        else:  # the most stacked axes that fit the kernel, as is or flattened
            for k in reversed(range(k_ndim + 1)):
                found = variant.layout(shapes, n_lead=k)
                if found is not None and k_ndim - k in (len(found.in_shape) + len(found.out_shape), 2):
                    layout, lead = found, k
                    break
        n_in, n_out = (len(layout.in_shape), len(layout.out_shape)) if layout is not None else (0, 0)
        if layout is None or n_in < 1 or n_out < 1 or k_ndim - lead not in (n_in + n_out, 2):
            raise ValueError(f"{where}: {variant.name} adapter shapes "
                             f"{', '.join(f'{k}={tuple(v)}' for k, v in shapes.items())} do not factor a "
                             f"rank-{k_ndim} kernel as (lead..., in..., out...)")
    if k_ndim - lead == n_in + n_out:
        ins, outs = ks[lead:lead + n_in], ks[lead + n_in:]
    else:  # flattened kernel
        ins = (ks[lead],) + (None,) * (n_in - 1)
        outs = (ks[lead + 1],) + (None,) * (n_out - 1)
    entries = variant().specs(ks[:lead], ins, outs, split_rank=split_rank)
    return {name: as_spec(e) for name, e in entries.items()}


def shape_of(x) -> tuple[int, ...] | None:
    if x is None:
        return None
    return tuple(x.shape) if hasattr(x, "shape") else None


def lora_sharding(specs, params=None, *, split_rank: bool = False):
    """Spec tree with every adapter leaf's spec (LoRA's `lora_a` / `lora_b`, ...) derived from its
    sibling `kernel` spec, as the adapter's variant lays it out. A param converted where it is
    (docs/any_model.md) is the kernel of the adapters beside it (the one param of rank >= 2 there),
    or of those under `<name>_lora` beside it.

    specs: nested dicts (a Linen params tree's layout) of PartitionSpecs over dense shapes.
    params: the matching params tree (arrays, QuantizedArrays or ShapeDtypeStructs), used to
      find which kernel axes are `in` and which are `out` for kernels of any rank: lora_a is
      `(lead..., in..., r)` and lora_b `(lead..., r, out...)` (lead: stacked-layer axes).
      Without it, the kernel is taken as `(in, out)` with leading axes stacked (and the module's
      adapter as LoRA's pair when only one of its leaves is in specs).
    split_rank: False (default): the rank axis is replicated, so `x @ A @ B` needs no
      resharding of the adapters, but each adapter is split over only one of its kernel's mesh
      axes. True: A's rank axis is also split over the kernel's `out` mesh axes and B's over its
      `in` axes (FSDP over the adapters and their optimizer state; r must divide evenly).
    Returns a new spec tree: lora_a split like the kernel's `in` axes, lora_b like its `out` axes.
    """
    def derive(kspec, pk, s, p, names, where):
        """{adapter leaf: spec} of the adapters `names` of `s` (params `p`) from their kernel's spec."""
        kspec = kspec if kspec is not None else PartitionSpec()
        leaves = {k: p.get(k) for k in p if is_adapter_path((k,))} if isinstance(p, Mapping) else {}
        lead, shapes = None, None
        if pk is not None and leaves and all(v is not None for v in leaves.values()):
            variant = variant_for(leaves, where or "params")
            shapes = {k: shape_of(v) for k, v in leaves.items()}
            k_nd = len(shape_of(pk) or ())
            if is_quantized(pk):  # logical shape of one layer, plus its stacked axes
                lead = stacked_axes(pk)
                k_nd += lead
        else:
            variant = _variant_of(names, where)
            k_nd = max(len(tuple(kspec)), 2)
        derived = _adapter_specs(variant, kspec, k_nd, shapes, where or "params", split_rank, lead)
        return {k: derived[k] for k in names if k in derived}

    def walk(s, p, where):
        if not isinstance(s, Mapping):
            return s
        out = {k: walk(v, (p or {}).get(k) if isinstance(p, Mapping) else None, f"{where}/{k}".lstrip("/"))
               for k, v in s.items()}
        pget = (lambda k: p.get(k)) if isinstance(p, Mapping) else (lambda k: None)  # noqa: E731
        names = [k for k in s if is_adapter_path((k,))]
        base = KERNEL if KERNEL in s else _routed_base(s, pget, names)
        if base is not None and names:
            out.update(derive(s[base], pget(base), s, p, names, where))
        for k, sub in s.items():  # a module holding several converted params: "<name>_lora" beside "<name>"
            name = k[:-len(ROUTED_SUFFIX)] if isinstance(k, str) and k.endswith(ROUTED_SUFFIX) else None
            if name in s and isinstance(sub, Mapping):
                sub_names = [n for n in sub if is_adapter_path((n,))]
                if sub_names:
                    sub_p = pget(k)
                    derived = derive(s[name], pget(name), sub, sub_p, sub_names, f"{where}/{k}".lstrip("/"))
                    out[k] = type(out[k])({**out[k], **derived}) if not isinstance(out[k], dict) \
                        else {**out[k], **derived}
        return type(s)(out) if not isinstance(s, dict) else out

    return walk(specs, params, "")


def _variant_of(names, where: str):
    """The variant of a module whose spec tree names `names` (all of one variant's leaves or, LoRA's
    convention, part of them: the registered variant with the fewest leaves holding them)."""
    fits = sorted((cls for cls in variants() if set(names) <= set(cls.axes)), key=lambda cls: len(cls.axes))
    return fits[0] if fits else variant_for(names, where or "params")
