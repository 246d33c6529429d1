"""Parameter-level conversion (`qjax._src.flax.routing`): raw params of custom NNX / Linen modules read by
matmuls (jnp.einsum, @, jnp.dot, jnp.matmul, jnp.tensordot, lax.dot_general, after astype / transposes /
per-expert indexing) are converted where they are and routed through base + adapter delta.

The reference for a converted model is the same model after `qjax.nnx.merge` / `qjax.linen.merge`: the
dequantized base plus the merged adapters, held densely, read by the model's own code. With
`QuantConfig(compute_dtype=float32)` both sides compute in float32 with the same (dequantized) weights and
differ only by summation order (the routed path computes x @ W_base + s * (x @ A) @ B, the merged one
x @ (W_base + s * A @ B)): float32 rounding, a few ulps per product accumulated over <= 64 terms, so
rtol = atol/scale = 1e-5 of the output scale (1e-5 ~ 2^-17, ~80 float32 ulps) holds with a wide margin.
Adapters are made non-zero (random lora_a / lora_b) so the delta is exercised.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import qjax
import qjax.linen as ql
import qjax.nnx as qn

F32 = qjax.QuantConfig(compute_dtype=jnp.float32)
CFG = qjax.LoraConfig(r=4, alpha=8)
D, H = 32, 48


def _key(rng):
    return jax.random.key(int(rng.integers(2**31)))


def _normal(key, shape, scale=0.1, dtype=jnp.float32):
    return (scale * jax.random.normal(key, shape)).astype(dtype)


def _close(y, ref, rtol=1e-5):
    """|y - ref| <= rtol * (|ref| + max|ref|): tolerance relative to the output's scale."""
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    assert y.shape == ref.shape
    scale = float(np.max(np.abs(ref)))
    assert scale > 0 and np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * scale)


def _host_normal(rng, shape, scale=0.1):
    """N(0, scale^2) float32 drawn on the host (no per-shape compile, unlike jax.random in eager mode)."""
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32))


def _randomize_nnx(model, rng, scale=0.1):
    """Every LoRAParam of `model` set to fresh N(0, scale^2) values (lora_b no longer zero)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    assert leaves, "the model holds no adapters"
    nnx.update(model, jax.tree.unflatten(treedef, [_host_normal(rng, jnp.shape(v), scale) for v in leaves]))


def _randomize_linen(variables, rng, scale=0.1):
    """Every lora_a / lora_b leaf of Linen variables set to fresh N(0, scale^2) values."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(variables, is_leaf=qjax.is_quantized)
    out, n = [], 0
    for path, leaf in paths:
        name = getattr(path[-1], "key", None)
        if name in ("lora_a", "lora_b"):
            out.append(_host_normal(rng, jnp.shape(leaf), scale))
            n += 1
        else:
            out.append(leaf)
    assert n, "the variables hold no adapters"
    return jax.tree_util.tree_unflatten(treedef, out)


def _jit(model, *args):
    """model(*args) under jax.jit (the model a closure): one compile instead of many eager dispatches."""
    return jax.jit(lambda *a: model(*a))(*args)


def _merged(model):
    m = nnx.clone(model)
    qn.merge(m)
    return m


def _roles(module):
    """{path: roles} of the params routed in an NNX owner module."""
    return {e.route.path: e.route.roles for e in vars(module)["_qjax_routes"]}


def _left_warning(caught):
    msgs = [str(w.message) for w in caught if issubclass(w.category, qjax.ConversionWarning)]
    assert len(msgs) == 1, msgs
    return msgs[0]


# ----------------------------------------------------------------------------- 1. every routed spelling (NNX)


class Op(nnx.Module):
    """One raw param `w` read by `fn(x, w)` (w: the Variable, so fn chooses how to read it)."""

    def __init__(self, fn, shape, key):
        self.fn = fn
        self.w = nnx.Param(_normal(key, shape))

    def __call__(self, x):
        return self.fn(x, self.w)


class Ops(nnx.Module):
    def __init__(self, specs, key):
        for (name, (fn, shape, _)), k in zip(specs.items(), jax.random.split(key, len(specs))):
            setattr(self, name, Op(fn, shape, k))


