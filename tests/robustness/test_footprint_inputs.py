"""memory_footprint refuses what it cannot count instead of leaving it out of the totals."""

import dataclasses

import jax
import numpy as np
import pytest

import qjax


def test_non_array_leaf_is_named(rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    with pytest.raises(TypeError, match=r"'mlp/name'.*type=str"):
        qjax.memory_footprint({"mlp": {"kernel": w, "name": "up_proj"}})
    with pytest.raises(TypeError, match=r"type=str"):
        qjax.memory_footprint("params")


def test_quantized_array_with_damaged_leaves_is_named(rng):
    q = qjax.quantize(rng.standard_normal((64, 32)).astype(np.float32), "nf4", blocksize=64, double_quant=True)
    assert qjax.memory_footprint({"k": q}).total_params == 64 * 32
    for damaged in (dataclasses.replace(q, offset=None), dataclasses.replace(q, packed=q.packed[:10])):
        with pytest.raises(ValueError, match=r"^k: QuantizedArray.*(offset is missing|packed has shape=\(10,\))"):
            qjax.memory_footprint({"k": damaged})
    abstract = jax.eval_shape(lambda: {"k": q})  # ShapeDtypeStruct children are still counted
    assert qjax.memory_footprint(abstract).total_bytes == qjax.memory_footprint({"k": q}).total_bytes
