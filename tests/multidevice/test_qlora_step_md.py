"""A QLoRA train step under a 2-D (data x model) mesh equals the single-device step.

The model is hand-written Linen (qjax.qmatmul on a frozen quantized kernel plus trainable
lora_a / lora_b), with the param names qjax.linen uses, so the test does not depend on it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from _md_helpers import hlo_collectives, make_mesh

R, ALPHA = 4, 8.0
# Adam divides by sqrt(v) + eps: with the default eps=1e-8 an element whose gradient is near zero
# turns a float-rounding difference between the sharded and single-device sums into a different
# step (seen: 2% on one element of 1024). eps=1e-3 bounds that to lr * |dg| / eps.
OPT = optax.adam(1e-2, eps=1e-3)


class LoRADense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        if self.has_variable("params", "kernel"):  # a QuantizedArray: Flax's shape check would see its codes
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.normal(0.02), (self.features,))
        a = self.param("lora_a", nn.initializers.normal(0.1), (x.shape[-1], R))
        b = self.param("lora_b", nn.initializers.normal(0.1), (R, self.features))  # nonzero: A gets gradients
        base = qjax.qmatmul(x, kernel) if qjax.is_quantized(kernel) else x @ kernel
        return base + (x @ a) @ b * (ALPHA / R) + bias[None, :]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(LoRADense(256, name="up")(x))
        return LoRADense(128, name="down")(h)


def _make_step(opt, model=MLP()):
    """A jitted adapters-only step of mean((model(x) - y)^2): (lora, opt_state, frozen, x, y) -> (.., .., loss)."""
    def loss_fn(lora, frozen, x, y):
        pred = model.apply({"params": qjax.optim.merge_adapters(lora, frozen)}, x)
        return jnp.mean((pred - y) ** 2)

    def step(lora, opt_state, frozen, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, x, y)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return jax.jit(step)


def _run(step, lora, opt_state, frozen, x, y, steps=2):
    """`steps` steps; returns (adapters, losses)."""
    losses = []
    for _ in range(steps):
        lora, opt_state, loss = step(lora, opt_state, frozen, x, y)
        losses.append(float(loss))
    return lora, losses


def test_2d_mesh_step_equals_single_device(rng):
    x = jnp.asarray(rng.standard_normal((16, 128)).astype(np.float32))
    y = jnp.asarray(rng.standard_normal((16, 128)).astype(np.float32))
    dense = MLP().init(jax.random.key(int(rng.integers(2**31))), x)["params"]
    params = qjax.quantize_params(dense, qjax.QuantConfig(double_quant=True, target="*kernel"))
    opt = OPT

    # single device
    lora, frozen = qjax.optim.split_adapters(params)
    step = _make_step(opt)
    ref_lora, ref_losses = _run(step, lora, opt.init(lora), frozen, x, y)

    # data x model mesh: FSDP of the frozen base over `data`, tensor parallel over `model`
    mesh = make_mesh((2, 4), ("data", "model"))
    spec = {"up": {"kernel": P("data", "model"), "bias": P("model")},     # column parallel
            "down": {"kernel": P("model", "data"), "bias": P("data")}}    # row parallel
    for layer in spec.values():
        layer.update(lora_a=None, lora_b=None)  # derived from the kernels by shard_params
    sharded = qjax.shard_params(params, mesh, spec)
    assert sharded["up"]["lora_a"].sharding.spec == P("data")
    assert sharded["up"]["lora_b"].sharding.spec == P(None, "model")
    assert sharded["down"]["lora_a"].sharding.spec == P("model")
    s_lora, s_frozen = qjax.optim.split_adapters(sharded)
    lora_sh = jax.tree.map(lambda a: a.sharding, s_lora)
    s_state = jax.jit(opt.init, out_shardings=qjax.optimizer_sharding(opt, s_lora, lora_sh))(s_lora)
    mu = s_state[0].mu  # optimizer state sharded like the adapters
    assert mu["up"]["lora_b"].sharding.spec == s_lora["up"]["lora_b"].sharding.spec
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    step = _make_step(opt)
    text = step.lower(s_lora, s_state, s_frozen, xs, ys).compile().as_text()
    gathered = [ln.split("=")[1].split("all-gather")[0] for ln in hlo_collectives(text)]
    full_codes = [f"u8[{','.join(map(str, params[k]['kernel'].packed.shape))}]" for k in ("up", "down")]
    assert not [g for g in gathered if any(c in g for c in full_codes)], gathered  # no device rebuilds a kernel
    s_lora, losses = _run(step, s_lora, s_state, s_frozen, xs, ys)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_lora), jax.tree.leaves(ref_lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert s_lora["down"]["lora_b"].sharding.spec == P(None, "data")


def test_linen_convert_step_on_2d_mesh_equals_single_device(rng):
    ql = pytest.importorskip("qjax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.gelu(nn.Dense(256, name="up")(x))
            h = nn.DenseGeneral((4, 64), name="heads")(h)  # kernel (256, 4, 64)
            return nn.DenseGeneral(128, axis=(-2, -1), name="down")(h)

    x = jnp.asarray(rng.standard_normal((16, 128)).astype(np.float32))
    y = jnp.asarray(rng.standard_normal((16, 128)).astype(np.float32))
    net = Net()
    variables = net.init(jax.random.key(int(rng.integers(2**31))), x)
    qmodel, qvars = ql.convert(net, variables, qjax.LoraConfig(r=4, alpha=8, init="gaussian"),
                               qjax.QuantConfig(compute_dtype=jnp.float32), jax.random.key(1), inputs=(x,))
    params = qvars["params"]
    opt = OPT

    adapters, rest = qjax.optim.split_adapters(params)
    ref_adapters, ref_losses = _run(_make_step(opt, qmodel), adapters, opt.init(adapters), rest, x, y)

    mesh = make_mesh((2, 4), ("data", "model"))
    rule = lambda path, leaf: {"up/kernel": P("data", "model"), "heads/kernel": P("data", "model"),
                               "down/kernel": P("model", "data")}.get(path)
    sharded = qjax.shard_params(params, mesh, rule, lora="split_rank")
    assert sharded["heads"]["lora_b"].sharding.spec == P("data", "model")  # (r, 4, 64): heads split
    adapters, rest = qjax.optim.split_adapters(sharded)
    adapter_sh = jax.tree.map(lambda a: a.sharding, adapters)
    state = jax.jit(opt.init, out_shardings=qjax.optimizer_sharding(opt, adapters, adapter_sh))(adapters)
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    adapters, losses = _run(_make_step(opt, qmodel), adapters, state, rest, xs, ys)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(ref_adapters)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_linen_convert_on_explicit_mesh_equals_single_device(rng):
    """QLoRA layers on a mesh with Explicit axes (jax.make_mesh's default): forward and adapter grads."""
    ql = pytest.importorskip("qjax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(128, name="down")(nn.gelu(nn.Dense(256, name="up")(x)))

    x = jnp.asarray(rng.standard_normal((16, 128)).astype(np.float32))
    net = Net()
    variables = net.init(jax.random.key(int(rng.integers(2**31))), x)
    qmodel, qvars = ql.convert(net, variables, qjax.LoraConfig(r=4, init="gaussian"),
                               qjax.QuantConfig(compute_dtype=jnp.float32, double_quant=True), jax.random.key(1),
                               inputs=(x,))

    def loss(adapters, rest, x):
        return jnp.sum(qmodel.apply({"params": qjax.optim.merge_adapters(adapters, rest)}, x) ** 2)

    adapters, rest = qjax.optim.split_adapters(qvars["params"])
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(adapters, rest, x)
    mesh = make_mesh((2, 4), ("data", "model"), explicit=True)
    rule = lambda path, leaf: {"up/kernel": P(None, "model"), "down/kernel": P("model", None)}.get(path)
    adapters, rest = qjax.optim.split_adapters(qjax.shard_params(qvars["params"], mesh, rule))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(adapters, rest, xs)
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="qmatmul_sharded"):
        with jax.set_mesh(mesh):
            jax.jit(qjax.qmatmul)(xs, rest["up"]["kernel"])