lax = jax.lax
X3, X4 = (2, 3, D), (2, 3, 4, 8)
# name: (fn(x, w), w shape, x shape); fn reads the param with w[...] (the array the module's methods see)
SPELLINGS = {
    "einsum": (lambda x, w: jnp.einsum("btd,dh->bth", x, w[...]), (D, H), X3),
    "einsum_implicit": (lambda x, w: jnp.einsum("btd,dh", x, w[...]), (D, H), X3),  # output "bht"
    "einsum_ellipsis": (lambda x, w: jnp.einsum("...d,dh->...h", x, w[...]), (D, H), X3),
    "einsum_w_first": (lambda x, w: jnp.einsum("dh,btd->bth", w[...], x), (D, H), X3),
    "einsum_multi_in": (lambda x, w: jnp.einsum("BTNH,NHD->BTD", x, w[...]), (4, 8, D), X4),
    "einsum_permuted_out": (lambda x, w: jnp.einsum("btd,dnh->bnth", x, w[...]), (D, 4, 8), X3),
    "matmul_op": (lambda x, w: x @ w[...], (D, H), X3),
    "matmul_op_T": (lambda x, w: x @ w[...].T, (H, D), X3),  # torch-style (out, in)
    "rmatmul": (lambda x, w: w[...] @ x, (H, D), (D, 5)),  # weight on the left: (out, in) @ (in, n)
    "dot": (lambda x, w: jnp.dot(x, w[...]), (D, H), X3),
    "matmul": (lambda x, w: jnp.matmul(x, w[...]), (D, H), X3),
    "lax_dot": (lambda x, w: lax.dot(x, w[...]), (D, H), (6, D)),
    "tensordot_int": (lambda x, w: jnp.tensordot(x, w[...], 1), (D, H), X3),
    "tensordot_2": (lambda x, w: jnp.tensordot(x, w[...], 2), (4, 8, D), X4),
    "tensordot_pairs": (lambda x, w: jnp.tensordot(x, w[...], axes=([2], [1])), (H, D), X3),
    "dot_general": (lambda x, w: lax.dot_general(x, w[...], (((2,), (0,)), ((), ()))), (D, H), X3),
    "dot_general_T": (lambda x, w: lax.dot_general(x, w[...], (((2,), (1,)), ((), ()))), (H, D), X3),
    "asarray": (lambda x, w: jnp.einsum("btd,dh->bth", x, jnp.asarray(w[...], jnp.float32)), (D, H), X3),
    "convert_element_type": (lambda x, w: x @ lax.convert_element_type(w[...], jnp.float32), (D, H), X3),
    "astype_method": (lambda x, w: x @ w[...].astype(jnp.float32), (D, H), X3),
    "transpose_perm": (lambda x, w: jnp.einsum("btd,dnh->btnh", x, jnp.transpose(w[...], (1, 0, 2))), (4, D, 8), X3),
    "transpose_method": (lambda x, w: x @ w[...].transpose(1, 0), (H, D), X3),
    "swapaxes_method": (lambda x, w: x @ w[...].swapaxes(0, 1), (H, D), X3),
    "swapaxes_fn": (lambda x, w: x @ jnp.swapaxes(w[...], -1, -2), (H, D), X3),
}


def _inputs(specs, key):
    keys = jax.random.split(key, len(specs))
    return {name: jax.random.normal(k, xs) for (name, (_, _, xs)), k in zip(specs.items(), keys)}


def _run(xs):
    return lambda m: {name: getattr(m, name)(x) for name, x in xs.items()}


def _jit_run(model, xs):
    """All outputs in one jitted call (one compile instead of many eager ones; the model is a closure)."""
    return jax.jit(lambda xs: _run(xs)(model))(xs)


def test_nnx_every_spelling_matches_merged(rng):
    k_model, k_x, k_ad = jax.random.split(_key(rng), 3)
    model = Ops(SPELLINGS, k_model)
    xs = _inputs(SPELLINGS, k_x)
    qn.convert(model, CFG, F32, nnx.Rngs(int(rng.integers(2**31))), inputs=_run(xs), strict=True)
    for name, (_, shape, _) in SPELLINGS.items():
        op = getattr(model, name)
        assert isinstance(op.w, qn.BaseParam) and qjax.is_quantized(op.w.get_value()), name
        assert type(op).__name__ == "Op" and isinstance(op, Op)
        assert float(jnp.max(jnp.abs(op.lora_b.get_value()))) == 0  # default init: B = 0
    _randomize_nnx(model, rng)
    y, ref = _jit_run(model, xs), _jit_run(_merged(model), xs)
    for name in SPELLINGS:
        _close(y[name], ref[name])  # float32 rounding only (module docstring)


