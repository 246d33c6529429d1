"""Checkpoints written before the house redesign restore after it (tests/fixtures/ckpt_v0).

The fixture was written by qjax at commit 1b948ba: `tree` (QuantizedArrays of every format, double
quant, transposed and per-channel layouts, a vmapped stack), `adapters` (save_adapters of a converted
two-layer Linen model), `qlora_variables` (that model's whole variables) and the arrays they came from.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import qjax

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "ckpt_v0")
CASES = [("nf4", 64, True, False, "bfloat16", (64, 128)), ("fp4", 128, False, True, "float32", (33, 17)),
         ("int8", None, False, False, "float16", (16, 24)), ("int8", 256, True, True, "bfloat16", (40, 12)),
         ("nf3", 64, False, False, "float32", (8, 64)), ("nf2", 32, True, False, "float32", (4, 64))]


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(32, name="out")(nn.relu(nn.Dense(64, name="up")(x)))


def _same_bytes(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_old_quantized_tree_restores_bit_identical():
    tree = qjax.checkpoint.restore(os.path.join(FIXTURE, "tree"))
    dense = np.load(os.path.join(FIXTURE, "dense.npz"))
    deq = np.load(os.path.join(FIXTURE, "dequantized.npz"))
    assert int(tree["step"]) == 7
    for i, (fmt, bs, dq, tr, dtype, shape) in enumerate(CASES):
        q = tree["params"][f"d{i}"]["kernel"]
        assert qjax.is_quantized(q) and q.shape == shape and np.dtype(q.dtype) == np.dtype(dtype)
        again = qjax.quantize(jnp.asarray(dense[f"d{i}"], dtype), fmt, blocksize=bs, double_quant=dq,
                              transposed=tr)
        _same_bytes(q, again)  # today's quantizer writes the same leaves and static data
        np.testing.assert_array_equal(np.asarray(qjax.dequantize(q), np.float32), deq[f"d{i}"])
    stacked = tree["params"]["stacked"]["kernel"]
    assert stacked.stack_shape == (3,)
    _same_bytes(stacked, jax.vmap(lambda w: qjax.quantize(w, "nf4", blocksize=64))(jnp.asarray(dense["stacked"])))
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(stacked), np.float32), deq["stacked"])


def test_old_qlora_variables_and_adapters_restore_and_run():
    x = np.load(os.path.join(FIXTURE, "input.npy"))
    expected = np.load(os.path.join(FIXTURE, "output.npy"))
    model = _Model()
    variables = model.init(jax.random.key(0), x)
    cfg = qjax.checkpoint.read_adapter_config(os.path.join(FIXTURE, "adapters"))
    assert (cfg.r, cfg.alpha) == (4, 8.0)
    qmodel, fresh = qjax.linen.convert(model, variables, cfg, qjax.QuantConfig("nf4", blocksize=64), inputs=x,
                                       rng=jax.random.key(1))
    restored = qjax.checkpoint.restore(os.path.join(FIXTURE, "qlora_variables"))
    np.testing.assert_array_equal(np.asarray(qmodel.apply(restored, x)), expected)
    # the adapters file onto freshly converted variables: same adapters, same bases, same output
    loaded = qjax.checkpoint.load_adapters(os.path.join(FIXTURE, "adapters"), fresh, lora_config=cfg)
    for name in ("up", "out"):
        for leaf in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(loaded["params"][name][leaf], restored["params"][name][leaf])
    np.testing.assert_array_equal(np.asarray(qmodel.apply(loaded, x)), expected)


def test_old_resume_step_with_adapters_only_state_restores_and_trains_on(tmp_path):
    """A ResumeManager step saved mid-training (adapters_only(adam) state) before the redesign."""
    import shutil

    import optax

    from qjax._src.adapters import tree as ad

    shutil.copytree(os.path.join(FIXTURE, "resume"), tmp_path / "resume")  # restore may tidy the directory
    variables = qjax.checkpoint.restore(os.path.join(FIXTURE, "qlora_variables"))
    tx = qjax.optim.adapters_only(optax.adam(1e-2))
    template = ad.nest(ad.flat_adapters(variables))
    with qjax.checkpoint.ResumeManager(tmp_path / "resume") as mgr:
        state = mgr.restore(adapters=template, opt_state=tx.init(variables["params"]))
    assert (state.step, state.data_position) == (2, 16)
    stored = np.load(os.path.join(FIXTURE, "resume_opt_state.npz"))
    leaves = jax.tree_util.tree_leaves(state.opt_state)
    assert len(leaves) == len(stored.files)
    for leaf, name in zip(leaves, sorted(stored.files)):
        np.testing.assert_array_equal(np.asarray(leaf), stored[name])
    params = jax.tree_util.tree_map(lambda x: x, variables["params"], is_leaf=qjax.is_quantized)
    for layer in ("up", "out"):
        params[layer].update(state.adapters["params"][layer])
    grads = jax.tree_util.tree_map(lambda x: x if qjax.is_quantized(x) else jnp.ones_like(x), params,
                                   is_leaf=qjax.is_quantized)
    updates, new_state = tx.update(grads, state.opt_state, params)  # training goes on from the old state
    assert int(new_state.inner[0].count) == 3
    assert np.all(np.asarray(updates["up"]["kernel"].packed) == 0)
