"""Sharding rules for quantized trees (on abstract meshes), and the 8-device suite in a subprocess."""

import os
import subprocess
import sys
from xml.etree import ElementTree

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import qjax

MESH = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def abstract_q(shape, fmt="nf4", blocksize=64, double_quant=False, transposed=False):
    """A QuantizedArray of ShapeDtypeStructs: the rules read static data only."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda w: qjax.quantize(w, fmt, blocksize=blocksize, double_quant=double_quant,
                                                  transposed=transposed), x)


def specs_of(q_sharding):
    return {k: (None if v is None else v.spec) for k, v in
            (("packed", q_sharding.packed), ("absmax", q_sharding.absmax),
             ("nested_absmax", q_sharding.nested_absmax), ("offset", q_sharding.offset))}


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "nf3", "nf2", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_structured_codes_split_like_the_dense_array(fmt, double_quant):
    q = abstract_q((256, 512), fmt, 64, double_quant)
    s = qjax.quantized_sharding(q, NamedSharding(MESH, P("data", "model")))
    assert isinstance(s, qjax.QuantizedArray) and s.shape == q.shape
    nested = P() if double_quant else None
    assert specs_of(s) == {"packed": P("data", "model"), "absmax": P("data", "model"),
                           "nested_absmax": nested, "offset": nested}


def test_transposed_storage_swaps_the_spec():
    q = abstract_q((256, 512), transposed=True)  # stored (512, 256)
    s = qjax.quantized_sharding(q, NamedSharding(MESH, P("data", "model")))
    assert specs_of(s)["packed"] == P("model", "data")


def test_per_channel_int8_absmax_follows_the_out_axis():
    for transposed in (False, True):
        q = abstract_q((256, 512), "int8", None, transposed=transposed)
        s = specs_of(qjax.quantized_sharding(q, NamedSharding(MESH, P("data", "model"))))
        assert s["absmax"] == P("model")
        assert s["packed"] == (P("model", "data") if transposed else P("data", "model"))


def test_block_straddling_shards_says_which_sizes_work():
    q = abstract_q((256, 128), blocksize=64)  # 128 / 4 shards = 32 elements: half a block
    with pytest.raises(ValueError, match=r"cut a block.*Shard counts that work with blocksize=64: \[1, 2\]"
                                         r".*blocksizes that work with 4 shards: \[32\]"):
        qjax.quantized_sharding(q, NamedSharding(MESH, P(None, "model")))


def test_flat_layout_splits_only_whole_leading_rows():
    q = abstract_q((96, 100), blocksize=64)  # 100 % 64 != 0: flat blocks across rows
    assert not q.structured
    with pytest.raises(ValueError, match="storage is flat.*Blocksizes that keep the structure: none"):
        qjax.quantized_sharding(q, NamedSharding(MESH, P(None, "model")))
    s = qjax.quantized_sharding(q, NamedSharding(MESH, P("data", None)))  # 48 rows x 100 = 75 blocks each
    assert specs_of(s)["packed"] == P("data") and specs_of(s)["absmax"] == P("data")
    with pytest.raises(ValueError, match="Shard counts that work"):
        qjax.quantized_sharding(abstract_q((96, 100), blocksize=128), NamedSharding(MESH, P("model", None)))


def test_bad_specs_name_the_problem():
    q = abstract_q((256, 512))
    other = AbstractMesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match="mesh axis 'model' of .* is not in the mesh"):
        qjax.params_sharding({"w": q}, other, {"w": P("data", "model")})
    with pytest.raises(ValueError, match="3 entries for a rank-2"):
        qjax.params_sharding({"w": q}, MESH, {"w": P("data", "model", None)})
    with pytest.raises(ValueError, match="spec tree does not match"):
        qjax.params_sharding({"w": q, "b": jax.ShapeDtypeStruct((4,), jnp.float32)}, MESH, {"w": P()})


def test_lora_specs_follow_the_kernel_for_any_rank():
    specs = {"dense": {"kernel": P("data", "model"), "lora_a": P("model"), "lora_b": None},
             "stacked": {"kernel": P(None, "data", "model"), "lora_a": None, "lora_b": None}}
    out = qjax.lora_sharding(specs)
    assert out["dense"] == {"kernel": P("data", "model"), "lora_a": P("data"), "lora_b": P(None, "model")}
    assert out["stacked"]["lora_a"] == P(None, "data") and out["stacked"]["lora_b"] == P(None, None, "model")
    # DenseGeneral-style kernel (in, heads, head_dim): A (in, r), B (r, heads, head_dim)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    params = {"attn": {"kernel": sds(64, 8, 16), "lora_a": sds(64, 4), "lora_b": sds(4, 8, 16)}}
    out = qjax.lora_sharding({"attn": {"kernel": P("data", "model"), "lora_a": None, "lora_b": None}}, params)
    assert out["attn"]["lora_a"] == P("data") and out["attn"]["lora_b"] == P(None, "model")
    # (heads, head_dim, out) output projection: A (heads, head_dim, r), B (r, out)
    params = {"o": {"kernel": sds(8, 16, 64), "lora_a": sds(8, 16, 4), "lora_b": sds(4, 64)}}
    out = qjax.lora_sharding({"o": {"kernel": P("model", None, "data"), "lora_a": None, "lora_b": None}}, params)
    assert out["o"]["lora_a"] == P("model") and out["o"]["lora_b"] == P(None, "data")


def test_params_sharding_with_a_callable_over_dense_shapes():
    tree = {"mlp": {"kernel": abstract_q((256, 512), double_quant=True),
                    "bias": jax.ShapeDtypeStruct((512,), jnp.float32),
                    "lora_a": jax.ShapeDtypeStruct((256, 8), jnp.float32),
                    "lora_b": jax.ShapeDtypeStruct((8, 512), jnp.float32)},
            "norm": {"scale": jax.ShapeDtypeStruct((512,), jnp.float32)}}
    seen = []

    def rule(path, leaf):
        seen.append((path, qjax.is_quantized(leaf), tuple(leaf.shape)))
        return P("data", "model") if path.endswith("kernel") else (P("model") if path == "mlp/bias" else None)

    sh = qjax.params_sharding(tree, MESH, rule)
    assert ("mlp/kernel", True, (256, 512)) in seen  # the callable sees the logical dense shape
    assert sh["mlp"]["kernel"].packed.spec == P("data", "model")
    assert sh["mlp"]["kernel"].nested_absmax.spec == P()
    assert sh["mlp"]["bias"].spec == P("model") and sh["norm"]["scale"].spec == P()
    assert sh["mlp"]["lora_a"].spec == P("data") and sh["mlp"]["lora_b"].spec == P(None, "model")


def test_multidevice_suite(tmp_path):
    """tests/multidevice/ on 8 simulated CPU devices, in a fresh interpreter (the flag must precede jax)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    report = tmp_path / "multidevice.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           os.path.join(root, "tests", "multidevice")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts


