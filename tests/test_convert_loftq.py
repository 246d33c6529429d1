"""convert with LoraConfig(init="loftq"), per-path QuantRules (mixed precision) and LLM.int8 bases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import qjax
from helpers import nnx_train_mse
import qjax.linen as ql
import qjax.nnx as qn
from qjax._src.adapters import lora as L


def _q(fmt, **kw):
    return qjax.QuantConfig(format=fmt, compute_dtype=jnp.float32, **kw)


def _rel(a, b):
    return float(jnp.linalg.norm(jnp.asarray(a, jnp.float32) - b) / jnp.linalg.norm(b))


# ----------------------------------------------------------------------------- Linen


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(64, name="mix")(jnp.tanh(h)), None


class LinenNet(nn.Module):
    """Dense, DenseGeneral (rank-3 kernel), Einsum (rank-3 kernel) and a scanned (stacked) layer."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(128, name="layers_0")(x)
        h = nn.DenseGeneral((4, 32), name="layers_1")(jnp.tanh(h))
        h = nn.Einsum((4, 32, 64), "bnh,nhd->bd", name="layers_2")(h)
        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="stack")(h, None)
        return nn.Dense(64, name="layers_3")(h)


def _linen(rng):
    x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    model = LinenNet()
    v = model.init(jax.random.key(int(rng.integers(2**31))), x)
    return model, v, x


@pytest.mark.parametrize("fmt", ["nf4", "nf2"])
def test_linen_loftq_closer_to_original_than_default_init(fmt, rng):
    model, v, x = _linen(rng)
    y = model.apply(v, x)
    errs = {}
    for init in ("default", "loftq"):
        lc = qjax.LoraConfig(r=16, alpha=32, init=init, loftq_iter=2)
        qm, qv = ql.convert(model, v, lc, _q(fmt), jax.random.key(1), inputs=(x,))
        errs[init] = _rel(qm.apply(qv, x), y)
    print(fmt, errs)
    assert errs["loftq"] < 0.9 * errs["default"]
    p = qv["params"]
    # rank > 2 kernels: quantized as 2-D, adapters in the layer's own axes
    assert p["layers_1"]["kernel"].shape == (128, 128) and p["layers_1"]["lora_b"].shape == (16, 4, 32)
    assert p["layers_2"]["kernel"].shape == (128, 64) and p["layers_2"]["lora_a"].shape == (4, 32, 16)
    # stacked layers: each one initialized on its own, exactly as loftq_init on its slice
    assert p["stack"]["mix"]["lora_a"].shape == (3, 64, 16)
    w1 = v["params"]["stack"]["mix"]["kernel"][1]
    q1, a1, b1 = qjax.loftq_init(w1, lc, _q(fmt))
    np.testing.assert_allclose(np.asarray(p["stack"]["mix"]["lora_a"][1]), np.asarray(a1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(p["stack"]["mix"]["kernel"].packed[1]), np.asarray(q1.packed))


def test_linen_loftq_scaling_folded(rng):
    """dequantize(q) + scaling * A @ B is LoftQ's approximation whatever alpha is."""
    model, v, x = _linen(rng)
    for alpha in (4, 64):
        lc = qjax.LoraConfig(r=8, alpha=alpha, init="loftq")
        qm, qv = ql.convert(model, v, lc, _q("nf4"), jax.random.key(1), inputs=(x,))
        layer = qv["params"]["layers_0"]
        approx = qjax.dequantize(layer["kernel"], jnp.float32) + lc.scaling * layer["lora_a"] @ layer["lora_b"]
        q, a, b = qjax.loftq(v["params"]["layers_0"]["kernel"], 8, _q("nf4"))
        np.testing.assert_allclose(np.asarray(approx), np.asarray(qjax.dequantize(q, jnp.float32) + a @ b),
                                   rtol=1e-4, atol=1e-5)


def test_linen_loftq_standalone_layer_and_16bit_fallback(rng):
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    m = ql.QLoRADense(32, lora_config=qjax.LoraConfig(r=4, init="loftq"), quant_config=_q("nf4"))
    v = m.init(jax.random.key(0), x)
    assert float(jnp.abs(v["params"]["lora_b"]).max()) > 0  # LoftQ, not B = 0
    # a layer whose base stays dense has nothing to correct: default init, output = original
    model, v, x = _linen(rng)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4, init="loftq"), None, jax.random.key(1), inputs=(x,))
    np.testing.assert_array_equal(np.asarray(qm.apply(qv, x)), np.asarray(model.apply(v, x)))


