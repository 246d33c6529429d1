"""A Linen LLM written by another library (recurrentgemma's Griffin), QLoRA-converted by qjax.linen.convert.

The model is Google DeepMind's own Flax Linen code, installed from PyPI (see tests/peers.py): nn.Dense
projections plus its own `self.param` layers (an `Einsum` for the gated MLP's up projection, block-diagonal
RG-LRU gates), a depthwise Conv1D, and a tied embedding that is both gathered and matmul'd. Nothing here
is written for qjax; the test checks that convert finds every projection, leaves the rest (saying so),
and that the converted model computes, trains, merges and checkpoints like the original.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
import qjax.linen as ql
from peers import RG_B, RG_T, RG_VOCAB, tiny_recurrentgemma

QUANT = qjax.QuantConfig(compute_dtype=jnp.float32)

# Every param the model reads only through a matmul: rel path -> its own shape.
RECURRENT = {"recurrent_block/linear_x/kernel": (64, 64), "recurrent_block/linear_y/kernel": (64, 64),
             "recurrent_block/linear_out/kernel": (64, 64), "recurrent_block/rg_lru/input_gate/w": (4, 16, 16),
             "recurrent_block/rg_lru/a_gate/w": (4, 16, 16)}
ATTENTION = {"attention_block/proj_q/kernel": (64, 64), "attention_block/proj_k/kernel": (64, 16),
             "attention_block/proj_v/kernel": (64, 16), "attention_block/proj_final/kernel": (64, 64)}
MLP = {"mlp_block/ffw_up/w": (2, 64, 128), "mlp_block/ffw_down/kernel": (128, 64)}
PROJECTIONS = {f"blocks.{i}/{k}": s for i, blocks in enumerate([RECURRENT, ATTENTION])
               for k, s in {**blocks, **MLP}.items()}
PEFT_NAMES = ["proj_q", "proj_k", "proj_v", "proj_final", "linear_x", "linear_y", "linear_out",
              "ffw_up", "ffw_down", "input_gate", "a_gate"]
# The one param that feeds a matmul and stays dense: the tied embedding, gathered by encode, matmul'd by decode.
LEFT_DENSE = "embedder/input_embedding"


@pytest.fixture(autouse=True)
def _allow_rank_promotion():
    """recurrentgemma broadcasts biases (h, j) + (B, T, h, j); conftest makes rank promotion raise."""
    with jax.numpy_rank_promotion("allow"):
        yield


def _convert(peer, lora_config, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm, qv = ql.convert(peer.model, peer.variables, lora_config, QUANT, jax.random.key(1),
                            inputs=peer.inputs, **kw)
    return qm, qv, [w for w in caught if issubclass(w.category, qjax.ConversionWarning)]


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _flat(tree):
    """{'a/b/c': leaf} with QuantizedArrays as leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=qjax.is_quantized)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


@pytest.fixture(scope="module")
def peer():
    return tiny_recurrentgemma(0)


@pytest.fixture(scope="module")
def converted(peer):
    with jax.numpy_rank_promotion("allow"):
        return _convert(peer, qjax.LoraConfig(r=4))


def _adapter_dir(rel):
    """Where a converted param's adapters sit: beside it (each of these modules holds one converted param)."""
    return rel.rsplit("/", 1)[0]


def _check_converted(peer, qv, warned, targets):
    params, original = qv["params"], peer.variables["params"]
    flat = _flat(params)
    quantized = {k for k, v in flat.items() if qjax.is_quantized(v)}
    assert quantized == set(PROJECTIONS), sorted(quantized ^ set(PROJECTIONS))
    for rel in PROJECTIONS:
        adapters = _get(params, _adapter_dir(rel))
        has = "lora_a" in adapters and "lora_b" in adapters
        assert has == (rel.split("/")[-2] in targets), rel
        if has:
            assert adapters["lora_a"].dtype == adapters["lora_b"].dtype == jnp.float32
            assert not jnp.any(adapters["lora_b"])  # standard LoRA init: B = 0
    # Everything else is the original array, untouched.
    for k, v in _flat(original).items():
        if k not in PROJECTIONS:
            assert flat[k] is v or np.array_equal(flat[k], v), k
    extra = set(flat) - set(_flat(original))
    assert all(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for k in extra), extra
    # Never silent: the embedding (also gathered) is named in the ConversionWarning, nothing else.
    assert len(warned) == 1, [str(w.message) for w in warned]
    text = str(warned[0].message)
    assert LEFT_DENSE in text and "also read by indexing" in text, text
    assert text.count("\n  ") == 1, text


def test_all_linear_converts_every_projection(peer, converted):
    _, qv, warned = converted
    _check_converted(peer, qv, warned, PEFT_NAMES)


def test_peft_names_select_the_same_projections(peer, converted):
    """PEFT-style module names select the same projections as "all-linear", and (B = 0, same bases) the two
    converted models compute the same logits. (The peer is Griffin's default build: each residual block is an
    nn.remat, so conversion, the forward pass and training all go through remat.)"""
    qm, qv, warned = _convert(peer, qjax.LoraConfig(r=4, target_modules=PEFT_NAMES))
    _check_converted(peer, qv, warned, PEFT_NAMES)
    np.testing.assert_array_equal(peer.forward(qm, qv), peer.forward(*converted[:2]))