def test_flax_logical_axis_names_map_to_quantized_specs():
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(512, kernel_init=init, name="up")(x)

    boxed = jax.eval_shape(Block().init, jax.random.key(0), jnp.ones((2, 256)))
    rules = (("embed", "data"), ("mlp", "model"))
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)["params"]
    dense = nn.meta.unbox(boxed)["params"]
    quantized = jax.eval_shape(lambda p: qjax.quantize_params(p, qjax.QuantConfig()), dense)
    sh = qjax.params_sharding(quantized, MESH, specs)
    assert sh["up"]["kernel"].packed.spec == P("data", "model")
    assert sh["up"]["bias"].spec == P()


def test_split_rank_spreads_adapters_over_both_axes():
    specs = {"kernel": P("data", "model"), "lora_a": None, "lora_b": None}
    out = qjax.lora_sharding(specs, split_rank=True)
    assert out["lora_a"] == P("data", "model") and out["lora_b"] == P("data", "model")
    stacked = qjax.lora_sharding({"kernel": P(None, ("data", "model"), None), "lora_a": None, "lora_b": None},
                                 split_rank=True)
    assert stacked["lora_a"] == P(None, ("data", "model")) and stacked["lora_b"] == P(None, ("data", "model"))
    tree = {"kernel": abstract_q((256, 512)), "lora_a": jax.ShapeDtypeStruct((256, 8), jnp.float32),
            "lora_b": jax.ShapeDtypeStruct((8, 512), jnp.float32)}
    sh = qjax.params_sharding(tree, MESH, lambda path, leaf: P("data", "model") if path == "kernel" else None,
                              lora="split_rank")
    assert sh["lora_a"].spec == P("data", "model") and sh["lora_b"].spec == P("data", "model")