def test_nnx_roles_of_spellings(rng):
    specs = {k: SPELLINGS[k] for k in ("einsum_w_first", "einsum_multi_in", "einsum_permuted_out", "matmul_op_T",
                                       "rmatmul", "transpose_perm")}
    model = Ops(specs, _key(rng))
    qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=_run(_inputs(specs, _key(rng))), strict=True)
    got = {name: _roles(getattr(model, name))[f"{name}/w"] for name in specs}
    assert got == {"einsum_w_first": ("in", "out"), "einsum_multi_in": ("in", "in", "out"),
                   "einsum_permuted_out": ("in", "out", "out"), "matmul_op_T": ("out", "in"),
                   "rmatmul": ("out", "in"), "transpose_perm": ("out", "in", "out")}
    # adapters (*in, r) / (r, *out) in parameter axis order
    assert model.einsum_multi_in.lora_a.shape == (4, 8, 4) and model.einsum_multi_in.lora_b.shape == (4, D)
    assert model.matmul_op_T.lora_a.shape == (D, 4) and model.matmul_op_T.lora_b.shape == (4, H)
    assert model.transpose_perm.lora_b.shape == (4, 4, 8)


def test_nnx_astype_bfloat16(rng):
    k_model, k_x, k_ad = jax.random.split(_key(rng), 3)
    specs = {"bf16": (lambda x, w: jnp.einsum("btd,dh->bth", x, jnp.astype(w[...], jnp.bfloat16)), (D, H), X3)}
    model = Ops(specs, k_model)
    xs = {"bf16": jax.random.normal(k_x, X3).astype(jnp.bfloat16)}
    qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=_run(xs), strict=True)
    _randomize_nnx(model, rng)
    y, ref = model.bf16(xs["bf16"]), _merged(model).bf16(xs["bf16"])
    assert y.dtype == ref.dtype == jnp.bfloat16
    # bfloat16 output (8-bit mantissa, eps 2^-8 = 3.9e-3) and the merged side rounds W to bf16 before a
    # bf16 matmul over D=32 terms: a few bf16 ulps of the output scale
    _close(y, ref, rtol=3e-2)


class ReadsVariable(nnx.Module):
    def __init__(self, key):
        self.w = nnx.Param(_normal(key, (D, H)))

    def __call__(self, x):
        return jnp.einsum("btd,dh->bth", x, self.w)  # the Variable itself, as plain JAX accepts


def test_nnx_variable_passed_itself(rng):
    k_model, k_x, k_ad = jax.random.split(_key(rng), 3)
    model = ReadsVariable(k_model)
    x = jax.random.normal(k_x, X3)
    qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=(x,), strict=True)
    _randomize_nnx(model, rng)
    _close(_jit(model, x), _jit(_merged(model), x))


# ----------------------------------------------------------------------------- 2. stacked (per-expert) axes


class Experts(nnx.Module):
    def __init__(self, key, e=2, batched=False):
        k1, k2 = jax.random.split(key)
        self.e, self.batched = e, batched
        self.gate = nnx.Param(_normal(k1, (e, D, H)))
        self.down = nnx.Param(_normal(k2, (e, H, D)))

    def __call__(self, x):  # x: (e, t, D) tokens routed to each expert
        if self.batched:
            h = jax.nn.silu(jnp.einsum("etd,edf->etf", x, self.gate[...]))
            return jnp.einsum("etf,efd->etd", h, self.down[...])
        outs = []
        for i in range(self.e):
            h = jax.nn.silu(jnp.einsum("td,df->tf", x[i], self.gate[...][i]))
            outs.append(h @ self.down[i])  # nnx.Variable indexing reads value[i]
        return jnp.stack(outs)


class MoEModel(nnx.Module):
    def __init__(self, key, batched):
        self.moe = Experts(key, batched=batched)

    def __call__(self, x):
        return self.moe(x)


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched_einsum"])
def test_nnx_per_expert_weights(rng, batched):
    k_model, k_x, k_ad = jax.random.split(_key(rng), 3)
    model = MoEModel(k_model, batched)
    x = jax.random.normal(k_x, (2, 3, D))
    qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=(x,), strict=True)
    moe = model.moe
    assert _roles(moe) == {"moe/gate": ("batch", "in", "out"), "moe/down": ("batch", "in", "out")}
    assert moe.gate_lora.lora_a.shape == (2, D, 4) and moe.gate_lora.lora_b.shape == (2, 4, H)
    assert moe.down_lora.lora_a.shape == (2, H, 4) and moe.down_lora.lora_b.shape == (2, 4, D)
    assert qjax.is_quantized(moe.gate.get_value())
    _randomize_nnx(model, rng)
    _close(_jit(model, x), _jit(_merged(model), x))