# ----------------------------------------------------------------------------- NNX


class NBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 128, rngs=rngs)
        self.q = nnx.LinearGeneral(128, (4, 32), rngs=rngs)
        self.o = nnx.Einsum("bnh,nhd->bd", (4, 32, 64), (64,), rngs=rngs)

    def __call__(self, x):
        return x + self.o(self.q(jnp.tanh(self.up(x))))


class NModel(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([NBlock(rngs) for _ in range(3)])

        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key):
            return nnx.Linear(64, 64, rngs=nnx.Rngs(key))
        self.stack = make(jax.random.split(rngs.params(), 2))

    def __call__(self, x):
        for b in self.layers:
            x = b(x)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, layer):
            return h + layer(jnp.tanh(h))
        return body(x, self.stack)


@pytest.mark.parametrize("fmt", ["nf4", "nf2"])
def test_nnx_loftq_closer_to_original_than_default_init(fmt, rng):
    seed = int(rng.integers(2**31))
    x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    y = NModel(nnx.Rngs(seed))(x)
    errs = {}
    for init in ("default", "loftq"):
        model = NModel(nnx.Rngs(seed))
        qn.convert(model, qjax.LoraConfig(r=16, alpha=32, init=init, loftq_iter=2), _q(fmt), nnx.Rngs(1))
        errs[init] = _rel(model(x), y)
    print(fmt, errs)
    assert errs["loftq"] < 0.9 * errs["default"]
    assert model.layers[0].o.lora_a.shape == (4, 32, 16) and model.layers[0].o.kernel.get_value().shape == (128, 64)
    assert model.layers[0].q.lora_b.shape == (16, 4, 32)
    assert model.stack.lora_a.shape == (2, 64, 16)
    # trains (LoRAParam only) from the LoftQ start
    losses, _ = nnx_train_mse(model, x, y, 20, optax.adam(1e-3))
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- mixed precision


def test_mixed_precision_linen_and_nnx(rng):
    rules = qjax.first_blocks(2, _q("nf4"), _q("nf2"))
    model, v, x = _linen(rng)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=8, init="loftq"), rules, jax.random.key(1), inputs=(x,))
    p = qv["params"]
    formats = {k: p[k]["kernel"].format for k in ("layers_0", "layers_1", "layers_2", "layers_3")}
    assert formats == {"layers_0": "nf4", "layers_1": "nf4", "layers_2": "nf2", "layers_3": "nf2"}
    assert p["stack"]["mix"]["kernel"].format == "nf2"
    fp = qjax.memory_footprint(qv)
    by = fp.bits_by_format()
    assert 4.0 < by["nf4"] < 4.6 and 2.0 < by["nf2"] < 2.6
    assert by["nf2"] < fp.quantized_bits_per_param < by["nf4"]
    n4 = 64 * 128 + 128 * 128
    n2 = 128 * 64 + 3 * 64 * 64 + 64 * 64
    np.testing.assert_allclose(fp.quantized_bits_per_param, (by["nf4"] * n4 + by["nf2"] * n2) / (n4 + n2), rtol=1e-6)
    assert "nf4" in str(fp) and "nf2" in str(fp)
    # the converted model runs with each layer's own config
    assert np.isfinite(np.asarray(qm.apply(qv, x))).all()
    # a rule may keep a layer 16-bit (None)
    keep = qjax.QuantRules(((("*layers_3*",), None),), _q("nf4"))
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4), keep, jax.random.key(1), inputs=(x,))
    assert not qjax.is_quantized(qv["params"]["layers_3"]["kernel"]) and "lora_a" in qv["params"]["layers_3"]
    assert qjax.is_quantized(qv["params"]["layers_0"]["kernel"])

    model = NModel(nnx.Rngs(0))
    qn.convert(model, qjax.LoraConfig(r=8), qjax.first_blocks(1, _q("nf4"), _q("nf3")), nnx.Rngs(1))
    assert model.layers[0].up.kernel.get_value().format == "nf4"
    assert model.layers[1].up.kernel.get_value().format == "nf3"
    assert model.stack.kernel.get_value().format == "nf3"
    assert model.layers[0].up.quant_config.format == "nf4"
    fp = qjax.memory_footprint(nnx.state(model))
    assert set(fp.bits_by_format()) == {"nf4", "nf3"}
    assert fp.bits_by_format()["nf3"] < fp.quantized_bits_per_param < fp.bits_by_format()["nf4"]


# ----------------------------------------------------------------------------- LLM.int8 base