def _dense(base, shape, rel):
    """The converted param's own dense value, rebuilt here from the 2-D QuantizedArray(s) qjax stores.

    Dense kernels: (in, out). ffw_up w (c, d, D) with eqn '...td,cdD->c...tD': contracted axis d in, the
    produced axes (c, D) in output order out, so the base is (d, c*D). Block-diagonal gates w (h, i, j):
    h is a batch axis (in kernel, input and output), so the base is a stack over h of (i, j).
    """
    w = qjax.dequantize(base).astype(jnp.float32)
    if rel.endswith("ffw_up/w"):
        c, d, dd = shape
        return w.reshape(d, c, dd).transpose(1, 0, 2)
    return w.reshape(shape)


def test_init_equals_original_on_dequantized_weights(peer, converted):
    qm, qv, _ = converted
    y = peer.forward(qm, qv)
    assert y.shape == (RG_B, RG_T, RG_VOCAB) and y.dtype == jnp.float32
    mm, mv = ql.merge(qm, qv)
    assert type(mm) is type(peer.model)
    # The original class on the original params with each converted param replaced by dequant(base) (B = 0 at init,
    # so that is its merged value), built here independently of merge.
    manual = jax.tree_util.tree_map(lambda x: x, peer.variables)
    for rel, shape in PROJECTIONS.items():
        dense = _dense(_get(qv["params"], rel), shape, rel)
        np.testing.assert_array_equal(_get(mv["params"], rel), dense, err_msg=rel)
        parent, name = rel.rsplit("/", 1)
        _get(manual["params"], parent)[name] = dense
    # Tolerance: all three evaluate the same float32 weights (dequantized once, exactly) on the same inputs; they
    # differ only in summation order (qmatmul's blocking vs XLA's dot, x@W + (x@A)@B with B = 0) over
    # contractions of <= 256 terms, a few float32 ulps per layer, through 2 blocks and a tanh soft cap of 30 on
    # logits of size ~10: 1e-4 absolute (~1e-5 relative) is far above that noise and far below the
    # quantization error (which is ~0.4 here: see the last assertion).
    np.testing.assert_allclose(y, peer.forward(mm, mv), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(y, peer.forward(peer.model, manual), atol=1e-4, rtol=1e-5)
    assert float(jnp.max(jnp.abs(y - peer.forward(peer.model, peer.variables)))) > 1e-3  # it is quantized


def _loss(qm, inputs, params):
    with jax.numpy_rank_promotion("allow"):
        logits, _ = qm.apply({"params": params}, *inputs)
    tokens = inputs[0]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))


def test_adapters_only_training_lowers_loss_and_merges(peer, converted):
    qm, qv, _ = converted
    tx = qjax.optim.adapters_only(optax.adam(1e-2))
    params = qv["params"]
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(lambda p: _loss(qm, peer.inputs, p), allow_int=True)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(5):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    final = float(jax.jit(lambda p: _loss(qm, peer.inputs, p))(params))
    assert all(b < a for a, b in zip(losses, losses[1:] + [final])), losses + [final]  # ~6.7 -> ~2.5
    assert final < 0.8 * losses[0], losses + [final]
    before, after = _flat(qv["params"]), _flat(params)
    for k, v in before.items():
        same = jax.tree_util.tree_all(jax.tree.map(np.array_equal, v, after[k]))
        assert same == (k.rsplit("/", 1)[-1] not in ("lora_a", "lora_b")), k  # only adapters move
    trained = {"params": params}
    mm, mv = ql.merge(qm, trained)
    # Nonzero adapters now: merged W + s*A@B vs the base matmul plus the adapter path; float32 reassociation only.
    np.testing.assert_allclose(peer.forward(qm, trained), peer.forward(mm, mv), atol=1e-4, rtol=1e-5)


def test_checkpoint_round_trip(peer, converted, tmp_path):
    qm, qv, _ = converted
    lora = qjax.LoraConfig(r=4)
    tree = jax.tree.map(lambda x: x, qv)
    tree["params"]["blocks.1"]["attention_block"]["proj_q"]["lora_b"] = jnp.full((4, 64), 0.01, jnp.float32)
    y = peer.forward(qm, tree)
    qjax.checkpoint.save(str(tmp_path / "full"), tree)
    restored = qjax.checkpoint.restore(str(tmp_path / "full"))
    structure = lambda t: jax.tree.structure(t, is_leaf=qjax.is_quantized)  # noqa: E731
    assert structure(restored) == structure(tree)
    np.testing.assert_array_equal(peer.forward(qm, restored), y)
    qjax.checkpoint.save_adapters(str(tmp_path / "adapters"), tree, lora)
    loaded = qjax.checkpoint.load_adapters(str(tmp_path / "adapters"), qv, lora)
    np.testing.assert_array_equal(peer.forward(qm, loaded), y)


def test_strict_raises_naming_the_dense_embedding(peer):
    """The tied embedding stays dense (gathered as well as matmul'd), so strict=True raises, naming it and why;
    excluding it by name (LoraConfig.exclude) says it stays dense on purpose and strict passes, silently."""
    with pytest.raises(ValueError, match=f"{LEFT_DENSE} \\(256, 64\\) float32: also read by indexing"):
        ql.convert(peer.model, peer.variables, qjax.LoraConfig(r=4), QUANT, jax.random.key(1),
                   inputs=peer.inputs, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ql.convert(peer.model, peer.variables, qjax.LoraConfig(r=4, exclude=("embedder",)), QUANT,
                   jax.random.key(1), inputs=peer.inputs, strict=True)
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not [m for m in said if "embedder" in m or "untouched" in m], said