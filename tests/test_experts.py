"""Batched einsums (per-expert kernels) and DenseGeneral batch_dims: one quantized matrix and adapter pair per expert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import qjax
import qjax.linen as ql
import qjax.nnx as qn
from helpers import linen_train, nnx_train_mse
from qjax._src.matmul import base as B

F32 = qjax.QuantConfig(compute_dtype=jnp.float32)
CFG = qjax.LoraConfig(r=4, alpha=8)
E, T, D, H = 3, 5, 36, 20  # D * H = 720: blocks of 64 would cross experts if the stack were flattened

# (equation, kernel shape, input shape, bias, per-expert LoRA delta as an einsum of x, lora_a, lora_b)
CASES = {"etd": ("etd,edh->eth", (E, D, H), (E, T, D), False, "etd,edr,erh->eth"),
         "etd_bias": ("etd,edh->eth", (E, D, H), (E, T, D), True, "etd,edr,erh->eth"),
         "batch_last": ("tde,dhe->teh", (D, H, E), (T, D, E), True, "tde,edr,erh->teh")}


class Experts(nn.Module):
    eq: str
    shape: tuple
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        return nn.Einsum(self.shape, self.eq, use_bias=self.use_bias, name="experts")(x)


class BatchedDense(nn.Module):
    @nn.compact
    def __call__(self, x):  # (E, T, D) -> (E, T, 2, H // 2)
        return nn.DenseGeneral((2, H // 2), batch_dims=(0,), name="experts")(x)


def _model(name):
    if name == "dense_general":
        return BatchedDense(), (E, T, D), "etd,edr,erfg->etfg"
    eq, shape, x_shape, bias, delta = CASES[name]
    return Experts(eq, shape, bias), x_shape, delta


def _random_like(rng, x, scale):
    return jnp.asarray(rng.standard_normal(np.shape(x)) * scale, jnp.float32)


def _setup(rng, name):
    model, x_shape, delta_eq = _model(name)
    x = _random_like(rng, np.zeros(x_shape), 1.0)
    v = model.init(jax.random.key(int(rng.integers(2**31))), x)
    if "bias" in v["params"]["experts"]:  # a nonzero bias
        v["params"]["experts"]["bias"] = _random_like(rng, v["params"]["experts"]["bias"], 0.5)
    return model, x, v, delta_eq


@pytest.mark.parametrize("name", list(CASES) + ["dense_general"])
def test_linen_experts_match_dequantized_kernel(rng, name):
    model, x, v, delta_eq = _setup(rng, name)
    qm, qv = ql.convert(model, v, CFG, F32, jax.random.key(1), inputs=(x,))
    p = qv["params"]["experts"]
    plan = B.EinsumPlan(type(qm)._qjax_spec.layer("experts").einsum)
    shape = v["params"]["experts"]["kernel"].shape
    w_out = int(np.prod(plan.out_shape(shape)))
    assert p["kernel"].stack_shape == (E,) and p["kernel"].shape == (D, w_out)
    assert p["lora_a"].shape == (E, D, 4) and p["lora_b"].shape == (E, 4) + plan.out_shape(shape)
    # each expert's codes are those of quantizing that expert's (D, out) matrix alone
    w = B.permute_einsum_kernel(plan, v["params"]["experts"]["kernel"])
    for e in range(E):
        alone = F32.quantize(jnp.reshape(w[e], (D, w_out)))
        for got, want in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a[e], p["kernel"])),
                             jax.tree_util.tree_leaves(alone)):
            assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    # at init (B = 0): the original layer on the dequantized kernel (in the kernel's own layout)
    w_deq = jnp.transpose(jnp.reshape(jax.vmap(lambda q: qjax.dequantize(q, jnp.float32))(p["kernel"]),
                                      (E,) + plan.in_shape(shape) + plan.out_shape(shape)), plan.inverse_perm())
    v_deq = jax.tree_util.tree_map(lambda a: a, v)
    v_deq["params"]["experts"]["kernel"] = w_deq
    ref = model.apply(v_deq, x)
    y = qm.apply(qv, x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(qm.apply)(qv, x)), np.asarray(y), rtol=1e-6, atol=1e-6)
    # random adapters: plus scaling * (x @ A_e) @ B_e for each expert e
    a, b = _random_like(rng, p["lora_a"], 0.1), _random_like(rng, p["lora_b"], 0.1)
    qv["params"]["experts"].update(lora_a=a, lora_b=b)
    want = ref + CFG.scaling * jnp.einsum(delta_eq, x, a, b, precision="highest")
    np.testing.assert_allclose(np.asarray(qm.apply(qv, x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    # merge: the original kernel layout, W_deq + scaling * A_e @ B_e per expert
    mm, mv = ql.merge(qm, qv)
    assert type(mm) is type(model) and mv["params"]["experts"]["kernel"].shape == shape
    delta = jnp.einsum("edr,erk->edk", a, jnp.reshape(b, (E, 4, -1)), precision="highest")
    delta = jnp.reshape(delta, (E,) + plan.in_shape(shape) + plan.out_shape(shape))
    np.testing.assert_allclose(np.asarray(mv["params"]["experts"]["kernel"]),
                               np.asarray(w_deq + CFG.scaling * jnp.transpose(delta, plan.inverse_perm())),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mm.apply(mv, x)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_linen_experts_merge_round_trip(rng):
    model, x, v, _ = _setup(rng, "batch_last")
    qm, qv = ql.convert(model, v, CFG, F32, jax.random.key(1), inputs=(x,))
    mm, mv = ql.merge(qm, qv)  # B = 0: the dequantized kernel in the einsum's own (D, H, E) layout
    plan = B.EinsumPlan(CASES["batch_last"][0])
    w_deq = jax.vmap(lambda q: qjax.dequantize(q, jnp.float32))(qv["params"]["experts"]["kernel"])
    np.testing.assert_array_equal(np.asarray(mv["params"]["experts"]["kernel"]),
                                  np.asarray(jnp.transpose(w_deq, plan.inverse_perm())))
    w = v["params"]["experts"]["kernel"]
    assert float(jnp.abs(mv["params"]["experts"]["kernel"] - w).max()) < 0.2 * float(jnp.abs(w).max())
    np.testing.assert_array_equal(np.asarray(mv["params"]["experts"]["bias"]), np.asarray(v["params"]["experts"]["bias"]))
    rm, rv = ql.merge(qm, qv, requantize=F32)  # a stack of experts again, up to 4-bit error of the merged one
    q = rv["params"]["experts"]["kernel"]
    assert q.stack_shape == (E,) and "lora_a" not in rv["params"]["experts"]
    got = jax.vmap(lambda q: qjax.dequantize(q, jnp.float32))(q)
    assert float(jnp.abs(got - w_deq).max()) < 0.2 * float(jnp.abs(w_deq).max())
    assert rm.apply(rv, x).shape == qm.apply(qv, x).shape


@pytest.mark.parametrize("name", ["etd_bias", "dense_general"])
def test_linen_experts_training(name):
    # fixed data (seed-independent): a toy regression the adapters can fit
    model, x_shape, _ = _model(name)
    x = jax.random.normal(jax.random.key(0), x_shape)
    v = model.init(jax.random.key(1), x)
    target = model.apply(v, x) + 0.3 * jax.random.normal(jax.random.key(2), model.apply(v, x).shape)
    qm, qv = ql.convert(model, v, CFG, F32, jax.random.key(3), inputs=(x,))
    loss_fn = lambda p: jnp.mean((qm.apply({"params": p}, x) - target) ** 2)  # noqa: E731
    g = jax.grad(loss_fn, allow_int=True)(qv["params"])["experts"]
    assert float(jnp.abs(g["lora_b"]).max()) > 0 and g["lora_b"].shape == qv["params"]["experts"]["lora_b"].shape
    # gradients reach x through the vmapped qmatmul (custom_vjp): those of the dequantized layer
    mm, mv = ql.merge(qm, qv)
    gx = jax.grad(lambda x: jnp.sum(jnp.sin(qm.apply(qv, x))))(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(jax.grad(lambda x: jnp.sum(jnp.sin(mm.apply(mv, x))))(x)),
                               rtol=1e-4, atol=1e-5)
    params, losses = linen_train(loss_fn, qv["params"], 10)
    assert losses[-1] < 0.8 * losses[0]
    before, after = qv["params"]["experts"], params["experts"]
    for key in ("kernel", "bias"):
        for a, b in zip(jax.tree_util.tree_leaves(after[key]), jax.tree_util.tree_leaves(before[key])):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert float(jnp.abs(after["lora_a"] - before["lora_a"]).max()) > 0


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):  # h (E, T, D)
        return h + nn.Einsum((E, D, D), "etd,edk->etk", name="experts")(h), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(
            name="layers")(x, None)[0]


def test_linen_scanned_experts_and_peft_refusal(rng, tmp_path):
    x = _random_like(rng, np.zeros((E, T, D)), 1.0)
    model = Scanned()
    v = model.init(jax.random.key(int(rng.integers(2**31))), x)
    qm, qv = ql.convert(model, v, CFG, F32, jax.random.key(1), inputs=(x,))
    p = qv["params"]["layers"]["experts"]
    assert p["kernel"].stack_shape == (2, E) and p["lora_a"].shape == (2, E, D, 4) and p["lora_b"].shape == (2, E, 4, D)
    bm, bv = ql.convert(model, v, None, F32, inputs=(x,))
    np.testing.assert_array_equal(np.asarray(qm.apply(qv, x)), np.asarray(bm.apply(bv, x)))
    mm, mv = ql.merge(qm, qv)
    assert mv["params"]["layers"]["experts"]["kernel"].shape == (2, E, D, D)
    np.testing.assert_allclose(np.asarray(mm.apply(mv, x)), np.asarray(qm.apply(qv, x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layers/experts.*\(2, 3, 36, 4\).*per-expert adapters"):
        qjax.interop.save_peft_adapter(tmp_path / "p", qv, CFG, name_map=qjax.interop.IDENTITY)


def test_unsupported_einsum_is_a_clear_error(rng):
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):  # kernel axis k is summed over the kernel alone
            return nn.Dense(8, name="out")(x) + nn.Einsum((D, 3), "td,dk->t", use_bias=False, name="odd")(x)[:, None]

    x = _random_like(rng, np.zeros((T, D)), 1.0)
    v = Odd().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"params/odd: einsum_str 'td,dk->t' with kernel shape \(36, 3\).*"
                                         r"summed over the kernel alone.*LoraConfig.exclude"):
        ql.convert(Odd(), v, CFG, F32, jax.random.key(1), inputs=(x,))
    # excluded from LoRA and quantization, it is left alone and the rest converts
    qm, qv = ql.convert(Odd(), v, qjax.LoraConfig(r=4, exclude=("odd",)), qjax.QuantConfig(skip=("*odd*",)),
                        jax.random.key(1), inputs=(x,))
    assert [s.path for s in type(qm)._qjax_spec.layers] == ["out"] and not qjax.is_quantized(qv["params"]["odd"]["kernel"])
    qm.apply(qv, x)

    class NOdd(nnx.Module):
        def __init__(self, rngs):
            self.odd = nnx.Einsum("td,dk->t", (D, 3), rngs=rngs)

    with pytest.raises(ValueError, match=r"odd: einsum_str 'td,dk->t' with kernel shape \(36, 3\).*summed"):
        qn.convert(NOdd(nnx.Rngs(0)), CFG, F32, nnx.Rngs(1))


# ----------------------------------------------------------------------------- NNX


class NMoE(nnx.Module):
    def __init__(self, rngs):
        self.experts = nnx.Einsum("tde,dhe->teh", (D, H, E), (E, H), rngs=rngs)
        self.down = nnx.LinearGeneral(H, (2, 4), batch_axis={0: E}, rngs=rngs)

    def __call__(self, x):  # x (T, D, E) -> (E, T, 2, 4)
        return self.down(jnp.transpose(jnp.tanh(self.experts(x)), (1, 0, 2)))


def _nnx_dequantized(layer, plan_eq, shape):
    """A copy of an NNX QLoRA layer's base as the dense kernel in the original layout."""
    plan = B.EinsumPlan(plan_eq)
    w = jax.vmap(lambda q: qjax.dequantize(q, jnp.float32))(layer.kernel.get_value())
    w = jnp.reshape(w, (E,) + plan.in_shape(shape) + plan.out_shape(shape))
    return jnp.transpose(w, plan.inverse_perm())