def test_stacked_layers_from_vmap_take_a_spec_over_L_in_out():
    w = jax.ShapeDtypeStruct((3, 256, 512), jnp.float32)
    stacked = jax.eval_shape(jax.vmap(lambda x: qjax.quantize(x, "nf4", blocksize=64, double_quant=True)), w)
    assert stacked.shape == (256, 512) and stacked.packed.shape == (3, 256, 256)
    tree = {"kernel": stacked, "lora_a": jax.ShapeDtypeStruct((3, 256, 8), jnp.float32),
            "lora_b": jax.ShapeDtypeStruct((3, 8, 512), jnp.float32)}
    sh = qjax.params_sharding(tree, MESH, {"kernel": P(None, "data", "model"), "lora_a": None, "lora_b": None})
    assert specs_of(sh["kernel"]) == {"packed": P(None, "data", "model"), "absmax": P(None, "data", "model"),
                                      "nested_absmax": P(None), "offset": P(None)}
    assert sh["lora_a"].spec == P(None, "data") and sh["lora_b"].spec == P(None, None, "model")
    big = jax.eval_shape(jax.vmap(lambda x: qjax.quantize(x, "nf4", blocksize=128)), w)
    with pytest.raises(ValueError, match="cut a block"):  # 512 / 8 shards = 64 < blocksize 128
        qjax.params_sharding({"kernel": big}, MESH, {"kernel": P(None, None, ("data", "model"))})


def test_lora_of_a_flattened_dense_general_kernel():
    # qjax.linen stores a DenseGeneral kernel (in, heads, head_dim) as a 2-D QuantizedArray (in, heads * head_dim)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    tree = {"attn": {"kernel": abstract_q((256, 8 * 64)), "lora_a": sds(256, 4), "lora_b": sds(4, 8, 64)}}
    sh = qjax.params_sharding(tree, MESH, {"attn": {"kernel": P("data", "model"), "lora_a": None, "lora_b": None}})
    assert sh["attn"]["lora_a"].spec == P("data") and sh["attn"]["lora_b"].spec == P(None, "model")
    # scanned o_proj: kernel (L, heads * head_dim, d) stacked, lora_a (L, heads, head_dim, r), lora_b (L, r, d)
    stacked = jax.eval_shape(jax.vmap(lambda x: qjax.quantize(x, "nf4")), sds(3, 8 * 64, 256))
    tree = {"o": {"kernel": stacked, "lora_a": sds(3, 8, 64, 4), "lora_b": sds(3, 4, 256)}}
    sh = qjax.params_sharding(tree, MESH, {"o": {"kernel": P(None, "model", "data"), "lora_a": None, "lora_b": None}})
    assert sh["o"]["kernel"].packed.spec == P(None, "model", "data")
    assert sh["o"]["lora_a"].spec == P(None, "model") and sh["o"]["lora_b"].spec == P(None, None, "data")


def test_nnx_state_through_pure_dicts():
    nnx = pytest.importorskip("flax.nnx")
    qn = pytest.importorskip("qjax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(128, 256, rngs=rngs)

    model = Model(nnx.Rngs(0))
    qn.convert(model, qjax.LoraConfig(r=4), qjax.QuantConfig(), nnx.Rngs(1))
    pure = nnx.to_pure_dict(nnx.state(model))
    assert qjax.is_quantized(pure["up"]["kernel"])
    sh = qjax.params_sharding(pure, MESH, lambda path, leaf: P("data", "model") if path == "up/kernel" else None)
    assert sh["up"]["kernel"].packed.spec == P("data", "model")
    assert sh["up"]["lora_a"].spec == P("data") and sh["up"]["lora_b"].spec == P(None, "model")