INT8 = qjax.QuantConfig(format="int8", blocksize=None, double_quant=False, compute_dtype=jnp.float32,
                        llm_int8_threshold=6.0)


def _outlier_x(rng, shape=(8, 64)):
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, [3, 17]] *= 30.0  # planted outlier feature columns
    return jnp.asarray(x)


def test_int8_linen_layer_equals_int8_matmul_plus_delta(rng):
    x = _outlier_x(rng)
    m = ql.QLoRADense(32, lora_config=qjax.LoraConfig(r=4, alpha=8), quant_config=INT8)
    v = m.init(jax.random.key(0), x)
    p = dict(v["params"])
    p["lora_b"] = jnp.asarray(rng.standard_normal(p["lora_b"].shape), jnp.float32) * 0.1
    y = m.apply({"params": p}, x)
    q = p["kernel"]
    assert q.format == "int8" and q.blocksize is None
    want = qjax.int8_matmul(x, q, threshold=6.0) + p["bias"][None, :] + 2.0 * (x @ p["lora_a"] @ p["lora_b"])
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    # and it is not the plain dequantize-and-matmul product (the outliers went through 16-bit)
    no_dec = qjax.int8_matmul(x, q, threshold=0.0) + p["bias"][None, :] + 2.0 * (x @ p["lora_a"] @ p["lora_b"])
    assert not np.allclose(np.asarray(y), np.asarray(no_dec), rtol=1e-6, atol=1e-6)
    # threshold 0 in the config: no decomposition
    m0 = ql.QLoRADense(32, lora_config=qjax.LoraConfig(r=4, alpha=8),
                       quant_config=qjax.QuantConfig(format="int8", blocksize=None, double_quant=False,
                                                     compute_dtype=jnp.float32, llm_int8_threshold=0.0))
    np.testing.assert_allclose(np.asarray(m0.apply({"params": p}, x)), np.asarray(no_dec), rtol=1e-5, atol=1e-5)


def test_int8_convert_linen_trains(rng):
    model, v, _ = _linen(rng)
    x = _outlier_x(rng, (32, 64))
    y = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4), INT8, jax.random.key(1), inputs=(x,))
    p = qv["params"]
    lin = p["layers_0"]
    delta = lin["lora_a"] @ (jnp.ones_like(lin["lora_b"]) * 0.01)
    # layer math of a converted Dense: int8_matmul base + bias + LoRA delta
    lin2 = dict(lin, lora_b=jnp.ones_like(lin["lora_b"]) * 0.01)
    got = L.lora_linear(x, lin2["kernel"], lin2["bias"], lin2["lora_a"], lin2["lora_b"], n_in=1, out_shape=(128,),
                        scaling=2.0, compute_dtype=jnp.float32, out_dtype=jnp.float32, int8_threshold=6.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(qjax.int8_matmul(x, lin["kernel"], threshold=6.0)
                                                          + lin["bias"][None, :] + 2.0 * (x @ delta)), rtol=1e-5, atol=1e-5)
    # the converted model's first layer is exactly that (its output feeds layers_1; check via intercept)
    lin_only = qm.apply({"params": dict(p, layers_0=lin2)}, x)
    assert np.isfinite(np.asarray(lin_only)).all()
    tx = qjax.optim.adapters_only(optax.adam(3e-3))
    state = tx.init(p)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda q: jnp.mean((qm.apply({"params": q}, x) - y) ** 2), allow_int=True)(params)
        upd, state = tx.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss
    params, losses = p, []
    for _ in range(25):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]
    np.testing.assert_array_equal(np.asarray(params["layers_0"]["kernel"].packed), np.asarray(lin["kernel"].packed))


def test_int8_nnx_layer_and_training(rng):
    x = _outlier_x(rng)
    layer = qn.QLoRALinear(64, 32, lora_config=qjax.LoraConfig(r=4, alpha=8), quant_config=INT8, rngs=nnx.Rngs(0))
    layer.lora_b.set_value(jnp.asarray(rng.standard_normal((4, 32)), jnp.float32) * 0.1)
    q = layer.kernel.get_value()
    want = qjax.int8_matmul(x, q, threshold=6.0) + layer.bias.get_value()[None, :] + \
        2.0 * (x @ layer.lora_a.get_value() @ layer.lora_b.get_value())
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    y = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)
    losses, _ = nnx_train_mse(layer, x, y, 25)
    assert losses[-1] < 0.9 * losses[0]
    np.testing.assert_array_equal(np.asarray(layer.kernel.get_value().packed), np.asarray(q.packed))