def test_nnx_loop_and_batched_expert_spellings_agree(rng):
    """The same converted weights read per expert in a loop and as a batched einsum give the same output."""
    k_model, k_x, k_ad = jax.random.split(_key(rng), 3)
    model = MoEModel(k_model, batched=False)
    x = jax.random.normal(k_x, (2, 3, D))
    qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=(x,), strict=True)
    _randomize_nnx(model, rng)
    y_loop = _jit(model, x)
    model.moe.batched = True
    _close(_jit(model, x), y_loop)  # float32: same matrices, other batching


# ----------------------------------------------------------------------------- 3. transforms


class Proj(nnx.Module):
    def __init__(self, key):
        self.w = nnx.Param(_normal(key, (4, 8, D)))

    def __call__(self, x):
        return jnp.einsum("BTNH,NHD->BTD", x, self.w[...])


class Net(nnx.Module):
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.up = Op(lambda x, w: x @ w[...], (D, H), k1)
        self.down = Op(lambda x, w: jnp.einsum("bth,dh->btd", x, w[...]), (D, H), k2)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def _net(rng):
    k_model, k_x, k_ad = jax.random.split(_key(rng), 3)
    model = Net(k_model)
    x = jax.random.normal(k_x, X3)
    qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=(x,), strict=True)
    _randomize_nnx(model, rng)
    return model, x


def test_nnx_under_transforms(rng):
    model, x = _net(rng)
    ref = _merged(model)(x)
    _close(model(x), ref)
    _close(jax.jit(lambda x: model(x))(x), ref)
    _close(nnx.jit(lambda m, x: m(x))(model, x), ref)
    _close(jax.checkpoint(lambda x: model(x))(x), ref)
    xs = jnp.stack([x, 2 * x])
    _, ys = jax.lax.scan(lambda c, xi: (c, model(xi)), None, xs)
    _close(ys[1], _merged(model)(2 * x))
    _close(ys[0], ref)
    _close(jax.vmap(lambda xi: model(xi[None])[0])(x), ref)


def test_nnx_adapter_gradients(rng):
    model, x = _net(rng)
    target = jax.random.normal(_key(rng), X3)
    loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    flat = {"/".join(map(str, k)): v.get_value() if hasattr(v, "get_value") else v
            for k, v in nnx.to_flat_state(grads)}
    assert sorted(flat) == ["down/lora_a", "down/lora_b", "up/lora_a", "up/lora_b"]
    for name, g in flat.items():
        assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0, name
    # reference: the same loss as a function of the adapters around the merged dense weights,
    # W(A, B) = W_merged + s * (A @ B - A0 @ B0) (the gradient at A0, B0 of the same function)
    merged = _merged(model)
    s = CFG.alpha / CFG.r
    a0 = {n: getattr(model, n).lora_a.get_value() for n in ("up", "down")}
    b0 = {n: getattr(model, n).lora_b.get_value() for n in ("up", "down")}
    wm = {n: getattr(merged, n).w.get_value() for n in ("up", "down")}

    def ref_loss(ad):
        delta = {n: s * (ad[n]["lora_a"] @ ad[n]["lora_b"] - a0[n] @ b0[n]) for n in ("up", "down")}
        w = {"up": wm["up"] + delta["up"], "down": wm["down"] + delta["down"].T}  # down: stored (out, in)
        h = jnp.tanh(x @ w["up"])
        return jnp.mean((jnp.einsum("bth,dh->btd", h, w["down"]) - target) ** 2)

    ref_l, ref_g = jax.value_and_grad(ref_loss)({n: {"lora_a": a0[n], "lora_b": b0[n]} for n in ("up", "down")})
    _close(loss, ref_l)
    for n in ("up", "down"):
        for leaf in ("lora_a", "lora_b"):
            # float32 backprop through two matmuls and tanh, other association order: 1e-4 of the scale
            _close(flat[f"{n}/{leaf}"], ref_g[n][leaf], rtol=1e-4)


def test_nnx_train_step_under_nnx_jit(rng):
    import optax
    model, x = _net(rng)
    target = jax.random.normal(_key(rng), X3)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2),
                                     argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, g)
        return loss

    base_before = model.up.w.get_value()
    losses = [float(step(model, opt)) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert model.up.w.get_value() is base_before or jax.tree.all(jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)), model.up.w.get_value(), base_before))
    _close(_jit(model, x), _jit(_merged(model), x))


# ----------------------------------------------------------------------------- 4. discovery outcomes


