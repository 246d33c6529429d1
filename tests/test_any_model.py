"""Any-model conversion on model code nobody here wrote: tunix's NNX Llama3, Qwen3 and Qwen3-MoE (tests/peers.py).

Their attention projections and head are tunix's own `Einsum` modules (a param `w` fed to `jnp.einsum`,
Qwen3 casting it with `jnp.astype` first), their MLPs nnx.Linear, and Qwen3-MoE's experts raw
`(E, D, F)` params read one expert at a time (`gate_proj.value[i]`). `qjax.nnx.convert(..., inputs=)`
must give every one of them a quantized base and adapters, or say which it left alone.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peers
import qjax
from qjax.nnx import BaseParam, LoRAParam

BUILDERS = {"llama3": peers.tiny_llama3, "qwen3": peers.tiny_qwen3, "qwen3_moe": peers.tiny_qwen3_moe}
PEFT_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
F32 = qjax.QuantConfig(compute_dtype=jnp.float32)  # float32 base matmuls: comparisons at float32 rounding


def _projections(name: str) -> set[str]:
    """The paths of every projection of the tiny model (2 layers): attention, MLP or experts (+ router)."""
    out = set()
    for i in range(2):
        out |= {f"layers/{i}/attn/{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        out |= {f"layers/{i}/mlp/{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        if name == "qwen3_moe":
            out.add(f"layers/{i}/mlp/router")
    return out


def _paths(model, kind) -> dict[str, object]:
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, kind))}


def _convert(peer, lora_config, quant_config=F32, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", qjax.ConversionWarning)
        qjax.nnx.convert(peer.model, lora_config, quant_config, nnx.Rngs(1), inputs=peer.forward, **kw)
    return [str(w.message) for w in caught if issubclass(w.category, qjax.ConversionWarning)]


def _randomize_b(model, seed: int) -> None:
    """Draws every lora_b (zero at init) so the adapters' delta is exercised."""
    state = nnx.state(model, LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), 256))
    nnx.update(model, jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.05 if "lora_b" in str(p[-2:]) else x, state))


class Converted:
    """A tiny peer converted once ("all-linear", r=4, NF4 with float32 base matmuls) and what convert said;
    tests work on `clone()`s."""

    def __init__(self, name):
        self.peer = BUILDERS[name](3)
        attn = self.peer.model.layers[0].attn
        self.attrs = {a: getattr(attn, a) for a in ("num_heads", "num_kv_heads", "head_dim") if hasattr(type(attn), a)}
        self.original = self.peer.forward(nnx.clone(self.peer.model))
        self.messages = _convert(self.peer, qjax.LoraConfig(r=4))

    def clone(self):
        return nnx.clone(self.peer.model)


@pytest.fixture(scope="module")
def converted():
    cache = {}
    return lambda name: cache.setdefault(name, Converted(name))


def _check_projections(model, want):
    adapted = {p.removesuffix("/lora_a").removesuffix("_lora") for p in _paths(model, LoRAParam)
               if p.endswith("/lora_a")}
    assert adapted == want
    bases = _paths(model, BaseParam)
    assert all(qjax.is_quantized(v.get_value()) for v in bases.values())
    assert want <= {p.rsplit("/", 1)[0] if p.endswith(("/w", "/kernel")) else p for p in bases}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_projection_gets_a_quantized_base_and_adapters(name, converted):
    c = converted(name)
    model = c.clone()
    _check_projections(model, _projections(name))
    # the head is left alone ("all-linear" skips it, QuantConfig's default skip has *lm_head*) and said so
    assert len(c.messages) == 1 and "lm_head/w (64, 256) float32" in c.messages[0]
    # the model's own code that reads its layers' attributes still runs and gives what it gave
    attn = model.layers[0].attn
    assert {a: getattr(attn, a) for a in c.attrs} == c.attrs
    assert type(attn.q_proj).__name__ == "Einsum" and attn.q_proj.shape == tuple(attn.q_proj.shape)
    assert jnp.all(jnp.isfinite(c.peer.forward(model)))


def test_peft_names_select_the_same_projections():
    peer = peers.tiny_qwen3_moe(0)  # attention Einsums, per-expert params and an nnx.Linear router
    _convert(peer, qjax.LoraConfig(r=4, target_modules=PEFT_NAMES))
    _check_projections(peer.model, _projections("qwen3_moe") - {"layers/0/mlp/router", "layers/1/mlp/router"})


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_converted_model_equals_the_original_on_dequantized_weights(name, converted):
    c = converted(name)
    model, forward = c.clone(), c.peer.forward
    y = forward(model)
    dense = qjax.nnx.merge(nnx.clone(model))  # the original classes, each converted weight its dequantized value
    assert not _paths(dense, BaseParam) and not _paths(dense, LoRAParam)
    ref = forward(dense)
    # float32 throughout: only the summation order of the matmuls differs
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    assert float(jnp.max(jnp.abs(y - c.original))) > 1e-4  # and that is the quantized model, not the original
    # with non-zero adapters the merged model (base + scaling * A @ B) still gives the same logits
    _randomize_b(model, 4)
    y = forward(model)
    ref = forward(qjax.nnx.merge(nnx.clone(model)))
    assert float(jnp.max(jnp.abs(y - forward(dense)))) > 1e-3  # the delta is there
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))


