"""NF2 / NF3: codebook construction, bit-stream packing, quantize/dequantize/qmatmul/pytrees."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from helpers import random_weights
from qjax._src.core import formats
from qjax._src.core.codes import pack_codes, unpack_codes
from qjax._src.core.family import check_leaves
from qjax._src.core.qarray import leaf_shapes

LOWBIT = ["nf2", "nf3"]


def _normal_map(bits, offset=0.9677083):
    """bitsandbytes' `create_normal_map` generalised to `bits` (LoftQ's NFQuantizer), in torch."""
    torch = pytest.importorskip("torch")
    norm = pytest.importorskip("scipy.stats").norm
    half = 2 ** bits // 2
    pos = norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1]).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, half)[:-1])).tolist()
    v = torch.Tensor(pos + [0] + neg).sort().values
    return (v / v.max()).numpy()


@pytest.mark.parametrize("bits,code", [(2, formats.NF2_CODE), (3, formats.NF3_CODE), (4, formats.NF4_CODE)])
def test_codebooks_follow_the_nf4_construction(bits, code):
    # The same function rebuilds bitsandbytes' NF4 exactly, so NF2/NF3 are "built the way NF4 is".
    np.testing.assert_array_equal(_normal_map(bits), code)
    assert code.dtype == np.float32 and code.size == 2 ** bits and code[0] == -1 and code[-1] == 1
    assert 0.0 in code and np.all(np.diff(code) > 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 3, 8, 13, 64, 100])
def test_pack_codes_round_trip(rng, bits, n):
    idx = rng.integers(0, 2 ** bits, size=(3, n)).astype(np.uint8)
    packed = pack_codes(jnp.asarray(idx), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, math.ceil(n * bits / 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, n), idx)


def test_pack_codes_bit_order():
    # big-endian bit stream: the first code sits in the highest bits of byte 0
    assert pack_codes(jnp.array([1, 2, 3, 0], jnp.uint8), 2).tolist() == [0b01_10_11_00]
    assert pack_codes(jnp.array([1, 2, 3, 4, 5, 6, 7, 0], jnp.uint8), 3).tolist() == [
        0b00101001, 0b11001011, 0b10111000]
    assert pack_codes(jnp.array([15, 0, 7, 7], jnp.uint8), 4).tolist() == [0xF0, 0x77]


def _reference(x, fmt, blocksize):
    """numpy: bitsandbytes' 4-bit rules with the nf2/nf3 codebook -> (codes (n,), dequantized)."""
    cb = formats.get_format(fmt).codebook
    flat = np.asarray(x, np.float32).reshape(-1)
    n = flat.size
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    am = np.abs(blocks).max(1)
    inv = np.where(am > 0, np.float32(1) / np.where(am > 0, am, 1), 0).astype(np.float32)
    v = [np.clip(blocks * inv[:, None], -1, 1).reshape(-1)]
    ams = [am]
    if n % blocksize:
        tail = flat[full:]
        t = np.abs(tail).max()
        v.append(np.clip(tail / (t if t > 0 else np.float32(1)), -1, 1).astype(np.float32))
        ams.append(np.array([t if t > 0 else np.float32(1e-38)], np.float32))
    v, am = np.concatenate(v), np.concatenate(ams)
    idx = np.searchsorted(cb.bounds, v, side="left")  # #(bounds < v): ties go to the lower code
    deq = cb.code[idx] * np.repeat(am, blocksize)[:n]
    return idx.astype(np.uint8), deq.astype(np.float32).reshape(np.shape(x))


@pytest.mark.parametrize("fmt", LOWBIT)
@pytest.mark.parametrize("shape", [(64, 128), (33, 17), (7,), (3, 5, 64)])
@pytest.mark.parametrize("jit", [False, True])
def test_quantize_matches_reference(rng, fmt, shape, jit):
    blocksize = int(rng.choice([32, 64]))
    x = random_weights(rng, shape, "float32", dist=str(rng.choice(["normal", "heavy"])))
    fn = jax.jit(qjax.quantize, static_argnums=1, static_argnames=("blocksize",)) if jit else qjax.quantize
    q = fn(jnp.asarray(x), fmt, blocksize=blocksize)
    check_leaves(q)
    bits = formats.get_format(fmt).bits
    idx, deq = _reference(x, fmt, blocksize)
    n = x.size
    ours = unpack_codes(jnp.asarray(q.packed).reshape(-1) if not q.structured else q.packed, bits,
                        q.storage_shape[-1] if q.structured else n)
    np.testing.assert_array_equal(np.asarray(ours).reshape(-1), idx)
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)), deq)