class Mixed(nnx.Module):
    """Params read by a matmul and also otherwise; one read by two matmuls of different roles."""

    def __init__(self, key):
        ks = jax.random.split(key, 6)
        self.ok = nnx.Param(_normal(ks[0], (D, D)))
        self.added = nnx.Param(_normal(ks[1], (D, D)))
        self.taken = nnx.Param(_normal(ks[2], (D, D)))
        self.sliced = nnx.Param(_normal(ks[3], (D, D)))
        self.summed = nnx.Param(_normal(ks[4], (D, D)))
        self.twice = nnx.Param(_normal(ks[5], (D, D)))

    def __call__(self, x):
        y = x @ self.ok[...]
        y = y + x @ self.added[...] + jnp.mean(self.added + 1)  # nnx.Variable operator: value + 1
        y = y + x @ self.taken[...] + jnp.take(self.taken[...], jnp.array([0, 1]), axis=0).sum()
        y = y + x @ self.sliced[...] + x[..., :4] @ self.sliced[:4, :]
        y = y + x @ self.summed[...] * jnp.sum(self.summed[...])
        return y + x @ self.twice[...] + x @ self.twice[...].T


class Holder(nnx.Module):
    def __init__(self, m):
        self.m = m


def _mixed(rng):
    model = Holder(Mixed(_key(rng)))
    x = jax.random.normal(_key(rng), X3)
    return model, x


def test_nnx_unroutable_params_stay_dense_and_are_listed(rng):
    model, x = _mixed(rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=lambda h: h.m(x))
    msg = _left_warning(caught)
    lines = {ln.split()[0]: ln for ln in msg.splitlines()[1:]}
    assert sorted(lines) == ["m/added", "m/sliced", "m/summed", "m/taken", "m/twice"], msg
    for line in lines.values():
        assert f"({D}, {D}) float32:" in line, line
    assert "__add__" in lines["m/added"] and "jnp.take" in lines["m/taken"]
    assert "indexing" in lines["m/sliced"] and "jnp.sum" in lines["m/summed"]
    assert "different axis roles" in lines["m/twice"]
    m = model.m
    assert isinstance(m.ok, qn.BaseParam) and qjax.is_quantized(m.ok.get_value())
    for name in ("added", "taken", "sliced", "summed", "twice"):
        v = getattr(m, name)
        assert type(v) is nnx.Param and not qjax.is_quantized(v.get_value()), name
    assert set(_roles(m)) == {"m/ok"}
    _randomize_nnx(model, rng)
    _close(m(x), _merged(model).m(x))


def test_nnx_strict_raises_with_the_same_list(rng):
    model, x = _mixed(rng)
    with pytest.raises(ValueError, match=r"(?s)m/added \(32, 32\) float32: .*__add__.*m/taken.*jnp\.take"):
        qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=lambda h: h.m(x), strict=True)
    assert type(model.m.ok) is nnx.Param  # nothing converted


class Child(nnx.Module):
    def __init__(self, key):
        self.w = nnx.Param(_normal(key, (D, H)))


class Parent(nnx.Module):
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.child = Child(k1)
        self.own = Op(lambda x, w: x @ w[...], (D, H), k2)

    def __call__(self, x):
        return x @ self.child.w[...] + self.own(x)  # the parent reads its child's param


def test_nnx_param_read_outside_its_module_stays_dense(rng):
    model = Parent(_key(rng))
    x = jax.random.normal(_key(rng), X3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qjax.ConversionWarning)
        qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=(x,))
    assert type(model.child.w) is nnx.Param and isinstance(model.own.w, qn.BaseParam)
    _randomize_nnx(model, rng)
    _close(_jit(model, x), _jit(_merged(model), x))


def test_nnx_param_read_outside_its_module_is_listed(rng):
    model = Parent(_key(rng))
    x = jax.random.normal(_key(rng), X3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=(x,))
    msg = _left_warning(caught)
    assert f"child/w ({D}, {H}) float32:" in msg and "outside the methods of the module that holds it" in msg, msg


class Derived(nnx.Module):
    """Params that reach a matmul only through another operation first."""

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.shifted = nnx.Param(_normal(k1, (D, D)))
        self.sliced = nnx.Param(_normal(k2, (D, D)))

    def __call__(self, x):
        return x @ (self.shifted[...] + 1) + x[..., :4] @ self.sliced[:4, :]


def test_nnx_param_feeding_matmul_through_other_op_is_listed(rng):
    model = Holder(Derived(_key(rng)))
    x = jax.random.normal(_key(rng), X3)
    with pytest.raises(ValueError, match=r"(?s)m/shifted.*m/sliced"):
        qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=lambda h: h.m(x), strict=True)


