"""Sharded quantized arrays on 8 simulated CPU devices: placement, qmatmul, quantization, orbax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from _md_helpers import hlo_collectives, make_mesh

# (weight spec over (K, N), x spec): N split (tensor parallel), K split (reduction), both.
SPLITS = [(P(None, "model"), P("data", None)), (P("model", None), P("data", "model")),
          (P("data", "model"), P(None, "data"))]


def _weight(rng, shape=(256, 512)):
    return jnp.asarray((rng.standard_normal(shape) * 0.05).astype(np.float32))


def _u8_gathers(text):
    return [ln for ln in hlo_collectives(text) if "u8[" in ln.split("=")[1].split("all-gather")[0]]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_shard_params_places_exact_slices(rng, double_quant, transposed):
    mesh = make_mesh()
    q = qjax.quantize(_weight(rng), "nf4", blocksize=64, double_quant=double_quant, transposed=transposed)
    qs = qjax.shard_params({"w": q}, mesh, {"w": P("data", "model")})["w"]
    assert qs.shape == q.shape and qs.transposed == transposed
    packed = np.asarray(q.packed)
    for shard in qs.packed.addressable_shards:  # each device: its slice only, equal to the full codes' slice
        assert shard.data.size == packed.size // 8
        np.testing.assert_array_equal(np.asarray(shard.data), packed[shard.index])
    for shard in qs.absmax.addressable_shards:
        assert shard.data.size == q.absmax.size // 8
    if double_quant:
        assert qs.nested_absmax.sharding.is_fully_replicated and qs.offset.sharding.is_fully_replicated
    np.testing.assert_array_equal(qjax.dequantize(qs), qjax.dequantize(q))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("spec,x_spec", SPLITS)
def test_qmatmul_auto_mesh_no_gather_of_codes(rng, double_quant, spec, x_spec):
    mesh = make_mesh()
    q = qjax.quantize(_weight(rng), "nf4", blocksize=64, double_quant=double_quant)
    x = jnp.asarray(rng.standard_normal((8, 256)).astype(np.float32))
    qs = qjax.shard_params({"w": q}, mesh, {"w": spec})["w"]
    xs = jax.device_put(x, NamedSharding(mesh, x_spec))
    f = jax.jit(qjax.qmatmul)
    text = f.lower(xs, qs).compile().as_text()
    assert not _u8_gathers(text), _u8_gathers(text)
    np.testing.assert_allclose(f(xs, qs), qjax.qmatmul(x, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("spec,x_spec", SPLITS)
def test_qmatmul_sharded_is_exact_and_gathers_nothing(rng, explicit, double_quant, spec, x_spec):
    mesh = make_mesh(explicit=explicit)
    q = qjax.quantize(_weight(rng), "nf4", blocksize=64, double_quant=double_quant, transposed=True)
    qs = qjax.shard_params({"w": q}, mesh, {"w": spec})["w"]
    eye = jax.device_put(jnp.eye(256, dtype=jnp.float32), NamedSharding(mesh, x_spec))
    f = jax.jit(lambda x, w: qjax.qmatmul_sharded(x, w, mesh, spec, x_spec=x_spec))
    text = f.lower(eye, qs).compile().as_text()
    assert not hlo_collectives(text), hlo_collectives(text)[:3]  # a split K is reduced with an all-reduce
    # x = I reads the weight back: every shard decoded its own codes and absmax exactly
    np.testing.assert_array_equal(np.asarray(f(eye, qs)), np.asarray(qjax.dequantize(q)))


def test_chunk_loop_runs_per_shard_not_under_gspmd(rng, monkeypatch):
    """With a budget of a few rows: the loop runs inside qmatmul_sharded (local shards) with no
    collective, while plain jit over the mesh decodes the sharded weight in one step."""
    from qjax._src.core import blockwise_matmul as qmatmul_module

    monkeypatch.setattr(qmatmul_module, "CPU_CHUNK_BYTES", 4 * 512 * 4)
    mesh = make_mesh()
    spec, x_spec = SPLITS[0]
    q = qjax.quantize(_weight(rng), "nf4", blocksize=64, double_quant=True)
    x = jnp.asarray(rng.standard_normal((8, 256)).astype(np.float32))
    qs = qjax.shard_params({"w": q}, mesh, {"w": spec})["w"]
    xs = jax.device_put(x, NamedSharding(mesh, x_spec))
    sharded = jax.jit(lambda x, w: qjax.qmatmul_sharded(x, w, mesh, spec, x_spec=x_spec))
    text = sharded.lower(xs, qs).compile().as_text()
    assert " while(" in text and not hlo_collectives(text)
    gspmd = jax.jit(qjax.qmatmul)
    assert " while(" not in gspmd.lower(xs, qs).compile().as_text()
    ref = qjax.qmatmul(x, q)  # unsharded
    for y in (sharded(xs, qs), gspmd(xs, qs)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_qmatmul_sharded_rejects_mismatched_x_spec(rng):
    mesh = make_mesh()
    q = qjax.quantize(_weight(rng), "nf4", blocksize=64)
    with pytest.raises(ValueError, match="must match"):
        qjax.qmatmul_sharded(jnp.ones((8, 256)), q, mesh, P("model", None), x_spec=P("data", None))


def test_quantize_params_sharded_never_holds_a_dense_weight(rng):
    mesh = make_mesh()
    dense = {"mlp": {"kernel": _weight(rng, (512, 1024))}, "bias": jnp.zeros((1024,))}
    spec = {"mlp": {"kernel": P("data", "model")}, "bias": P("model")}
    config = qjax.QuantConfig(double_quant=True)
    sharded_dense = qjax.shard_params(dense, mesh, spec)
    out = qjax.quantize_params_sharded(sharded_dense, mesh, spec, config)
    ref = qjax.quantize_params(dense, config)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert out["mlp"]["kernel"].packed.sharding.spec == P("data", "model")

    # compile the same computation and read what one device holds
    fn = jax.jit(lambda p: qjax.quantize_params(p, config),
                 out_shardings=qjax.params_sharding(jax.eval_shape(lambda p: qjax.quantize_params(p, config), dense),
                                                    mesh, spec))
    compiled = fn.lower(sharded_dense).compile()
    mem = compiled.memory_analysis()
    dense_bytes = 512 * 1024 * 4
    per_device = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    assert per_device < dense_bytes / 4, (per_device, dense_bytes)  # 1/8 slice + codes + absmax work
    gathered = [ln for ln in hlo_collectives(compiled.as_text()) if "[512,1024]" in ln or "[524288]" in ln]
    assert not gathered, gathered


def test_orbax_restores_onto_a_smaller_mesh(rng, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    mesh8 = make_mesh()
    mesh4 = make_mesh((2, 2), devices=jax.devices()[4:])
    params = {"layer": {"kernel": qjax.quantize(_weight(rng), "nf4", blocksize=64, double_quant=True),
                        "bias": jnp.asarray(rng.standard_normal(512).astype(np.float32)),
                        "lora_a": jnp.asarray(rng.standard_normal((256, 4)).astype(np.float32)),
                        "lora_b": jnp.zeros((4, 512), jnp.float32)}}
    spec = {"layer": {"kernel": P("data", "model"), "bias": P("model"), "lora_a": None, "lora_b": None}}
    sharded = qjax.shard_params(params, mesh8, spec)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", sharded)
    ckpt.wait_until_finished()
    target_sh = qjax.params_sharding(params, mesh4, spec)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, target_sh)
    restored = ckpt.restore(tmp_path / "ckpt", target)
    assert isinstance(restored["layer"]["kernel"], qjax.QuantizedArray)
    assert restored["layer"]["kernel"].packed.sharding == target_sh["layer"]["kernel"].packed
    assert len(restored["layer"]["kernel"].packed.sharding.device_set) == 4
    assert restored["layer"]["lora_a"].sharding.spec == P("data")  # derived from the kernel's `in`
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fsdp_constraint_gathers_codes_not_dense_weights(rng):
    mesh = make_mesh()
    q = qjax.quantize(_weight(rng, (512, 1024)), "nf4", blocksize=64, double_quant=True)
    qs = qjax.shard_params({"w": q}, mesh, {"w": P("data", "model")})["w"]  # stored FSDP x TP
    x = jnp.asarray(rng.standard_normal((16, 512)).astype(np.float32))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))

    def f(x, w):  # compute layout: gathered over data, still split over model
        return qjax.qmatmul(x, qjax.with_sharding_constraint(w, mesh, P(None, "model")))

    text = jax.jit(f).lower(xs, qs).compile().as_text()
    results = [ln.split("=", 1)[1].split("all-gather")[0] for ln in hlo_collectives(text)]
    assert any("u8[" in r for r in results), results  # the FSDP gather moves 4-bit codes ...
    assert not [r for r in results if "f32[512" in r or "bf16[512" in r], results  # ... never dense weights
    np.testing.assert_allclose(jax.jit(f)(xs, qs), qjax.qmatmul(x, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_qmatmul_sharded_reads_explicit_shardings_from_types(rng, transposed):
    mesh = make_mesh(explicit=True)
    q = qjax.quantize(_weight(rng), "nf4", blocksize=64, double_quant=True, transposed=transposed)
    qs = qjax.shard_params({"w": q}, mesh, {"w": P("model", "data")})["w"]
    x = jnp.asarray(rng.standard_normal((8, 256)).astype(np.float32))
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "model")))
    y = jax.jit(qjax.qmatmul_sharded)(xs, qs)  # mesh, spec and x_spec from the arrays' types
    assert y.sharding.spec == P(None, "data")
    np.testing.assert_allclose(y, qjax.qmatmul(x, q), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs mesh= and spec="):
        qjax.qmatmul_sharded(x, q)


def test_qjax_checkpoint_restores_onto_a_smaller_mesh(rng, tmp_path):
    mesh8, mesh4 = make_mesh(), make_mesh((2, 2), devices=jax.devices()[:4])
    params = {"attn": {"kernel": qjax.quantize(_weight(rng), "nf4", blocksize=64, double_quant=True,
                                               transposed=True)}}
    spec = {"attn": {"kernel": P("model", "data")}}
    qjax.checkpoint.save(tmp_path / "q", qjax.shard_params(params, mesh8, spec))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, qjax.params_sharding(params, mesh4, spec))
    restored = qjax.checkpoint.restore(tmp_path / "q", target)
    k = restored["attn"]["kernel"]
    assert k.transposed and k.packed.sharding.spec == P("data", "model")  # storage (out, in) of P(model, data)
    assert len(k.packed.sharding.device_set) == 4
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(k)), np.asarray(qjax.dequantize(params["attn"]["kernel"])))


@pytest.mark.parametrize("shape,fmt,blocksize,double_quant,transposed,spec", [
    ((96, 100), "nf4", 64, True, False, P("data", None)),        # flat storage: whole rows of whole blocks
    ((100, 96), "fp4", 64, True, True, P(None, "data")),         # flat, transposed: storage (96, 100)
    ((256, 512), "int8", None, False, True, P("data", "model")),  # per-channel absmax follows `out`
    ((256, 512), "int8", 64, True, True, P("model", "data")),
    ((256, 512), "nf3", 64, True, True, P("model", "data")),      # 8 codes in 3 bytes: shards of whole blocks
    ((96, 100), "nf2", 32, False, False, P("data", None)),
])
def test_qmatmul_sharded_other_layouts_exact(rng, shape, fmt, blocksize, double_quant, transposed, spec):
    mesh = make_mesh()
    q = qjax.quantize(_weight(rng, shape), fmt, blocksize=blocksize, double_quant=double_quant,
                      transposed=transposed)
    qs = qjax.shard_params({"w": q}, mesh, {"w": spec})["w"]
    x_spec = P(None, spec[0])
    eye = jax.device_put(jnp.eye(shape[0], dtype=jnp.float32), NamedSharding(mesh, x_spec))
    y = jax.jit(lambda x, w: qjax.qmatmul_sharded(x, w, mesh, spec, x_spec=x_spec))(eye, qs)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(qjax.dequantize(q)))
