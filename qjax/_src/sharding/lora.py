"""Sharding of LoRA adapters derived from their frozen kernel's PartitionSpec."""

from __future__ import annotations

from typing import Mapping

from jax.sharding import PartitionSpec

from qjax._src.core.qarray import is_quantized
from qjax._src.sharding.specs import as_spec, entry_axes, stacked_axes

LORA_A, LORA_B, KERNEL = "lora_a", "lora_b", "kernel"


def _lora_specs(kernel_spec, k_ndim: int, a_ndim: int, b_ndim: int, where: str, split_rank: bool = False,
                lead: int | None = None):
    """(A spec, B spec) from the kernel's spec: A (lead..., in..., r) like `in`, B (lead..., r, out...) like `out`.

    lead: stacked-layer axes present in all three (split like the kernel's); None: inferred from
    the ranks. A kernel of rank lead + 2 with more adapter axes is a flattened `(prod(in),
    prod(out))` kernel (qjax.linen's DenseGeneral): its `in` / `out` entries go to the first
    `in` / `out` axis of the adapters, which row-major flattening splits the same way.
    split_rank: also split A's rank axis over the kernel's `out` mesh axes and B's over its `in`
    mesh axes, so each adapter (and its optimizer state) is split over every axis its kernel uses.
    """
    if lead is None:
        lead = a_ndim + b_ndim - 2 - k_ndim
    n_in, n_out = a_ndim - 1 - lead, b_ndim - 1 - lead
    ks = tuple(kernel_spec) + (None,) * (k_ndim - len(tuple(kernel_spec)))
    if lead < 0 or n_in < 1 or n_out < 1 or k_ndim - lead not in (n_in + n_out, 2):
        raise ValueError(f"{where}: LoRA shapes of rank {a_ndim} (lora_a) and {b_ndim} (lora_b) do not "
                         f"factor a rank-{k_ndim} kernel as (lead..., in..., out...)")
    if k_ndim - lead == n_in + n_out:
        ins, outs = ks[lead:lead + n_in], ks[lead + n_in:]
    else:  # flattened kernel
        ins = (ks[lead],) + (None,) * (n_in - 1)
        outs = (ks[lead + 1],) + (None,) * (n_out - 1)

    def merged(entries):
        axes = tuple(a for e in entries for a in entry_axes(e))
        return None if not axes else (axes[0] if len(axes) == 1 else axes)

    a_rank = merged(outs) if split_rank else None
    b_rank = merged(ins) if split_rank else None
    return as_spec(ks[:lead] + ins + (a_rank,)), as_spec(ks[:lead] + (b_rank,) + outs)


def shape_of(x) -> tuple[int, ...] | None:
    if x is None:
        return None
    return tuple(x.shape) if hasattr(x, "shape") else None


def lora_sharding(specs, params=None, *, split_rank: bool = False):
    """Spec tree with every `lora_a` / `lora_b` spec derived from its sibling `kernel` spec.

    specs: nested dicts (a Linen params tree's layout) of PartitionSpecs over dense shapes.
    params: the matching params tree (arrays, QuantizedArrays or ShapeDtypeStructs), used to
      find which kernel axes are `in` and which are `out` for kernels of any rank: lora_a is
      `(lead..., in..., r)` and lora_b `(lead..., r, out...)` (lead: stacked-layer axes).
      Without it, the kernel is taken as `(in, out)` with leading axes stacked.
    split_rank: False (default): the rank axis is replicated, so `x @ A @ B` needs no
      resharding of the adapters, but each adapter is split over only one of its kernel's mesh
      axes. True: A's rank axis is also split over the kernel's `out` mesh axes and B's over its
      `in` axes (FSDP over the adapters and their optimizer state; r must divide evenly).
    Returns a new spec tree: lora_a split like the kernel's `in` axes, lora_b like its `out` axes.
    """
    def walk(s, p, where):
        if not isinstance(s, Mapping):
            return s
        out = {k: walk(v, (p or {}).get(k) if isinstance(p, Mapping) else None, f"{where}/{k}".lstrip("/"))
               for k, v in s.items()}
        if KERNEL in s and (LORA_A in s or LORA_B in s):
            kspec = s[KERNEL] if s[KERNEL] is not None else PartitionSpec()
            pk = p.get(KERNEL) if isinstance(p, Mapping) else None
            pa = p.get(LORA_A) if isinstance(p, Mapping) else None
            pb = p.get(LORA_B) if isinstance(p, Mapping) else None
            lead = None
            if pk is not None and pa is not None and pb is not None:
                k_nd, a_nd, b_nd = len(shape_of(pk) or ()), len(shape_of(pa)), len(shape_of(pb))
                if is_quantized(pk):  # logical shape of one layer, plus its stacked axes
                    lead = stacked_axes(pk)
                    k_nd += lead
            else:
                k_nd = max(len(tuple(kspec)), 2)
                a_nd = b_nd = k_nd
            a, b = _lora_specs(kspec, k_nd, a_nd, b_nd, where or "params", split_rank, lead)
            if LORA_A in s:
                out[LORA_A] = a
            if LORA_B in s:
                out[LORA_B] = b
        return type(s)(out) if not isinstance(s, dict) else out

    return walk(specs, params, "")


# ----------------------------------------------------------------------------- trees