def test_nnx_without_inputs_says_not_traced(rng):
    model = Holder(Mixed(_key(rng)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError):  # no Flax linear layer and nothing traced: nothing to convert
            qn.convert(model, CFG, F32, nnx.Rngs(0))
    msgs = [str(w.message) for w in caught if issubclass(w.category, qjax.ConversionWarning)]
    # whatever convert decides for a model with nothing convertible, the params must be named as not traced
    assert not msgs or "not traced" in msgs[0]


def test_nnx_without_inputs_with_a_linear_layer(rng):
    class M(nnx.Module):
        def __init__(self, key):
            self.lin = nnx.Linear(D, H, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 2**30))))
            self.w = Op(lambda x, w: x @ w[...], (H, D), key)

        def __call__(self, x):
            return self.w(self.lin(x))

    model = M(_key(rng))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qn.convert(model, CFG, F32, nnx.Rngs(0))
    msg = _left_warning(caught)
    assert f"w/w ({H}, {D}) float32: not traced; pass inputs=" in msg, msg
    with pytest.raises(ValueError, match="not traced"):
        qn.convert(M(_key(rng)), CFG, F32, nnx.Rngs(0), strict=True)


def test_nnx_explicit_target_naming_unconvertible_param(rng):
    model, x = _mixed(rng)
    with pytest.raises(ValueError, match=r"(?s)m/added.*also read by .*operator __add__"):
        qn.convert(model, qjax.LoraConfig(r=4, target_modules=["m/added"]), F32, nnx.Rngs(0),
                   inputs=lambda h: h.m(x))


# ----------------------------------------------------------------------------- 5. configs


def test_nnx_quantize_only_and_16bit_lora(rng):
    k_model, k_x, k_ad = jax.random.split(_key(rng), 3)
    x = jax.random.normal(k_x, X3)
    # quantize only: no adapters, the merged (dequantized) model is the reference
    model = Net(k_model)
    qn.convert(model, None, F32, inputs=(x,), strict=True)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert qjax.is_quantized(model.up.w.get_value())
    _close(_jit(model, x), _jit(_merged(model), x))
    # 16-bit LoRA: a dense base; default init (B = 0) is the original model exactly
    model = Net(k_model)
    ref0 = model(x)
    qn.convert(model, CFG, None, nnx.Rngs(0), inputs=(x,), strict=True)
    assert isinstance(model.up.w, qn.BaseParam) and not qjax.is_quantized(model.up.w.get_value())
    _close(model(x), ref0, rtol=1e-6)  # B = 0: the dense matmul alone
    _randomize_nnx(model, rng)
    _close(_jit(model, x), _jit(_merged(model), x))


