"""qjax.checkpoint: plain orbax on quantized trees, restore without a target, adapters, errors."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import qjax
from helpers import random_weights
from qjax.checkpoint import CheckpointError

CASES = [("nf4", 64, True, False, "bfloat16", (64, 128)),
         ("fp4", 128, False, True, "float32", (33, 17)),
         ("int8", None, False, False, "float16", (16, 24)),
         ("int8", 256, True, True, "bfloat16", (40, 12))]


def _tree(rng):
    tree = {"params": {}}
    for i, (fmt, bs, dq, tr, dtype, shape) in enumerate(CASES):
        x = jnp.asarray(random_weights(rng, shape, dtype))
        tree["params"][f"d{i}"] = {"kernel": qjax.quantize(x, fmt, blocksize=bs, double_quant=dq, transposed=tr),
                                   "bias": jnp.asarray(random_weights(rng, shape[-1:], dtype))}
    tree["step"] = jnp.asarray(7, jnp.int32)
    return tree


def assert_bit_identical(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb  # includes every QuantizedArray's static fields
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_plain_orbax_roundtrip_onto_target(rng, tmp_path):
    tree = _tree(rng)
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "a", tree)
    ck.wait_until_finished()
    assert_bit_identical(ck.restore(tmp_path / "a", tree), tree)
    abstract = jax.eval_shape(lambda: tree)  # QuantizedArrays of ShapeDtypeStructs
    assert_bit_identical(ck.restore(tmp_path / "a", abstract), tree)


def test_checkpoint_manager_with_tree_metadata_restores_without_target(rng, tmp_path):
    tree = _tree(rng)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(3, args=ocp.args.StandardSave(tree), custom_metadata=qjax.checkpoint.tree_metadata(tree))
        mngr.wait_until_finished()
        assert_bit_identical(mngr.restore(3, args=ocp.args.StandardRestore(tree)), tree)
    assert_bit_identical(qjax.checkpoint.restore(tmp_path / "3"), tree)


def test_save_restore_without_target(rng, tmp_path):
    tree = _tree(rng)
    qjax.checkpoint.save(tmp_path / "c", tree)
    out = qjax.checkpoint.restore(tmp_path / "c")
    assert_bit_identical(out, tree)
    assert all(qjax.is_quantized(out["params"][f"d{i}"]["kernel"]) for i in range(len(CASES)))
    meta = qjax.checkpoint.read_metadata(tmp_path / "c")
    assert meta["quantized"] == qjax.checkpoint.tree_metadata(tree)["qjax"]["quantized"]
    assert [(m["format"], m["blocksize"], m["double_quant"], m["transposed"], m["dtype"], tuple(m["shape"]))
            for m in meta["quantized"]] == CASES
    assert set(meta["checksums"]) >= {"params/d0/kernel/packed", "params/d0/bias", "step"}
    # nested lists / int keys (nnx State style) survive too
    lst = {"layers": [tree["params"]["d0"], tree["params"]["d1"]]}
    qjax.checkpoint.save(tmp_path / "l", lst)
    assert_bit_identical(qjax.checkpoint.restore(tmp_path / "l"), lst)


def test_sharded_target(tmp_path):
    """Restore onto a target sharded over 4 CPU devices (own process: the device count is fixed at start)."""
    code = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import qjax
        x = jnp.asarray(np.random.default_rng().standard_normal((64, 256)).astype(np.float32), jnp.bfloat16)
        q = qjax.quantize(x, "nf4", double_quant=True)
        tree = {{"kernel": q, "lora_a": jnp.ones((64, 8))}}
        qjax.checkpoint.save({str(tmp_path / 's')!r}, tree)
        mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("x", "y"))
        col = NamedSharding(mesh, P(None, "y"))
        rep = NamedSharding(mesh, P())
        target = jax.eval_shape(lambda: tree)
        target["kernel"] = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                        target["kernel"], q.replace(packed=col, absmax=col, nested_absmax=rep,
                                                                    offset=rep))
        out = qjax.checkpoint.restore({str(tmp_path / 's')!r}, target)
        assert out["kernel"].packed.sharding == col, out["kernel"].packed.sharding
        assert len(out["kernel"].packed.addressable_shards) == 4
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        np.testing.assert_array_equal(np.asarray(qjax.dequantize(out["kernel"])), np.asarray(qjax.dequantize(q)))
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- errors


def test_wrong_target_shape_names_leaf(rng, tmp_path):
    tree = _tree(rng)
    qjax.checkpoint.save(tmp_path / "c", tree)
    other = dict(tree, params=dict(tree["params"], d1={
        "kernel": qjax.quantize(jnp.ones((33, 18)), "fp4", blocksize=128, transposed=True),
        "bias": tree["params"]["d1"]["bias"]}))
    with pytest.raises(CheckpointError, match=r"params/d1/kernel.*\(33, 17\).*\(33, 18\)"):
        qjax.checkpoint.restore(tmp_path / "c", other)
    with pytest.raises(CheckpointError, match="params/extra is not in the checkpoint"):
        qjax.checkpoint.restore(tmp_path / "c", dict(tree, params=dict(tree["params"], extra=jnp.ones(2))))


def test_missing_and_interrupted_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        qjax.checkpoint.restore(tmp_path / "nope")
    (tmp_path / "x.orbax-checkpoint-tmp-123").mkdir()
    with pytest.raises(CheckpointError, match="interrupted save"):
        qjax.checkpoint.restore(tmp_path / "x")


def test_missing_metadata(rng, tmp_path):
    tree = _tree(rng)
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "plain", tree)  # no custom_metadata
    ck.wait_until_finished()
    with pytest.raises(CheckpointError, match="no qjax metadata.*params/d0/kernel"):
        qjax.checkpoint.restore(tmp_path / "plain")
    qjax.checkpoint.save(tmp_path / "c", tree)
    os.remove(tmp_path / "c" / "_METADATA")
    with pytest.raises(CheckpointError, match="missing its orbax tree metadata"):
        qjax.checkpoint.restore(tmp_path / "c")


def _data_files(root):
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if "ocdbt.process" in d and os.path.getsize(os.path.join(d, f)) > 0]
    return sorted(out, key=os.path.getsize)


def test_truncated_and_corrupted_files(rng, tmp_path):
    tree = _tree(rng)
    for name in ("t", "b", "m"):
        qjax.checkpoint.save(tmp_path / name, tree)
    # truncated data file
    f = _data_files(tmp_path / "t")[-1]
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(CheckpointError, match="truncated|corrupted"):
        qjax.checkpoint.restore(tmp_path / "t")
    # flipped bytes in the middle of the largest data file
    f = _data_files(tmp_path / "b")[-1]
    data = bytearray(open(f, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(255 - v for v in data[mid:mid + 16])
    open(f, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        qjax.checkpoint.restore(tmp_path / "b")
    # truncated metadata JSON
    f = tmp_path / "m" / "_CHECKPOINT_METADATA"
    f.write_text(f.read_text()[:40])
    with pytest.raises(CheckpointError, match="_CHECKPOINT_METADATA.*unreadable"):
        qjax.checkpoint.restore(tmp_path / "m")


def test_inconsistent_metadata_is_caught(rng, tmp_path):
    tree = _tree(rng)
    qjax.checkpoint.save(tmp_path / "c", tree)
    f = tmp_path / "c" / "_CHECKPOINT_METADATA"
    meta = json.loads(f.read_text())
    meta["custom_metadata"]["qjax"]["quantized"][0]["shape"] = [64, 256]
    f.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="params/d0/kernel.*inconsistent leaves"):
        qjax.checkpoint.restore(tmp_path / "c")
