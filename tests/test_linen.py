"""qjax.linen: QLoRADense, convert, merge, training under jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import qjax
import qjax.linen as ql
from qjax.optim import adapters_only, merge_adapters, split_adapters

F32 = qjax.QuantConfig(compute_dtype=jnp.float32)


class MLP(nn.Module):  # nn.compact style
    hidden: int = 128

    @nn.compact
    def __call__(self, x):
        return nn.Dense(64, name="down")(nn.relu(nn.Dense(self.hidden, name="up")(x)))


class Net(nn.Module):  # setup style, nested, DenseGeneral and an output head
    def setup(self):
        self.mlp = MLP()
        self.attn_q = nn.DenseGeneral((2, 32), use_bias=False)
        self.attn_o = nn.DenseGeneral(64, axis=(-2, -1))
        self.lm_head = nn.Dense(8)

    def __call__(self, x):
        h = x + self.mlp(x)
        h = h + self.attn_o(self.attn_q(h))
        return self.lm_head(h)

    def features(self, x):
        return self.mlp(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(64, name="ff")(nn.relu(nn.Dense(128, name="up")(h))), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(x, None)
        return nn.Dense(8, name="lm_head")(h)


def _setup(model, rng, batch=(2, 3)):
    x = jnp.asarray(rng.standard_normal(batch + (64,)), jnp.float32)
    v = model.init(jax.random.key(int(rng.integers(2**31))), x)
    return x, v


def _dequantized(params, spec):
    """The original params with every converted kernel replaced by its dequantized value."""
    from qjax._src.matmul import base as B
    params = jax.tree_util.tree_map(lambda x: x, params)
    for layer in spec.layers:
        node = params
        for k in layer.path.split("/"):
            node = node[k]
        fn = lambda k: B.dense_kernel(k, layer.in_shape, layer.out_shape)
        node["kernel"] = B.vmap_lead(fn, len(layer.lead))(node["kernel"])
        node.pop("lora_a", None), node.pop("lora_b", None)
    return params


@pytest.mark.parametrize("model", [MLP(), Net(), Scanned()], ids=["compact", "setup", "scan"])
def test_default_init_equals_quantized_base(model, rng):
    x, v = _setup(model, rng)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4), F32, jax.random.key(1), inputs=(x,))
    assert any(layer.lora for layer in type(qm)._qjax_spec.layers)
    y = qm.apply(qv, x)
    base = model.apply({"params": _dequantized(qv["params"], type(qm)._qjax_spec)}, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(base))
    # the same under jit, and equal to the converted model without adapters
    bm, bv = ql.convert(model, v, None, F32, inputs=(x,))
    np.testing.assert_array_equal(np.asarray(jax.jit(qm.apply)(qv, x)), np.asarray(bm.apply(bv, x)))


@pytest.mark.parametrize("model", [MLP(), Net(), Scanned()], ids=["compact", "setup", "scan"])
def test_16bit_lora_equals_original(model, rng):
    x, v = _setup(model, rng)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4), None, jax.random.key(1), inputs=(x,))
    np.testing.assert_array_equal(np.asarray(qm.apply(qv, x)), np.asarray(model.apply(v, x)))


def test_bf16_compute_dtype_and_output_dtype(rng):
    model = MLP()
    x, v = _setup(model, rng)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4), qjax.QuantConfig(), jax.random.key(1))
    y = qm.apply(qv, x)
    assert y.dtype == jnp.float32  # the dtype nn.Dense returns, although the base ran in bfloat16
    # the same quantized model computed in float32: only bfloat16 rounding separates the two
    qm32, qv32 = ql.convert(model, v, qjax.LoraConfig(r=4), qjax.QuantConfig(compute_dtype=jnp.float32),
                            jax.random.key(1))
    ref = qm32.apply(qv32, x)
    # bf16 keeps 8 significant bits (eps 2^-8): inputs, weights and each layer's output are rounded once,
    # so a few eps relative to the output scale covers two layers
    assert float(jnp.max(jnp.abs(y - ref))) <= 8 * 2.0**-8 * float(jnp.max(jnp.abs(ref)))


def test_adapter_shapes_and_paths(rng):
    model = Net()
    x, v = _setup(model, rng)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4), qjax.QuantConfig(), jax.random.key(1), inputs=(x,))
    p = qv["params"]
    assert p["mlp"]["up"]["lora_a"].shape == (64, 4) and p["mlp"]["up"]["lora_b"].shape == (4, 128)
    assert p["attn_q"]["lora_a"].shape == (64, 4) and p["attn_q"]["lora_b"].shape == (4, 2, 32)
    assert p["attn_o"]["lora_a"].shape == (2, 32, 4) and p["attn_o"]["lora_b"].shape == (4, 64)
    assert qjax.is_quantized(p["attn_o"]["kernel"]) and p["attn_o"]["kernel"].shape == (64, 64)
    assert "lora_a" not in p["lm_head"] and not qjax.is_quantized(p["lm_head"]["kernel"])  # head left alone
    assert np.all(np.asarray(p["mlp"]["up"]["lora_b"]) == 0)
    # other methods of the model are converted too
    np.testing.assert_array_equal(np.asarray(qm.apply(qv, x, method="features")),
                                  np.asarray(qm.apply(qv, x, method=qm.features)))


def test_target_patterns_and_exclude(rng):
    model = Net()
    x, v = _setup(model, rng)
    cfg = qjax.LoraConfig(r=2, target_modules=("up", "re:attn_"), exclude=("attn_o",))
    qm, qv = ql.convert(model, v, cfg, qjax.QuantConfig(), jax.random.key(1), inputs=(x,))
    lora = sorted(layer.path for layer in type(qm)._qjax_spec.layers if layer.lora)
    assert lora == ["attn_q", "mlp/up"]
    assert qjax.is_quantized(qv["params"]["mlp"]["down"]["kernel"])  # quantized, no adapters
    assert qm.apply(qv, x).shape == x.shape[:-1] + (8,)


def _train(qm, qv, x, target, tx, steps, use_split):
    opt_state = tx.init(qv["params"])

    def loss_fn(params):
        return jnp.mean((qm.apply({"params": params}, x) - target) ** 2)

    @jax.jit
    def step(params, opt_state):
        if use_split:
            adapters, rest = split_adapters(params)
            loss, grads = jax.value_and_grad(lambda a: loss_fn(merge_adapters(a, rest)))(adapters)
        else:
            loss, grads = jax.value_and_grad(loss_fn, allow_int=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, losses = qv["params"], []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return params, opt_state, losses


@pytest.mark.parametrize("use_split", [False, True], ids=["allow_int", "split"])
def test_training_jit_lowers_loss_and_freezes_base(use_split, rng):
    model = MLP(hidden=64)
    x, v = _setup(model, rng, batch=(16,))
    target = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=8, alpha=16), qjax.QuantConfig(), jax.random.key(2))
    tx = adapters_only(optax.chain(optax.clip_by_global_norm(1.0),
                                   optax.adamw(optax.linear_schedule(3e-2, 1e-2, 30))))
    params, opt_state, losses = _train(qm, qv, x, target, tx, 30, use_split)
    assert losses[-1] < 0.7 * losses[0], losses
    before = jax.tree_util.tree_leaves(qv["params"])
    after = jax.tree_util.tree_leaves(params)
    for a, b in zip(before, after):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    adapter_elems = sum(x.size for x in jax.tree_util.tree_leaves(split_adapters(qv["params"])[0]))
    state_elems = sum(np.size(s) for s in jax.tree_util.tree_leaves(opt_state))
    assert state_elems <= 2 * adapter_elems + 8  # adam's mu and nu, plus counters
    np.testing.assert_array_equal(np.asarray(params["up"]["bias"]), np.asarray(qv["params"]["up"]["bias"]))


def test_qlora_dense_standalone(rng):
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    layer = ql.QLoRADense(32, lora_config=qjax.LoraConfig(r=4), quant_config=F32)
    v = layer.init(jax.random.key(0), x)
    p = v["params"]
    assert qjax.is_quantized(p["kernel"]) and p["kernel"].shape == (64, 32)
    assert p["lora_a"].shape == (64, 4) and p["lora_b"].shape == (4, 32) and p["bias"].shape == (32,)
    dense = nn.Dense(32)
    ref = dense.apply({"params": {"kernel": qjax.dequantize(p["kernel"]), "bias": p["bias"]}}, x)
    np.testing.assert_array_equal(np.asarray(layer.apply(v, x)), np.asarray(ref))
    g = ql.QLoRADenseGeneral((2, 16), lora_config=qjax.LoraConfig(r=4), quant_config=None)
    vg = g.init(jax.random.key(0), x)
    assert g.apply(vg, x).shape == (3, 2, 16) and vg["params"]["lora_b"].shape == (4, 2, 16)


def test_lora_dropout_needs_rng(rng):
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    layer = ql.QLoRADense(32, lora_config=qjax.LoraConfig(r=4, dropout=0.5))
    v = layer.init(jax.random.key(0), x)
    v = jax.tree_util.tree_map(lambda a: a, v)
    v["params"]["lora_b"] = jnp.ones_like(v["params"]["lora_b"])
    np.testing.assert_array_equal(np.asarray(layer.apply(v, x)), np.asarray(layer.apply(v, x)))
    a = layer.apply(v, x, rngs={"dropout": jax.random.key(1)})
    b = layer.apply(v, x, rngs={"dropout": jax.random.key(2)})
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_merge_matches_and_requantize(rng):
    model = Net()
    x, v = _setup(model, rng)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4, init="gaussian"), F32, jax.random.key(1), inputs=(x,))
    qv = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.05 if qjax.optim.is_adapter_path(qjax._src.paths.path_str(p)) else a, qv,
        is_leaf=qjax.is_quantized)
    y = qm.apply(qv, x)
    mm, mv = ql.merge(qm, qv)
    assert type(mm) is Net and not ql.is_converted(mm)
    assert mv["params"]["attn_o"]["kernel"].shape == (2, 32, 64)
    np.testing.assert_allclose(np.asarray(mm.apply(mv, x)), np.asarray(y), rtol=1e-4, atol=1e-4)
    rm, rv = ql.merge(qm, qv, requantize=qjax.QuantConfig(compute_dtype=jnp.float32))
    assert qjax.is_quantized(rv["params"]["mlp"]["up"]["kernel"]) and "lora_a" not in rv["params"]["mlp"]["up"]
    assert float(jnp.max(jnp.abs(rm.apply(rv, x) - y))) < 0.2 * float(jnp.max(jnp.abs(y))) + 0.2


def test_merge_scanned(rng):
    model = Scanned()
    x, v = _setup(model, rng)
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4), F32, jax.random.key(1), inputs=(x,))
    mm, mv = ql.merge(qm, qv)
    assert mv["params"]["layers"]["up"]["kernel"].shape == (2, 64, 128)
    np.testing.assert_allclose(np.asarray(mm.apply(mv, x)), np.asarray(qm.apply(qv, x)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_errors_name_the_path(rng):
    model = Net()
    x, v = _setup(model, rng)
    with pytest.raises(ValueError, match="'nope' matches no linear layer.*mlp/up"):
        ql.convert(model, v, qjax.LoraConfig(target_modules=("nope",)), qjax.QuantConfig(), jax.random.key(0),
                   inputs=(x,))
    with pytest.raises(ValueError, match=r"mlp/up: LoRA rank r=100"):
        ql.convert(model, v, qjax.LoraConfig(r=100, target_modules=("mlp/up",)), None, jax.random.key(0),
                   inputs=(x,))
    qm, qv = ql.convert(model, v, qjax.LoraConfig(r=2), qjax.QuantConfig(), jax.random.key(0), inputs=(x,))
    with pytest.raises(ValueError, match="already converted"):
        ql.convert(qm, qv, qjax.LoraConfig(r=2), qjax.QuantConfig(), jax.random.key(0))
    with pytest.raises(ValueError, match=r"params/\S+/lora_[ab] is already a QLoRA leaf \(adapter\)"):
        ql.convert(model, qv, qjax.LoraConfig(r=2), qjax.QuantConfig(), jax.random.key(0))
    with pytest.raises(ValueError, match="r must be a positive int"):
        qjax.LoraConfig(r=0)


def test_error_no_dense_layers(rng):
    class NoDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm()(x)

    x = jnp.ones((2, 8))
    v = NoDense().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="no nn.Dense"):
        ql.convert(NoDense(), v, qjax.LoraConfig(r=2), qjax.QuantConfig(), jax.random.key(0), inputs=(x,))


def test_rank3_kernels_need_inputs(rng):
    model = Net()
    x, v = _setup(model, rng)
    with pytest.warns(UserWarning, match="attn_q"):
        qm, qv = ql.convert(model, v, qjax.LoraConfig(r=2), qjax.QuantConfig(), jax.random.key(0))
    assert "lora_a" not in qv["params"]["attn_q"]
    with pytest.raises(ValueError, match="pass inputs="):
        ql.convert(model, v, qjax.LoraConfig(r=2, target_modules=("up",)), qjax.QuantConfig(), jax.random.key(0))


def test_xla_and_pallas_interpret_trajectories_match(rng):
    model = MLP(hidden=64)
    x, v = _setup(model, rng, batch=(8,))
    target = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    runs = []
    for backend in ("xla", "pallas_interpret"):
        qm, qv = ql.convert(model, v, qjax.LoraConfig(r=4), F32, jax.random.key(3), backend=backend)
        runs.append(_train(qm, qv, x, target, adapters_only(optax.adam(1e-2)), 5, False)[2])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-4)