def test_nnx_llm_int8(rng):
    k_model, k_x, k_ad = jax.random.split(_key(rng), 3)
    x = jax.random.normal(k_x, X3)
    x = x.at[..., 3].multiply(20.0)  # outlier feature: the LLM.int8 decomposition path is taken
    int8 = qjax.QuantConfig(format="int8", blocksize=None, double_quant=False, compute_dtype=jnp.float32)
    assert int8.is_llm_int8
    # routed param vs an nnx.Linear with the same kernel converted by the layer path: same int8 matmul
    w = _normal(k_model, (D, H))

    class Lin(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(D, H, use_bias=False, rngs=nnx.Rngs(0))
            self.lin.kernel.set_value(w)

        def __call__(self, x):
            return self.lin(x)

    model, lin = Holder(Op(lambda x, w: x @ w[...], (D, H), k_model)), Lin()
    model.m.w.set_value(w)
    qn.convert(model, None, int8, inputs=lambda h: h.m(x), strict=True)
    qn.convert(lin, None, int8)
    _close(model.m(x), lin(x), rtol=1e-6)  # the same int8 computation
    # with adapters: against the merged dense model; int8 activations (row absmax / 127) cost ~1% of scale
    model = Holder(Op(lambda x, w: x @ w[...], (D, H), k_model))
    qn.convert(model, CFG, int8, nnx.Rngs(0), inputs=lambda h: h.m(x), strict=True)
    _randomize_nnx(model, rng)
    _close(model.m(x), _merged(model).m(x), rtol=3e-2)


def test_nnx_llm_int8_documented_spelling(rng):
    x = jax.random.normal(_key(rng), X3)
    model = Holder(Op(lambda x, w: x @ w[...], (D, H), _key(rng)))
    with pytest.raises(ValueError, match="LLM.int8 .* has no double quantization: pass double_quant=False"):
        qjax.QuantConfig(format="int8", blocksize=None, llm_int8_threshold=6.0)
    int8 = qjax.QuantConfig(format="int8", blocksize=None, double_quant=False, llm_int8_threshold=6.0,
                            compute_dtype=jnp.float32)
    qn.convert(model, None, int8, inputs=lambda h: h.m(x), strict=True)
    assert jnp.all(jnp.isfinite(model.m(x)))


# ----------------------------------------------------------------------------- 6. runtime refusal


class Flagged(nnx.Module):
    def __init__(self, key):
        self.w = nnx.Param(_normal(key, (D, H)))

    def __call__(self, x, shift=False):
        y = x @ self.w[...]
        if shift:
            y = y + jnp.sum(self.w[...] + 0)
        return y


def test_nnx_unrouted_op_at_runtime_raises_naming_the_param(rng):
    model = Holder(Flagged(_key(rng)))
    x = jax.random.normal(_key(rng), X3)
    qn.convert(model, CFG, F32, nnx.Rngs(0), inputs=lambda h: h.m(x), strict=True)
    model.m(x)
    with pytest.raises(TypeError, match=r"m/w is a qjax-converted parameter"):
        model.m(x, shift=True)
    with pytest.raises(TypeError, match=r"m/w is a qjax-converted parameter"):
        jax.jit(lambda x: model.m(x, shift=True))(x)
    model.m(x)  # the param is bound back after the failed call


# ----------------------------------------------------------------------------- 7. LoRA dropout


def test_nnx_lora_dropout_train_and_eval(rng):
    k_model, k_x, k_ad = jax.random.split(_key(rng), 3)
    model = Net(k_model)
    x = jax.random.normal(k_x, X3)
    qn.convert(model, qjax.LoraConfig(r=4, alpha=8, dropout=0.5), F32, nnx.Rngs(int(rng.integers(2**31))),
               inputs=(x,), strict=True)
    _randomize_nnx(model, rng)
    y1, y2 = model(x), model(x)
    assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-3  # two dropout draws
    model.eval()
    e1, e2 = model(x), model(x)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    _close(e1, _merged(model)(x))
    model.train()
    assert float(jnp.max(jnp.abs(model(x) - e1))) > 1e-3


# ----------------------------------------------------------------------------- 8. Linen


class LEinsum(nn.Module):  # gemma-style
    shape: tuple

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param("w", nn.initializers.normal(0.1), self.shape)
        return jnp.einsum(eqn, x, w)


class LDenseGeneral(nn.Module):  # MaxText-style
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.1), (x.shape[-1], self.features))
        kernel = jnp.asarray(kernel, jnp.float32)
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class LTwo(nn.Module):
    @nn.compact
    def __call__(self, x):
        wi = self.param("wi", nn.initializers.normal(0.1), (4, D, H))
        wo = self.param("wo", nn.initializers.normal(0.1), (4, H, D))
        h = jax.nn.gelu(jnp.einsum("btd,edf->btef", x, wi))
        return jnp.einsum("btef,efd->btd", h, wo)


class LBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = LEinsum((D, 4, 8), name="q_einsum")("BTD,DNH->BTNH", x)
        x = x + LEinsum((4, 8, D), name="o_einsum")("BTNH,NHD->BTD", q)
        x = x + LDenseGeneral(D, name="mlp")(x)
        return x + LTwo(name="moe")(x)


def _linen(model, rng, lora=CFG, quant=F32, x_shape=X3):
    k_init, k_x, k_conv = jax.random.split(_key(rng), 3)
    x = jax.random.normal(k_x, x_shape)
    v = model.init(k_init, x)
    qm, qv = ql.convert(model, v, lora, quant, k_conv, inputs=(x,), strict=True)
    return v, qm, qv, x


