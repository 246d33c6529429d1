"""Einsum projections (nn.Einsum / nnx.Einsum): quantized over flattened in/out axes, adapters (*in, r) / (r, *out)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import qjax
from helpers import linen_train, nnx_train_mse
import qjax.linen as ql
import qjax.nnx as qn
from qjax._src.matmul import base as B

F32 = qjax.QuantConfig(compute_dtype=jnp.float32)
CFG = qjax.LoraConfig(r=4, alpha=8)

# (equation, kernel shape, in axes, out axes): attention's q (d, heads, head_dim), a permuted kernel
# with an ellipsis, the output projection contracting (heads, head_dim), a torch-style (out, in) kernel.
CASES = [("btd,dnh->btnh", (64, 2, 32), (64,), (2, 32)),
         ("...d,ndh->...hn", (2, 64, 32), (64,), (32, 2)),
         ("btnh,nhd->btd", (2, 32, 64), (2, 32), (64,)),
         ("btd,hd->bth", (32, 64), (64,), (32,))]


def test_plan_axes():
    for eq, shape, ins, outs in CASES:
        plan = B.EinsumPlan(eq)
        assert (plan.in_shape(shape), plan.out_shape(shape)) == (ins, outs), eq
        assert plan.kernel_shape(ins, outs) == shape
    plan = B.EinsumPlan("tde,dhe->teh")  # per-expert kernel with the batch axis last
    assert (plan.batch_shape((4, 5, 3)), plan.in_shape((4, 5, 3)), plan.out_shape((4, 5, 3))) == ((3,), (4,), (5,))
    assert plan.perm == (2, 0, 1) and plan.bias_dims((4, 5, 3)) == (3, 5)
    assert plan.kernel_shape((4,), (5,), (3,)) == (4, 5, 3)
    with pytest.raises(ValueError, match="exactly two operands"):
        B.EinsumPlan("bd,dh")
    with pytest.raises(ValueError, match=r"params/moe: einsum_str 'btd,dk->bt' with kernel shape \(8, 3\).*"
                                         r"kernel axes \['k'\] are summed over the kernel alone"):
        B.EinsumPlan("btd,dk->bt", "params/moe", (8, 3))


class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((64, 2, 32), "btd,dnh->btnh", name="q_proj")(x)
        k = nn.Einsum((2, 64, 32), "...d,ndh->...hn", use_bias=False, name="k_proj")(x)
        h = jnp.tanh(q) * jnp.swapaxes(k, -1, -2)
        h = nn.Einsum((2, 32, 64), name="o_proj")(h, "btnh,nhd->btd")  # equation given at call time
        return h + nn.Einsum((32, 64), "btd,hd->bth", name="up")(h).sum(-1, keepdims=True)


def _x(rng):
    return jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)


def test_linen_default_init_equals_quantized_base(rng):
    x = _x(rng)
    model = Attn()
    v = model.init(jax.random.key(int(rng.integers(2**31))), x)
    qm, qv = ql.convert(model, v, CFG, F32, jax.random.key(1), inputs=(x,))
    p = qv["params"]
    assert p["q_proj"]["kernel"].shape == (64, 64) and qjax.is_quantized(p["q_proj"]["kernel"])
    assert p["q_proj"]["lora_a"].shape == (64, 4) and p["q_proj"]["lora_b"].shape == (4, 2, 32)
    assert p["k_proj"]["lora_b"].shape == (4, 32, 2)  # out axes in output order
    assert p["o_proj"]["lora_a"].shape == (2, 32, 4) and p["o_proj"]["lora_b"].shape == (4, 64)
    assert p["up"]["kernel"].shape == (64, 32)
    # the quantized base: the same conversion without adapters
    bm, bv = ql.convert(model, v, None, F32, inputs=(x,))
    y = qm.apply(qv, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(bm.apply(bv, x)))
    np.testing.assert_array_equal(np.asarray(jax.jit(qm.apply)(qv, x)), np.asarray(y))
    # and nn.Einsum itself on the dequantized kernels (other summation order: float32 rounding only)
    m0, v0 = ql.merge(bm, bv)
    assert type(m0) is Attn and v0["params"]["k_proj"]["kernel"].shape == (2, 64, 32)
    np.testing.assert_allclose(np.asarray(m0.apply(v0, x)), np.asarray(y), rtol=1e-5, atol=1e-5)
    # 16-bit LoRA equals the original model exactly
    lm, lv = ql.convert(model, v, CFG, None, jax.random.key(1), inputs=(x,))
    np.testing.assert_array_equal(np.asarray(lm.apply(lv, x)), np.asarray(model.apply(v, x)))


def test_linen_training_lowers_loss_merge_requantize(rng):
    x = _x(rng)
    target = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    model = Attn()
    qm, qv = ql.convert(model, model.init(jax.random.key(0), x), CFG, F32, jax.random.key(1), inputs=(x,))
    params, losses = linen_train(lambda p: jnp.mean((qm.apply({"params": p}, x) - target) ** 2), qv["params"], 10)
    assert losses[-1] < 0.8 * losses[0]
    for name in ("q_proj", "o_proj"):
        for a, b in zip(jax.tree_util.tree_leaves(params[name]["kernel"]),
                        jax.tree_util.tree_leaves(qv["params"][name]["kernel"])):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    trained = {"params": params}
    y = qm.apply(trained, x)
    mm, mv = ql.merge(qm, trained)
    assert mv["params"]["q_proj"]["kernel"].shape == (64, 2, 32)
    np.testing.assert_allclose(np.asarray(mm.apply(mv, x)), np.asarray(y), rtol=1e-4, atol=1e-4)
    rm, rv = ql.merge(qm, trained, requantize=F32)
    assert qjax.is_quantized(rv["params"]["o_proj"]["kernel"]) and "lora_a" not in rv["params"]["o_proj"]
    for name, (eq, shape, _, _) in zip(("q_proj", "k_proj", "o_proj", "up"), CASES):
        # the requantized kernel is the merged one, permuted to (*in, *out), up to 4-bit error
        plan = B.EinsumPlan(eq)
        want = jnp.transpose(mv["params"][name]["kernel"], plan.perm).reshape(rv["params"][name]["kernel"].shape)
        got = qjax.dequantize(rv["params"][name]["kernel"], jnp.float32)
        assert float(jnp.abs(got - want).max()) < 0.2 * float(jnp.abs(want).max()), name
    rm.apply(rv, x)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        u = nn.Einsum((16, 2, 8), "bd,dnh->bnh", name="up")(h)
        return h + nn.Einsum((2, 8, 16), "bnh,nhd->bd", name="down")(jnp.tanh(u)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            name="layers")(x, None)[0]


def test_linen_scanned_einsum(rng):
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    model = Scanned()
    v = model.init(jax.random.key(0), x)
    qm, qv = ql.convert(model, v, CFG, F32, jax.random.key(1), inputs=(x,))
    up = qv["params"]["layers"]["up"]
    assert up["lora_a"].shape == (3, 16, 4) and up["lora_b"].shape == (3, 4, 2, 8)
    assert up["kernel"].shape == (16, 16) and up["kernel"].packed.shape[0] == 3
    bm, bv = ql.convert(model, v, None, F32, inputs=(x,))
    np.testing.assert_array_equal(np.asarray(qm.apply(qv, x)), np.asarray(bm.apply(bv, x)))
    mm, mv = ql.merge(qm, qv)
    assert mv["params"]["layers"]["down"]["kernel"].shape == (3, 2, 8, 16)
    np.testing.assert_allclose(np.asarray(mm.apply(mv, x)), np.asarray(qm.apply(qv, x)), rtol=1e-5, atol=1e-5)


def test_qlora_einsum_standalone(rng):
    x = _x(rng)
    layer = ql.QLoRAEinsum((64, 2, 32), "btd,dnh->btnh", lora_config=CFG, quant_config=F32)
    v = layer.init(jax.random.key(0), x)
    shapes = jax.tree_util.tree_map(lambda a: a.shape, v, is_leaf=qjax.is_quantized)["params"]
    assert shapes == {"kernel": (64, 64), "bias": (2, 32), "lora_a": (64, 4), "lora_b": (4, 2, 32)}
    base = ql.QLoRAEinsum((64, 2, 32), "btd,dnh->btnh", lora_config=None, quant_config=F32)
    np.testing.assert_array_equal(np.asarray(layer.apply(v, x)),
                                  np.asarray(base.apply({"params": {k: v["params"][k] for k in ("kernel", "bias")}},
                                                        x)))


# ----------------------------------------------------------------------------- NNX


class NAttn(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Einsum("btd,dnh->btnh", (64, 2, 32), (2, 32), rngs=rngs)
        self.k_proj = nnx.Einsum("...d,ndh->...hn", (2, 64, 32), rngs=rngs)
        self.o_proj = nnx.Einsum("btnh,nhd->btd", (2, 32, 64), (64,), rngs=rngs)

    def __call__(self, x):
        return self.o_proj(jnp.tanh(self.q_proj(x)) * jnp.swapaxes(self.k_proj(x), -1, -2))


def test_nnx_einsum(rng):
    x = _x(rng)
    seed = int(rng.integers(2**31))
    original = NAttn(nnx.Rngs(seed))
    model = qn.convert(NAttn(nnx.Rngs(seed)), CFG, F32, nnx.Rngs(1))
    assert isinstance(model.q_proj, qn.QLoRAEinsum)
    assert isinstance(model.q_proj.kernel, qn.BaseParam) and model.q_proj.kernel.get_value().shape == (64, 64)
    assert model.q_proj.lora_a.get_value().shape == (64, 4) and model.q_proj.lora_b.get_value().shape == (4, 2, 32)
    assert model.o_proj.lora_a.get_value().shape == (2, 32, 4)
    base = qn.convert(NAttn(nnx.Rngs(seed)), None, F32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(base(x)))
    np.testing.assert_allclose(np.asarray(qn.merge(base)(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    sixteen = qn.convert(NAttn(nnx.Rngs(seed)), CFG, None, nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(sixteen(x)), np.asarray(original(x)))

    target = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    losses, _ = nnx_train_mse(model, x, target, 10)
    assert losses[-1] < 0.8 * losses[0]
    y = model(x)
    qn.merge(model)
    assert type(model.q_proj) is nnx.Einsum and model.q_proj.kernel.get_value().shape == (64, 2, 32)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(y), rtol=1e-4, atol=1e-4)


def test_einsum_adapters_save_load_and_peft(rng, tmp_path):
    x = _x(rng)
    model = Attn()
    v = model.init(jax.random.key(0), x)
    qm, qv = ql.convert(model, v, CFG, F32, jax.random.key(1), inputs=(x,))
    qv = jax.tree_util.tree_map_with_path(  # non-zero B
        lambda p, a: a + 0.01 if "lora_b" in jax.tree_util.keystr(p) else a, qv, is_leaf=qjax.is_quantized)
    qjax.checkpoint.save_adapters(tmp_path / "a", qv, CFG)
    _, fresh = ql.convert(model, v, CFG, F32, jax.random.key(2), inputs=(x,))
    loaded = qjax.checkpoint.load_adapters(tmp_path / "a", fresh, CFG)
    np.testing.assert_array_equal(np.asarray(qm.apply(loaded, x)), np.asarray(qm.apply(qv, x)))
    # PEFT files hold the flattened Linear adapters and come back in the einsum's shapes
    qjax.interop.save_peft_adapter(tmp_path / "p", qv, CFG, name_map=qjax.interop.IDENTITY)
    t = qjax.interop.load_safetensors(tmp_path / "p" / "adapter_model.safetensors")
    assert t["base_model.model.params.o_proj.lora_A.weight"].shape == (4, 64)
    assert t["base_model.model.params.q_proj.lora_B.weight"].shape == (64, 4)
    back = qjax.interop.load_peft_adapter(tmp_path / "p", fresh, CFG, name_map=qjax.interop.IDENTITY)
    np.testing.assert_array_equal(np.asarray(qm.apply(back, x)), np.asarray(qm.apply(qv, x)))


def test_einsum_without_inputs_is_a_clear_error(rng):
    class Proj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((32, 64), "btd,hd->bth", name="proj")(x)

    x = _x(rng)
    v = Proj().init(jax.random.key(0), x)
    qm, qv = ql.convert(Proj(), v, CFG, F32, jax.random.key(1))  # the rank-2 kernel looks like a Dense
    with pytest.raises(TypeError, match="'proj'.*nn.Einsum; pass inputs="):
        qm.apply(qv, x)


class NBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Einsum("bd,dnh->bnh", (16, 2, 8), (2, 8), rngs=rngs)
        self.down = nnx.Einsum("bnh,nhd->bd", (2, 8, 16), rngs=rngs)

    def __call__(self, x):
        return x + self.down(jnp.tanh(self.up(x)))


def test_nnx_vmapped_einsum(rng):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return NBlock(nnx.Rngs(key))

    def run(model, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, h):
            return block(h)
        return body(model, x)

    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 3)
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    model = qn.convert(make(keys), CFG, F32, nnx.Rngs(1))
    assert model.up.lora_b.get_value().shape == (3, 4, 2, 8) and model.up.bias.get_value().shape == (3, 2, 8)
    base = qn.convert(make(keys), None, F32)
    np.testing.assert_array_equal(np.asarray(run(model, x)), np.asarray(run(base, x)))
    y = run(model, x)
    qn.merge(model)
    assert model.up.kernel.get_value().shape == (3, 16, 2, 8)
    np.testing.assert_allclose(np.asarray(run(model, x)), np.asarray(y), rtol=1e-5, atol=1e-5)
