"""qjax.checkpoint.ResumeManager: bit-identical resume, keep-last-K, atomic saves under SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax._src.adapters import tree as ad
from qlora_trees import apply, qlora_variables
from qjax.checkpoint import CheckpointError, ResumeManager

CFG = qjax.LoraConfig(r=4, alpha=8, dropout=0.1)


def _merge(base, upd):
    if not isinstance(upd, dict):
        return upd
    return {k: _merge(base[k], upd[k]) if k in upd else base[k] for k in base}


def _setup(rng):
    variables = qlora_variables(rng, d=16, r=4, layers=1)
    adapters = ad.nest(ad.flat_adapters(variables))
    data = [(rng.standard_normal((4, 16)).astype(np.float32), rng.standard_normal((4, 16)).astype(np.float32))
            for _ in range(5)]
    tx = optax.adam(1e-2)

    @jax.jit
    def train_step(adapters, opt_state, key, x, y):
        def loss(a):
            keep = jax.random.bernoulli(key, 1 - CFG.dropout, x.shape)
            xd = jnp.where(keep, x / (1 - CFG.dropout), 0.0)
            return jnp.mean((apply(_merge(variables, a), xd, CFG.scaling) - y) ** 2)
        grads = jax.grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    def run(until, *, state=None, mgr=None, stop_at=None):
        if state is None:
            state = (0, adapters, tx.init(adapters), jax.random.key(1234), 0)
        step, a, o, key, pos = state
        while step < until:
            step += 1
            key, sub = jax.random.split(key)
            x, y = data[pos % len(data)]
            pos += 1
            a, o = train_step(a, o, sub, x, y)
            if mgr is not None:
                mgr.save(step, adapters=a, opt_state=o, rng=key, data_position=pos)
            if step == stop_at:
                break
        return step, a, o, key, pos

    return adapters, tx, run


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_resume_is_bit_identical(rng, tmp_path):
    adapters, tx, run = _setup(rng)
    _, a_ref, o_ref, key_ref, pos_ref = run(10)

    with ResumeManager(tmp_path, save_every=3, keep=2, lora_config=CFG) as mgr:
        run(10, mgr=mgr, stop_at=7)  # "crash" after step 7: last checkpoint is step 6
        assert mgr.all_steps() == [3, 6]

    with ResumeManager(tmp_path, save_every=3, keep=2, lora_config=CFG) as mgr:
        template_o = jax.eval_shape(tx.init, adapters)
        st = mgr.restore(adapters=adapters, opt_state=template_o)
        assert (st.step, st.data_position, st.lora_config) == (6, 6, CFG)
        _, a, o, key, pos = run(10, state=(st.step, st.adapters, st.opt_state, st.rng, st.data_position), mgr=mgr)
        assert mgr.all_steps() == [6, 9]

    assert pos == pos_ref
    assert _bits(a) == _bits(a_ref)
    assert _bits(o) == _bits(o_ref)
    assert _bits(jax.random.key_data(key)) == _bits(jax.random.key_data(key_ref))


def test_restore_errors(rng, tmp_path):
    adapters, tx, run = _setup(rng)
    with ResumeManager(tmp_path, save_every=1, lora_config=CFG) as mgr:
        assert mgr.restore(adapters=adapters, opt_state=tx.init(adapters)) is None
        run(1, mgr=mgr)
    with ResumeManager(tmp_path, lora_config=qjax.LoraConfig(r=8)) as mgr:
        with pytest.raises(CheckpointError, match="saved with LoraConfig"):
            mgr.restore(adapters=adapters, opt_state=tx.init(adapters))
    with ResumeManager(tmp_path) as mgr:
        with pytest.raises(CheckpointError, match="no step 5"):
            mgr.restore(5, adapters=adapters, opt_state=tx.init(adapters))
        bigger = ad.nest(ad.flat_adapters(qlora_variables(rng, d=16, r=8, layers=1)))
        with pytest.raises(CheckpointError, match=r"lora_a: checkpoint has shape=\(16, 4\).*target has shape=\(16, 8\)"):
            mgr.restore(adapters=bigger, opt_state=tx.init(bigger))
        with pytest.raises(CheckpointError, match="opt_state"):
            mgr.restore(adapters=adapters, opt_state=optax.sgd(0.1, momentum=0.9).init(adapters))


_WRITER = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    import qjax
    from qjax.checkpoint import ResumeManager

    mgr = ResumeManager(sys.argv[1], save_every=1, async_save=False)
    def state(v):
        return {"layer": {"lora_a": jnp.full((64, 4), v), "lora_b": jnp.full((4, 64), v)}}
    mgr.save(1, adapters=state(1.0), opt_state={"mu": jnp.full((8,), 1.0)}, data_position=1)
    mgr.wait_until_finished()

    async def stall(self, *args, **kwargs):  # every array is written; the rename is pending
        print("FINALIZING", flush=True)
        time.sleep(600)
    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        cls.finalize = stall
    print("SAVING 2", flush=True)
    mgr.save(2, adapters=state(2.0), opt_state={"mu": jnp.full((8,), 2.0)}, data_position=2)
    mgr.wait_until_finished()
    print("SAVED 2", flush=True)
""")


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("FINALIZING"):
                break
        assert lines[-1:] == ["FINALIZING"], lines
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert any(".orbax-checkpoint-tmp" in f for f in os.listdir(tmp_path)), os.listdir(tmp_path)

    template = {"layer": {"lora_a": jnp.zeros((64, 4)), "lora_b": jnp.zeros((4, 64))}}
    with ResumeManager(tmp_path, save_every=1) as mgr:
        assert mgr.all_steps() == [1]
        st = mgr.restore(adapters=template, opt_state={"mu": jnp.zeros((8,))})
    assert st.step == 1 and st.data_position == 1
    np.testing.assert_array_equal(st.adapters["layer"]["lora_a"], np.full((64, 4), 1.0, np.float32))
    with pytest.raises(CheckpointError, match="interrupted save"):
        qjax.checkpoint.restore(tmp_path / "2")