@pytest.mark.parametrize("fmt,bits", [("nf2", 2), ("nf3", 3)])
def test_structured_layout_and_honest_bits(fmt, bits):
    shape = (256, 512)
    q = jax.eval_shape(lambda x: qjax.quantize(x, fmt, blocksize=64), jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    assert q.structured
    assert q.packed.shape == (256, 512 * bits // 8) and q.absmax.shape == (256, 8)
    assert leaf_shapes(shape, fmt, 64)["packed"] == q.packed.shape
    fp = qjax.memory_footprint({"w": q})
    assert fp.quantized_bits_per_param == pytest.approx(bits + 32 / 64)
    qd = jax.eval_shape(lambda x: qjax.quantize(x, fmt, blocksize=64, double_quant=True),
                        jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    assert qjax.memory_footprint({"w": qd}).quantized_bits_per_param == pytest.approx(
        bits + 8 / 64 + 32 / (64 * 256) + 32 / (256 * 512))  # the last term: the float32 offset


def test_error_falls_with_bits(rng):
    x = random_weights(rng, (128, 256), "float32")
    errs = [float(np.linalg.norm(qjax.dequantize(qjax.quantize(x, f)) - x)) for f in ("nf2", "nf3", "nf4")]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("fmt", LOWBIT)
def test_transposed_double_quant_qmatmul_and_pytree(rng, fmt):
    w = random_weights(rng, (64, 96), "bfloat16")
    q = qjax.quantize(w, fmt, blocksize=32, double_quant=True, transposed=True)
    check_leaves(q)
    dense = qjax.dequantize(q)
    # transposed storage quantizes w.T's rows: the same values as quantizing w.T directly
    np.testing.assert_array_equal(dense, qjax.dequantize(qjax.quantize(w.T, fmt, blocksize=32,
                                                                         double_quant=True)).T)
    x = jnp.asarray(random_weights(rng, (4, 64), "bfloat16"))
    np.testing.assert_array_equal(jax.jit(qjax.qmatmul)(x, q), x @ dense)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    back = jax.tree_util.tree_unflatten(treedef, [np.asarray(leaf) for leaf in leaves])
    np.testing.assert_array_equal(qjax.dequantize(back), dense)
    assert back.format == fmt


def _tree(n_layers=4):
    layer = {"attn": {"kernel": np.zeros((64, 128), np.float32)}, "norm": {"scale": np.ones((64,), np.float32)}}
    tree = {f"layers_{i}": layer for i in range(n_layers)}
    tree["embed_tokens"] = {"embedding": np.zeros((32, 64), np.float32)}
    tree["head"] = {"kernel": np.zeros((64, 64), np.float32)}
    return {"params": tree}


def test_first_blocks_mixed_precision_and_footprint():
    high = qjax.QuantConfig(format="nf4", double_quant=False)
    low = qjax.QuantConfig(format="nf2", double_quant=False)
    rules = qjax.first_blocks(2, high, low)
    assert rules.config_for("params/layers_1/attn/kernel") is high
    assert rules.config_for("model/layers/0/mlp/kernel") is high  # NNX / Llama spelling
    assert rules.config_for("params/layers_10/attn/kernel") is low
    assert rules.config_for("params/embed_tokens/embedding") is None  # low's DEFAULT_SKIP still applies
    q = qjax.quantize_params(_tree(), rules)["params"]
    assert [q[f"layers_{i}"]["attn"]["kernel"].format for i in range(4)] == ["nf4", "nf4", "nf2", "nf2"]
    assert q["head"]["kernel"].format == "nf2" and not qjax.is_quantized(q["embed_tokens"]["embedding"])
    fp = qjax.memory_footprint({"params": q})
    # 4 kernels of 64x128 (two at 4.5 bits, two at 2.5) and the 64x64 head at 2.5 bits
    n = 64 * 128
    assert fp.bits_by_format() == pytest.approx({"nf2": 2.5, "nf4": 4.5})
    assert fp.quantized_bits_per_param == pytest.approx((2 * n * 4.5 + (2 * n + 64 * 64) * 2.5) / (4 * n + 64 * 64))
    assert "by format" in str(fp)


def test_quant_rules_order_and_dense():
    rules = qjax.QuantRules(((("*attn*",), None), ("*layers_0*", qjax.QuantConfig(format="nf3"))),
                            default=qjax.QuantConfig(format="nf4"))
    assert rules.config_for("params/layers_0/attn/kernel") is None  # first matching rule wins
    assert rules.config_for("params/layers_0/mlp/kernel").format == "nf3"
    assert rules.config_for("params/layers_1/mlp/kernel").format == "nf4"
    with pytest.raises(TypeError, match="QuantConfig"):
        qjax.QuantRules((("*", "nf4"),))
    with pytest.raises(ValueError, match=">= 0"):
        qjax.first_blocks(-1, rules.default, rules.default)
    assert qjax.first_blocks(0, rules.default, qjax.QuantConfig(format="nf2")).config_for("layers_0/k").format == "nf2"
