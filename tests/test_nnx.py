"""qjax.nnx: QLoRALinear, in-place convert, LoRAParam filters, nnx.jit training, merge."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from helpers import nnx_train_mse
import qjax.nnx as qn

F32 = qjax.QuantConfig(compute_dtype=jnp.float32)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 128, rngs=rngs)
        self.down = nnx.Linear(128, 64, use_bias=False, rngs=rngs)
        self.q = nnx.LinearGeneral(64, (2, 32), rngs=rngs)
        self.o = nnx.LinearGeneral((2, 32), 64, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.relu(self.up(x))) + self.o(self.q(x))


class Model(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(64, param_dtype=jnp.bfloat16, rngs=rngs)
        self.lm_head = nnx.Linear(64, 8, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x).astype(jnp.float32))


def _x(rng, batch=(2, 3)):
    return jnp.asarray(rng.standard_normal(batch + (64,)), jnp.float32)


def _dequantized_copy(model):
    """A plain copy of a converted model without adapters (kernels dequantized)."""
    m = nnx.clone(model)
    for _, node in nnx.iter_graph(m):
        if isinstance(node, (qn.QLoRALinear, qn.QLoRALinearGeneral)):
            node.lora_b.set_value(jnp.zeros_like(node.lora_b.get_value()))
    return qn.merge(m)


def test_default_init_equals_quantized_base(rng):
    x = _x(rng)
    model = Model(nnx.Rngs(int(rng.integers(2**31))))
    qn.convert(model, qjax.LoraConfig(r=4), F32, nnx.Rngs(1))
    assert isinstance(model.blocks[0].up, qn.QLoRALinear) and isinstance(model.blocks[1].o, qn.QLoRALinearGeneral)
    assert isinstance(model.lm_head, nnx.Linear)  # the output head is left alone
    y = model(x)
    base = _dequantized_copy(model)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(base(x)))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(model, x)), np.asarray(y))


def test_16bit_lora_equals_original(rng):
    x = _x(rng)
    model = Model(nnx.Rngs(int(rng.integers(2**31))))
    y0 = model(x)
    qn.convert(model, qjax.LoraConfig(r=4), None, nnx.Rngs(1))
    assert isinstance(model.blocks[0].up.kernel, qn.BaseParam)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y0))


def test_variable_types_and_shapes(rng):
    model = Model(nnx.Rngs(0))
    qn.convert(model, qjax.LoraConfig(r=4), qjax.QuantConfig(), nnx.Rngs(1))
    b = model.blocks[0]
    assert type(b.up.lora_a) is nnx.LoRAParam and qn.LoRAParam is nnx.LoRAParam
    assert b.up.lora_a.shape == (64, 4) and b.up.lora_b.shape == (4, 128)
    assert b.q.lora_b.shape == (4, 2, 32) and b.o.lora_a.shape == (2, 32, 4)
    assert qjax.is_quantized(b.o.kernel.get_value()) and b.o.kernel.get_value().shape == (64, 64)
    lora = nnx.state(model, qn.LoRAParam)
    assert {p[-1] for p, _ in nnx.to_flat_state(lora)} == {"lora_a", "lora_b"}
    assert not nnx.state(model, qn.BaseParam) == {}
    assert all(isinstance(v, qn.BaseParam) is False for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_training_nnx_jit(rng):
    model = Model(nnx.Rngs(int(rng.integers(2**31))))
    x = _x(rng, (16,))
    target = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    qn.convert(model, qjax.LoraConfig(r=8), qjax.QuantConfig(), nnx.Rngs(2))
    base_before = jax.tree_util.tree_leaves(nnx.state(model, qn.BaseParam))
    bias_before = model.blocks[0].up.bias.get_value()
    losses, opt = nnx_train_mse(model, x, target, 30, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)))
    assert losses[-1] < 0.7 * losses[0], losses
    for a, b in zip(base_before, jax.tree_util.tree_leaves(nnx.state(model, qn.BaseParam))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(bias_before), np.asarray(model.blocks[0].up.bias.get_value()))
    adapters = sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(model, qn.LoRAParam)))
    state = sum(np.size(a) for a in jax.tree_util.tree_leaves(nnx.state(opt, nnx.OptState)))
    assert state <= 2 * adapters + 8


def test_vmapped_stacked_layers(rng):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(64, 64, rngs=nnx.Rngs(key))

    class Stack(nnx.Module):
        def __init__(self):
            self.layers = make(jax.random.split(jax.random.key(0), 3))

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(h, layer):
                return h + layer(h)
            return body(x, self.layers)

    model = Stack()
    x = _x(rng)
    qn.convert(model, qjax.LoraConfig(r=4), F32, nnx.Rngs(1))
    assert model.layers.lora_a.shape == (3, 64, 4) and model.layers.kernel.get_value().shape == (64, 64)
    y = model(x)
    qn.merge(model)
    assert model.layers.kernel.shape == (3, 64, 64)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_merge_and_requantize(rng):
    x = _x(rng)
    model = Model(nnx.Rngs(0))
    qn.convert(model, qjax.LoraConfig(r=4, init="gaussian"), F32, nnx.Rngs(1))
    for _, node in nnx.iter_graph(model):
        if isinstance(node, (qn.QLoRALinear, qn.QLoRALinearGeneral)):
            node.lora_b.set_value(node.lora_b.get_value() + 0.05)
    y = model(x)
    merged = qn.merge(nnx.clone(model))
    assert type(merged.blocks[0].up) is nnx.Linear and type(merged.blocks[0].o) is nnx.LinearGeneral
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(y), rtol=1e-4, atol=1e-4)
    req = qn.merge(nnx.clone(model), requantize=F32)
    assert isinstance(req.blocks[0].up, qn.QLoRALinear) and req.blocks[0].up.lora_a is None


def test_prepare_for_kbit_training(rng):
    model = Model(nnx.Rngs(0))
    qn.convert(model, qjax.LoraConfig(r=4), qjax.QuantConfig(), nnx.Rngs(1))
    x = _x(rng)
    y = model(x)
    qn.prepare_for_kbit_training(model, remat="blocks/*")
    assert model.norm.scale.get_value().dtype == jnp.float32
    assert getattr(type(model.blocks[0]), "_qjax_remat", False)
    loss = lambda m: jnp.mean(m(x) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, qn.LoRAParam))(model)
    assert jax.tree_util.tree_leaves(grads)
    assert model(x).shape == y.shape


def test_errors_name_the_path():
    model = Model(nnx.Rngs(0))
    with pytest.raises(ValueError, match="'nope' matches no linear layer"):
        qn.convert(model, qjax.LoraConfig(target_modules=("nope",)), qjax.QuantConfig(), nnx.Rngs(0))
    with pytest.raises(ValueError, match="blocks/0/q: LoRA rank r=65"):
        qn.convert(Model(nnx.Rngs(0)), qjax.LoraConfig(r=65, target_modules=("q",)), None, nnx.Rngs(0))
    qn.convert(model, qjax.LoraConfig(r=2), qjax.QuantConfig(), nnx.Rngs(0))
    with pytest.raises(ValueError, match="blocks/0/\\w+ is already a qjax QLoRA layer"):
        qn.convert(model, qjax.LoraConfig(r=2), qjax.QuantConfig(), nnx.Rngs(0))
    with pytest.raises(ValueError, match="no nnx.Linear"):
        qn.convert(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), qjax.LoraConfig(r=2), qjax.QuantConfig(), nnx.Rngs(0))