def _next_token_loss(peer):
    tokens = peer.tokens

    def loss(model):
        logits = peer.forward(model)[:, :-1]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))
    return loss


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_adapters_only_training_lowers_the_loss(name, converted):
    c = converted(name)
    model, loss_fn = c.clone(), _next_token_loss(c.peer)
    frozen = {k: v.get_value() for k, v in _paths(model, BaseParam).items()}
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=LoRAParam)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(8)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
    for k, v in _paths(model, BaseParam).items():  # the codes never move
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(v.get_value()),
                                                        jax.tree_util.tree_leaves(frozen[k])))


def test_save_restore_round_trip(tmp_path, converted):
    c = converted("qwen3")
    model, forward = c.clone(), c.peer.forward
    _randomize_b(model, 8)
    y = forward(model)
    path = os.path.join(tmp_path, "ckpt")
    qjax.checkpoint.save(path, nnx.state(model))
    other = c.clone()  # same structure, other adapters
    _randomize_b(other, 9)
    assert float(jnp.max(jnp.abs(forward(other) - y))) > 1e-3
    nnx.update(other, qjax.checkpoint.restore(path, nnx.state(other)))
    np.testing.assert_array_equal(forward(other), y)
    # adapters alone: save_adapters / load_adapters by path
    qjax.checkpoint.save_adapters(os.path.join(tmp_path, "adapters"), model, qjax.LoraConfig(r=4))
    third = c.clone()
    qjax.checkpoint.load_adapters(os.path.join(tmp_path, "adapters"), third, qjax.LoraConfig(r=4))
    np.testing.assert_array_equal(forward(third), y)


def test_peft_export_round_trip_through_a_name_map(tmp_path, converted):
    c = converted("llama3")
    model, forward, lora = c.clone(), c.peer.forward, qjax.LoraConfig(r=4)
    _randomize_b(model, 12)
    y = forward(model)
    names = qjax.interop.NameMap(to_torch_rules=((r"^layers/", "model/layers/"), (r"/attn/", "/self_attn/")),
                                 to_flax_rules=((r"^model/layers/", "layers/"), (r"/self_attn/", "/attn/")))
    written = qjax.interop.save_peft_adapter(tmp_path, model, lora, name_map=names)
    tensors = qjax.interop.load_safetensors(os.path.join(tmp_path, "adapter_model.safetensors"))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    o = "base_model.model.model.layers.0.self_attn.o_proj"
    # Hugging Face's q_proj is (heads * head_dim, d_model), o_proj (d_model, heads * head_dim)
    assert tensors[f"{q}.lora_A.weight"].shape == (4, 64) and tensors[f"{q}.lora_B.weight"].shape == (64, 4)
    assert tensors[f"{o}.lora_A.weight"].shape == (4, 64) and tensors[f"{o}.lora_B.weight"].shape == (64, 4)
    assert len(written) == 14
    fresh = c.clone()
    qjax.interop.load_peft_adapter(tmp_path, fresh, lora, name_map=names)
    np.testing.assert_array_equal(forward(fresh), y)


def test_loftq_init_starts_closer_to_the_original_model(converted):
    c = converted("llama3")  # default (gaussian A, zero B) init
    gaussian = float(jnp.mean(jnp.abs(c.peer.forward(c.clone()) - c.original)))
    peer = peers.tiny_llama3(3)
    _convert(peer, qjax.LoraConfig(r=8, init="loftq"))
    loftq = float(jnp.mean(jnp.abs(peer.forward(peer.model) - c.original)))
    assert loftq < 0.8 * gaussian, (loftq, gaussian)


def test_without_inputs_the_einsum_projections_are_listed_not_skipped_silently():
    peer = peers.tiny_llama3(0)
    with pytest.warns(qjax.ConversionWarning) as caught:
        qjax.nnx.convert(peer.model, qjax.LoraConfig(r=4), F32, nnx.Rngs(1))
    text = "\n".join(str(w.message) for w in caught if issubclass(w.category, qjax.ConversionWarning))
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"layers/0/attn/{p}/w" in text
    assert "pass inputs=" in text
    peer = peers.tiny_llama3(0)
    with pytest.raises(ValueError, match=r"layers/0/attn/q_proj/w \(64, 4, 16\) float32: not traced"):
        qjax.nnx.convert(peer.model, qjax.LoraConfig(r=4), F32, nnx.Rngs(1), strict=True)


def test_strict_names_the_head_and_a_conversion_without_leftovers_passes():
    peer = peers.tiny_llama3(0)
    with pytest.raises(ValueError, match=r"lm_head/w \(64, 256\) float32: an output head"):
        _convert(peer, qjax.LoraConfig(r=4), strict=True)
    peer = peers.tiny_llama3(0)  # excluding it by name says it stays dense on purpose
    assert _convert(peer, qjax.LoraConfig(r=4, exclude=("lm_head",)), strict=True) == []
    assert not qjax.is_quantized(peer.model.lm_head.w.get_value())
    peer = peers.tiny_llama3(0)
    messages = _convert(peer, qjax.LoraConfig(r=4, target_modules=PEFT_NAMES + ["lm_head"]),
                        qjax.QuantConfig(compute_dtype=jnp.float32, skip=()), strict=True)
    assert messages == []
    assert qjax.is_quantized(peer.model.lm_head.w.get_value()) and peer.model.lm_head.lora_a is not None


def test_already_converted_model_is_refused(converted):
    model = converted("qwen3").clone()
    with pytest.raises(ValueError, match="already a qjax QLoRA layer"):
        qjax.nnx.convert(model, qjax.LoraConfig(r=4), F32, nnx.Rngs(1), inputs=converted("qwen3").peer.forward)