def test_linen_modules_match_merged(rng):
    v, qm, qv, x = _linen(LBlock(), rng)
    p = qv["params"]
    assert qjax.is_quantized(p["q_einsum"]["w"]) and p["q_einsum"]["lora_a"].shape == (D, 4)
    assert p["q_einsum"]["lora_b"].shape == (4, 4, 8) and p["o_einsum"]["lora_a"].shape == (4, 8, 4)
    assert qjax.is_quantized(p["mlp"]["kernel"]) and p["mlp"]["lora_b"].shape == (4, D)
    # a module holding two params: adapters under "<name>_lora"; the expert axis is a batch axis
    assert sorted(p["moe"]) == ["wi", "wi_lora", "wo", "wo_lora"]
    # "btd,edf->btef": e is produced (out); "btef,efd->btd": e is contracted (in)
    assert p["moe"]["wi_lora"]["lora_a"].shape == (D, 4) and p["moe"]["wi_lora"]["lora_b"].shape == (4, 4, H)
    assert p["moe"]["wo_lora"]["lora_a"].shape == (4, H, 4) and p["moe"]["wo_lora"]["lora_b"].shape == (4, D)
    roles = {r.path: r.route.roles for r in type(qm)._qjax_spec.params}
    assert roles == {"q_einsum/w": ("in", "out", "out"), "o_einsum/w": ("in", "in", "out"), "mlp/kernel": ("in", "out"),
                     "moe/wi": ("out", "in", "out"), "moe/wo": ("in", "in", "out")}
    qv = _randomize_linen(qv, rng)
    y = qm.apply(qv, x)
    mm, mv = ql.merge(qm, qv)
    assert type(mm) is LBlock
    _close(y, mm.apply(mv, x))
    _close(jax.jit(qm.apply)(qv, x), y)


def test_linen_quantize_only_and_16bit(rng):
    v, qm, qv, x = _linen(LBlock(), rng, lora=None)
    assert "lora_a" not in qv["params"]["q_einsum"]
    mm, mv = ql.merge(qm, qv)
    _close(qm.apply(qv, x), mm.apply(mv, x))
    model = LBlock()
    v, qm, qv, x = _linen(model, rng, quant=None)
    assert not qjax.is_quantized(qv["params"]["q_einsum"]["w"])
    _close(qm.apply(qv, x), model.apply(v, x), rtol=1e-6)  # B = 0: the dense matmul alone
    qv = _randomize_linen(qv, rng)
    mm, mv = ql.merge(qm, qv)
    _close(qm.apply(qv, x), mm.apply(mv, x))


def test_linen_adapter_gradients(rng):
    v, qm, qv, x = _linen(LBlock(), rng)
    qv = _randomize_linen(qv, rng)
    target = jax.random.normal(_key(rng), X3)

    def loss(p):
        return jnp.mean((qm.apply({"params": p}, x) - target) ** 2)

    g = jax.grad(loss, allow_int=True)(qv["params"])
    for path in (("q_einsum", "lora_b"), ("mlp", "lora_a"), ("moe", "wi_lora", "lora_b"), ("moe", "wo_lora", "lora_a")):
        leaf = g
        for k in path:
            leaf = leaf[k]
        assert np.all(np.isfinite(leaf)) and float(jnp.max(jnp.abs(leaf))) > 0, path


class LDrop(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LDenseGeneral(H, name="proj")(x)


def test_linen_lora_dropout(rng):
    v, qm, qv, x = _linen(LDrop(), rng, lora=qjax.LoraConfig(r=4, alpha=8, dropout=0.5))
    qv = _randomize_linen(qv, rng)
    k1, k2 = jax.random.split(_key(rng))
    y0 = qm.apply(qv, x)
    np.testing.assert_array_equal(np.asarray(qm.apply(qv, x)), np.asarray(y0))  # no rng: no dropout
    mm, mv = ql.merge(qm, qv)
    _close(y0, mm.apply(mv, x))
    d1, d2 = qm.apply(qv, x, rngs={"dropout": k1}), qm.apply(qv, x, rngs={"dropout": k2})
    assert float(jnp.max(jnp.abs(d1 - y0))) > 1e-3 and float(jnp.max(jnp.abs(d1 - d2))) > 1e-3
    np.testing.assert_array_equal(np.asarray(qm.apply(qv, x, rngs={"dropout": k1})), np.asarray(d1))


class LLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        w = self.param("w", nn.initializers.normal(0.1), (D, D))
        return x + jnp.tanh(jnp.einsum("btd,de->bte", x, w)), None


class LScanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(LLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = layers(name="layers")(x, None)
        return x


def test_linen_scanned_layers(rng):
    v, qm, qv, x = _linen(LScanned(), rng)
    assert v["params"]["layers"]["w"].shape == (3, D, D)
    roles = {r.path: r.route.roles for r in type(qm)._qjax_spec.params}
    assert roles == {"layers/w": ("lead", "in", "out")}
    assert qv["params"]["layers"]["lora_a"].shape == (3, D, 4)
    qv = _randomize_linen(qv, rng)
    mm, mv = ql.merge(qm, qv)
    _close(qm.apply(qv, x), mm.apply(mv, x))
