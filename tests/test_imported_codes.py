"""LoRA on imported 4-bit codes (issue 15): variables whose kernels are already QuantizedArrays, in qjax's
(in, out) storage or torch's (out, in) (`transposed=True`, what a bitsandbytes state dict holds), convert
with adapters and the codes are never touched; layers of any in / out shape run them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import qjax
import qjax.linen as ql

F32 = qjax.QuantConfig(compute_dtype=jnp.float32)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):  # 128 -> 64 -> 96: in != out on both layers
        return nn.Dense(96, name="down")(nn.gelu(nn.Dense(64, name="up")(x)))


def _imported(variables, transposed: bool):
    """The variables as a bitsandbytes import leaves them: each kernel NF4 + DQ, stored (out, in) if transposed."""
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    for name in ("up", "down"):
        params[name]["kernel"] = qjax.quantize(params[name]["kernel"], "nf4", transposed=transposed)
    return {"params": params}


@pytest.mark.parametrize("transposed", [False, True])
def test_linen_lora_on_imported_codes(transposed):
    key = jax.random.key(int(transposed))
    x = jax.random.normal(key, (4, 128))
    model = Mlp()
    imported = _imported(model.init(jax.random.key(1), x), transposed)
    qm, qv = ql.convert(model, imported, qjax.LoraConfig(r=4), F32, jax.random.key(2), inputs=(x,))
    for name in ("up", "down"):
        before, after = imported["params"][name]["kernel"], qv["params"][name]["kernel"]
        assert after.transposed == transposed
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                        jax.tree_util.tree_leaves(after)))
        assert qv["params"][name]["lora_a"].shape[0] == before.shape[0]
    dense = {"params": {n: {"kernel": qjax.dequantize(imported["params"][n]["kernel"]),
                            "bias": imported["params"][n]["bias"]} for n in ("up", "down")}}
    # B = 0: the model on the dequantized codes, float32 matmuls (summation order only)
    np.testing.assert_allclose(qm.apply(qv, x), model.apply(dense, x), rtol=1e-5, atol=1e-5)
    tx = qjax.optim.adapters_only(optax.adam(1e-2))
    params, state = qv["params"], tx.init(qv["params"])
    loss = lambda p: jnp.mean((qm.apply({"params": p}, x) - 1.0) ** 2)  # noqa: E731
    first = float(loss(params))
    for _ in range(5):
        g = jax.grad(loss, allow_int=True)(params)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    assert float(loss(params)) < first
    np.testing.assert_array_equal(params["up"]["kernel"].packed, imported["params"]["up"]["kernel"].packed)


def test_loftq_on_imported_codes_is_refused():
    x = jnp.ones((2, 128))
    imported = _imported(Mlp().init(jax.random.key(1), x), True)
    with pytest.raises(ValueError, match="up/kernel is already quantized; LoftQ needs the dense kernel"):
        ql.convert(Mlp(), imported, qjax.LoraConfig(r=4, init="loftq"), F32, jax.random.key(2), inputs=(x,))


def test_nnx_lora_on_imported_codes():
    model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (4, 128))
    w = qjax.quantize(model.kernel.get_value(), "nf4", transposed=True)
    ref = x @ qjax.dequantize(w) + model.bias.get_value()[None, :]
    model.kernel.set_value(w)
    holder = nnx.Sequential(model)
    qjax.nnx.convert(holder, qjax.LoraConfig(r=4), F32, nnx.Rngs(1))
    layer = holder.layers[0]
    assert layer.kernel.get_value().transposed and np.array_equal(layer.kernel.get_value().packed, w.packed)
    np.testing.assert_allclose(holder(x), ref, rtol=1e-5, atol=1e-5)