def test_nnx_experts(rng):
    seed = int(rng.integers(2**31))
    x = _random_like(rng, np.zeros((T, D, E)), 1.0)

    def fresh():
        m = NMoE(nnx.Rngs(seed))
        m.experts.bias.set_value(_random_like(np.random.default_rng(seed), m.experts.bias.get_value(), 0.5))
        m.down.bias.set_value(_random_like(np.random.default_rng(seed + 1), m.down.bias.get_value(), 0.5))
        return m

    model = qn.convert(fresh(), CFG, F32, nnx.Rngs(1))
    ex, down = model.experts, model.down
    assert ex.kernel.get_value().stack_shape == (E,) and ex.kernel.get_value().shape == (D, H)
    assert ex.lora_a.get_value().shape == (E, D, 4) and ex.lora_b.get_value().shape == (E, 4, H)
    assert down.kernel.get_value().stack_shape == (E,) and down.lora_b.get_value().shape == (E, 4, 2, 4)
    alone = F32.quantize(jnp.transpose(fresh().experts.kernel.get_value(), (2, 0, 1))[1])
    for got, want in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a[1], ex.kernel.get_value())),
                         jax.tree_util.tree_leaves(alone)):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    # the original layers on the dequantized kernels
    ref = fresh()
    ref.experts.kernel.set_value(_nnx_dequantized(ex, "tde,dhe->teh", (D, H, E)))
    ref.down.kernel.set_value(jnp.reshape(jax.vmap(lambda q: qjax.dequantize(q, jnp.float32))(down.kernel.get_value()),
                                          (E, H, 2, 4)))
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)
    # random adapters on the experts einsum: plus scaling * (x @ A_e) @ B_e
    a, b = _random_like(rng, ex.lora_a.get_value(), 0.1), _random_like(rng, ex.lora_b.get_value(), 0.1)
    ex.lora_a.set_value(a)
    ex.lora_b.set_value(b)
    want = ref.experts(x) + CFG.scaling * jnp.einsum("tde,edr,erh->teh", x, a, b, precision="highest")
    np.testing.assert_allclose(np.asarray(ex(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    # training moves only the adapters; merge gives the original layers and layouts back
    target = jax.random.normal(jax.random.key(0), (E, T, 2, 4))
    kernel_before = jax.tree_util.tree_leaves(down.kernel.get_value())
    losses, _ = nnx_train_mse(model, x, target, 10)
    assert losses[-1] < 0.8 * losses[0]
    for k0, k1 in zip(kernel_before, jax.tree_util.tree_leaves(model.down.kernel.get_value())):
        assert np.asarray(k0).tobytes() == np.asarray(k1).tobytes()
    y = model(x)
    qn.merge(model)
    assert type(model.experts) is nnx.Einsum and model.experts.kernel.get_value().shape == (D, H, E)
    assert type(model.down) is nnx.LinearGeneral and model.down.kernel.get_value().shape == (E, H, 2, 4)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(y), rtol=1e-4, atol=1e-4)


def test_nnx_experts_merge_is_dequantized_kernel(rng):
    seed = int(rng.integers(2**31))
    model = qn.convert(NMoE(nnx.Rngs(seed)), CFG, F32, nnx.Rngs(1))
    w_deq = _nnx_dequantized(model.experts, "tde,dhe->teh", (D, H, E))
    qn.merge(model)
    np.testing.assert_array_equal(np.asarray(model.experts.kernel.get_value()), np.asarray(w_deq))


def test_experts_loftq_and_standalone_layers(rng):
    x = _random_like(rng, np.zeros((E, T, D)), 1.0)
    model, _, _ = _model("etd_bias")
    v = model.init(jax.random.key(int(rng.integers(2**31))), x)
    y0 = model.apply(v, x)
    lq = qjax.LoraConfig(r=4, alpha=8, init="loftq", loftq_iter=1)
    qm, qv = ql.convert(model, v, lq, F32, jax.random.key(1), inputs=(x,))  # LoftQ expert by expert
    bm, bv = ql.convert(model, v, None, F32, inputs=(x,))
    assert float(jnp.abs(qm.apply(qv, x) - y0).mean()) < float(jnp.abs(bm.apply(bv, x) - y0).mean())
    for layer in (ql.QLoRAEinsum((E, D, H), "etd,edh->eth", lora_config=CFG, quant_config=F32),
                  ql.QLoRADenseGeneral(H, batch_dims=(0,), lora_config=CFG, quant_config=F32)):
        sv = layer.init(jax.random.key(0), x)
        shapes = jax.tree_util.tree_map(lambda a: a.shape, sv, is_leaf=qjax.is_quantized)["params"]
        assert shapes == {"kernel": (D, H), "bias": (E, H), "lora_a": (E, D, 4), "lora_b": (E, 4, H)}
        assert sv["params"]["kernel"].stack_shape == (E,) and layer.apply(sv, x).shape == (E, T, H)
