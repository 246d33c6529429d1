"""qjax.optim: adapters_only keeps no state for the frozen base and leaves it bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax.optim import adapters_only, is_adapter_path, merge_adapters, split_adapters


def _params(rng):
    w = jnp.asarray(rng.standard_normal((64, 32)) * 0.05, jnp.float32)
    return {"layer": {"kernel": qjax.quantize(w, "nf4", double_quant=True),
                      "bias": jnp.asarray(rng.standard_normal(32), jnp.float32),
                      "lora_a": jnp.asarray(rng.standard_normal((64, 4)) * 0.1, jnp.float32),
                      "lora_b": jnp.zeros((4, 32), jnp.float32)},
            "norm": {"scale": jnp.ones(32, jnp.float32)}}


def _loss(params, x):
    p = params["layer"]
    y = qjax.qmatmul(x, p["kernel"], compute_dtype=jnp.float32) + p["bias"][None] + x @ p["lora_a"] @ p["lora_b"]
    return jnp.mean((y * params["norm"]["scale"][None] - 1.0) ** 2)


def _grads(kind, params, x):
    if kind == "float0":
        return jax.grad(_loss, allow_int=True)(params, x)
    if kind == "zeros":
        g = jax.grad(_loss, allow_int=True)(params, x)
        return jax.tree_util.tree_map(lambda p, gi: jnp.zeros_like(p) if gi.dtype == jax.dtypes.float0 else gi,
                                      params, g)
    adapters, rest = split_adapters(params)
    return jax.grad(lambda a: _loss(merge_adapters(a, rest), x))(adapters)


TXS = {
    "adam": lambda: optax.adam(1e-2),
    "chain_clip_schedule": lambda: optax.chain(optax.clip_by_global_norm(0.5),
                                               optax.adamw(optax.cosine_decay_schedule(1e-2, 20))),
    "sgd": lambda: optax.sgd(1e-2, momentum=0.9),
}


@pytest.mark.parametrize("kind", ["float0", "zeros", "adapters_only_tree"])
@pytest.mark.parametrize("tx_name", sorted(TXS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_adapters_only_updates_adapters_and_nothing_else(kind, tx_name, jit, rng):
    params = _params(rng)
    x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    tx = adapters_only(TXS[tx_name]())
    state = tx.init(params)
    adapter_elems = 64 * 4 + 4 * 32
    state_elems = sum(np.size(s) for s in jax.tree_util.tree_leaves(state))
    assert state_elems <= 2 * adapter_elems + 4, state_elems

    def step(params, state):
        updates, state = tx.update(_grads(kind, params, x), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    new, state = step(params, state)
    new, state = step(new, state)
    assert not np.array_equal(np.asarray(new["layer"]["lora_b"]), np.asarray(params["layer"]["lora_b"]))
    for leaf_old, leaf_new in zip(jax.tree_util.tree_leaves(params["layer"]["kernel"]),
                                  jax.tree_util.tree_leaves(new["layer"]["kernel"])):
        assert leaf_old.dtype == leaf_new.dtype
        np.testing.assert_array_equal(np.asarray(leaf_old), np.asarray(leaf_new))
    np.testing.assert_array_equal(np.asarray(new["layer"]["bias"]), np.asarray(params["layer"]["bias"]))
    np.testing.assert_array_equal(np.asarray(new["norm"]["scale"]), np.asarray(params["norm"]["scale"]))


def test_split_merge_roundtrip(rng):
    params = _params(rng)
    adapters, rest = split_adapters(params)
    assert adapters["layer"]["kernel"] is None and rest["layer"]["lora_a"] is None
    assert sorted(qjax._src.paths.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]) == \
        ["layer/lora_a", "layer/lora_b"]
    back = merge_adapters(adapters, rest)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        assert a is b
    assert is_adapter_path("params/blocks/0/up/lora_a") and not is_adapter_path("params/up/kernel")


def test_mismatched_updates_raise(rng):
    params = _params(rng)
    tx = adapters_only(optax.adam(1e-2))
    state = tx.init(params)
    with pytest.raises(ValueError, match="missing.*layer/lora_b"):
        tx.update({"layer": {"lora_a": jnp.zeros((64, 4))}}, state, None)


def test_upcast_half_params_and_linen_prepare(rng):
    w = jnp.asarray(rng.standard_normal((16, 64)), jnp.bfloat16)
    tree = {"dense": {"kernel": qjax.quantize(w, "nf4"), "bias": w[0]}, "norm": {"scale": w[1].astype(jnp.float16)},
            "step": jnp.asarray(3, jnp.int32), "f32": w[2].astype(jnp.float32)}
    for out in (qjax.upcast_half_params(tree), qjax.prepare_for_kbit_training(tree)):
        assert out["dense"]["bias"].dtype == jnp.float32 and out["norm"]["scale"].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(out["dense"]["bias"]), np.asarray(w[0], np.float32))
        assert out["dense"]["kernel"] is tree["dense"]["kernel"]  # packed codes untouched
        assert out["step"].dtype == jnp.int32 and out["f32"] is tree["f32"]
