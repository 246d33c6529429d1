"""Integration: the real QLoRA modules (qjax.linen / qjax.nnx / qjax.optim) through checkpoints and interop.

convert -> train under jit -> save/load adapters, exact resume with the adapters_only state, full
quantized trees through orbax, and a converted Linen Llama exported as a PEFT adapter that
peft.PeftModel loads onto transformers' LlamaForCausalLM with the same logits.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import nnx

import qjax
from helpers import nnx_train_mse
import qjax.linen as ql
import qjax.nnx as qn
from qjax.checkpoint import ResumeManager
from qjax.optim import adapters_only

F32 = qjax.QuantConfig(compute_dtype=jnp.float32)
CFG = qjax.LoraConfig(r=4, alpha=8)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=qjax.is_quantized)[0]


def assert_identical(a, b):
    """Same structure, and every leaf bit-identical (QuantizedArrays: static fields and every child)."""
    la, lb = _leaves(a), _leaves(b)
    pa = [jax.tree_util.keystr(p) for p, _ in la]
    pb = [jax.tree_util.keystr(p) for p, _ in lb]
    assert pa == pb
    for (p, x), (_, y) in zip(la, lb):
        where = jax.tree_util.keystr(p)
        assert qjax.is_quantized(x) == qjax.is_quantized(y), where
        if qjax.is_quantized(x):
            assert (x.format, x.blocksize, x.shape, x.dtype, x.transposed) == \
                (y.format, y.blocksize, y.shape, y.dtype, y.transposed), where
            for cx, cy in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
                assert cx.dtype == cy.dtype and cx.shape == cy.shape, where
                assert np.asarray(cx).tobytes() == np.asarray(cy).tobytes(), where
        else:
            assert np.asarray(x).dtype == np.asarray(y).dtype, where
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), where


# ----------------------------------------------------------------------------- a tiny Linen Llama
# Hugging Face LlamaForCausalLM's math with Linen modules named as its torch modules, so that
# qjax.interop.from_torch_state_dict(hf.state_dict()) gives its variables (LLAMA name map).

VOCAB, D, HEADS, KV_HEADS, FF, LAYERS, THETA, EPS = 64, 32, 4, 2, 64, 2, 10000.0, 1e-6


def _bcast(w, x):
    return jnp.reshape(w, (1,) * (x.ndim - w.ndim) + w.shape)


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS)
        return _bcast(w, y) * y


def _rope(x):  # x (B, T, H, Dh), HF's rotate_half convention
    t, dh = x.shape[1], x.shape[-1]
    inv = 1.0 / THETA ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    f = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
    emb = jnp.concatenate([f, f], axis=-1)[None, :, None, :]
    rot = jnp.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], axis=-1)
    return x * jnp.cos(emb) + rot * jnp.sin(emb)


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        dh = D // HEADS
        # MaxText / Gemma style: DenseGeneral kernels (d_model, heads, head_dim) and (heads, head_dim, d_model)
        q = nn.DenseGeneral((HEADS, dh), use_bias=False, name="q_proj")(x)
        k = nn.DenseGeneral((KV_HEADS, dh), use_bias=False, name="k_proj")(x)
        v = nn.Dense(KV_HEADS * dh, use_bias=False, name="v_proj")(x).reshape(b, t, KV_HEADS, dh)
        q, k = _rope(q), _rope(k)
        k, v = jnp.repeat(k, HEADS // KV_HEADS, axis=2), jnp.repeat(v, HEADS // KV_HEADS, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], s, -jnp.inf)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
        return nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o_proj")(o)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        g = nn.Dense(FF, use_bias=False, name="gate_proj")(x)
        u = nn.Dense(FF, use_bias=False, name="up_proj")(x)
        return nn.Dense(D, use_bias=False, name="down_proj")(jax.nn.silu(g) * u)


class DecoderLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = x + Attention(name="self_attn")(RMSNorm(name="input_layernorm")(x))
        return h + MLP(name="mlp")(RMSNorm(name="post_attention_layernorm")(h))


class Llama(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name="embed_tokens")(tokens)
        for i in range(LAYERS):
            x = DecoderLayer(name=f"layers_{i}")(x)
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(RMSNorm(name="norm")(x))


def _tokens(rng, batch=2, t=8):
    return jnp.asarray(rng.integers(0, VOCAB, (batch, t)), jnp.int32)


def _loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _make_step(qm, tx):
    @jax.jit
    def step(params, opt_state, tokens, key):
        def loss(p):
            return _loss(qm.apply({"params": p}, tokens, rngs={"dropout": key}), tokens)
        value, g = jax.value_and_grad(loss, allow_int=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value
    return step


def _convert(variables, tokens, lora=CFG, seed=1):
    return ql.convert(Llama(), variables, lora, F32, jax.random.key(seed), inputs=(tokens,))


@pytest.fixture
def llama(rng):
    """A random Flax Llama, its variables and a batch of tokens."""
    tokens = _tokens(rng)
    variables = Llama().init(jax.random.key(int(rng.integers(2**31))), tokens)
    variables = jax.tree_util.tree_map(lambda x: x * 4 if x.ndim == 2 else x, variables)  # livelier logits
    return variables, tokens


def _train(qm, qv, tokens, tx, steps, key=jax.random.key(0)):
    params, opt_state = qv["params"], tx.init(qv["params"])
    step = _make_step(qm, tx)
    losses = []
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, tokens, sub)
        losses.append(float(loss))
    return {**qv, "params": params}, opt_state, losses


# ----------------------------------------------------------------------------- Linen


def test_linen_train_save_load_adapters(llama, tmp_path):
    variables, tokens = llama
    qm, qv = _convert(variables, tokens)
    tx = adapters_only(optax.adam(1e-2))
    trained, opt_state, losses = _train(qm, qv, tokens, tx, 8)
    assert losses[-1] < losses[0]
    # the optimizer state holds adapter-sized arrays only
    n_adapter = sum(x.size for p, x in _leaves(trained) if "lora_" in jax.tree_util.keystr(p))
    assert sum(x.size for x in jax.tree_util.tree_leaves(opt_state)) == 2 * n_adapter + 1
    # the frozen base is bit-identical after training
    strip = lambda v: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, x: None if "lora_" in jax.tree_util.keystr(p) else x, v, is_leaf=qjax.is_quantized)
    assert_identical(strip(trained), strip(qv))

    qjax.checkpoint.save_adapters(tmp_path / "adapters", trained, CFG)
    fresh_model, fresh = _convert(variables, tokens, seed=7)  # other random A, B = 0
    assert not np.array_equal(np.asarray(qm.apply(trained, tokens)), np.asarray(fresh_model.apply(fresh, tokens)))
    loaded = qjax.checkpoint.load_adapters(tmp_path / "adapters", fresh, CFG)
    assert_identical(loaded, trained)
    np.testing.assert_array_equal(np.asarray(fresh_model.apply(loaded, tokens)), np.asarray(qm.apply(trained, tokens)))
    assert qjax.checkpoint.read_adapter_config(tmp_path / "adapters") == CFG
    # another rank is named
    _, other = _convert(variables, tokens, lora=qjax.LoraConfig(r=2, alpha=8))
    with pytest.raises(qjax.checkpoint.CheckpointError, match=r"LoRA rank r=4 in the checkpoint, r=2 in the model"):
        qjax.checkpoint.load_adapters(tmp_path / "adapters", other)


def test_linen_exact_resume_with_adapters_only_state(llama, tmp_path):
    variables, tokens = llama
    lora = qjax.LoraConfig(r=4, alpha=8, dropout=0.1)  # the RNG key matters
    batches = [jnp.roll(tokens, i, axis=1) for i in range(7)]
    tx = adapters_only(optax.chain(optax.clip_by_global_norm(1.0),
                                   optax.adamw(optax.linear_schedule(1e-2, 1e-3, 6))))

    def run(until, *, mgr=None, state=None, stop_at=None):
        qm, qv = _convert(variables, tokens, lora=lora)
        step_fn = _make_step(qm, tx)
        if state is None:
            state = (0, qv, tx.init(qv["params"]), jax.random.key(42), 0)
        step, v, opt_state, key, pos = state
        while step < until:
            step += 1
            key, sub = jax.random.split(key)
            params, opt_state, _ = step_fn(v["params"], opt_state, batches[pos % len(batches)], sub)
            v, pos = {**v, "params": params}, pos + 1
            if mgr is not None:
                mgr.save(step, adapters=v, opt_state=opt_state, rng=key, data_position={"batch": pos})
            if step == stop_at:
                break
        return step, v, opt_state, key, pos

    _, want_v, want_opt, want_key, _ = run(6)
    with ResumeManager(tmp_path / "run", save_every=2, keep=2, lora_config=lora) as mgr:
        run(6, mgr=mgr, stop_at=5)  # "killed" after step 5; the last save is step 4
        assert mgr.all_steps() == [2, 4]
    # a new process: convert the base model again, restore onto fresh templates
    with ResumeManager(tmp_path / "run", save_every=2, keep=2, lora_config=lora) as mgr:
        qm, qv = _convert(variables, tokens, lora=lora, seed=99)
        st = mgr.restore(adapters=qv, opt_state=jax.eval_shape(tx.init, qv["params"]))
        assert st.step == 4 and st.data_position == {"batch": 4} and st.lora_config == lora
        _, got_v, got_opt, got_key, _ = run(6, mgr=mgr, state=(st.step, st.adapters, st.opt_state, st.rng,
                                                               st.data_position["batch"]))
    assert_identical(got_v, want_v)
    assert_identical(got_opt, want_opt)
    assert np.array_equal(jax.random.key_data(got_key), jax.random.key_data(want_key))


def test_linen_full_variables_through_orbax(llama, tmp_path):
    variables, tokens = llama
    qm, qv = _convert(variables, tokens)
    qv, _, _ = _train(qm, qv, tokens, adapters_only(optax.adam(1e-2)), 2)
    qjax.checkpoint.save(tmp_path / "full", qv)
    no_target = qjax.checkpoint.restore(tmp_path / "full")
    on_target = qjax.checkpoint.restore(tmp_path / "full", jax.eval_shape(lambda: qv))
    assert_identical(no_target, qv)
    assert_identical(on_target, qv)
    y = np.asarray(qm.apply(qv, tokens))
    np.testing.assert_array_equal(np.asarray(qm.apply(no_target, tokens)), y)
    # plain orbax onto a target, with the metadata for a later target-less restore
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "plain", qv, custom_metadata=qjax.checkpoint.tree_metadata(qv))
    ck.wait_until_finished()
    assert_identical(ck.restore(tmp_path / "plain", jax.eval_shape(lambda: qv)), qv)
    assert_identical(qjax.checkpoint.restore(tmp_path / "plain"), qv)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(16, name="down")(nn.relu(nn.DenseGeneral((2, 8), name="up")(h).reshape(h.shape))), None


class ScanLM(nn.Module):
    @nn.compact
    def __call__(self, x):
        h, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            name="layers")(x, None)
        return h


def test_linen_scanned_adapters_roundtrip(rng, tmp_path):
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    model = ScanLM()
    variables = model.init(jax.random.key(0), x)
    qm, qv = ql.convert(model, variables, CFG, F32, jax.random.key(1), inputs=(x,))
    assert qv["params"]["layers"]["up"]["lora_b"].shape == (3, 4, 2, 8)
    tx = adapters_only(optax.adam(1e-2))
    params, opt_state = qv["params"], tx.init(qv["params"])
    for _ in range(3):
        g = jax.grad(lambda p: jnp.mean((qm.apply({"params": p}, x) - 1.0) ** 2), allow_int=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    trained = {"params": params}
    qjax.checkpoint.save_adapters(tmp_path / "a", trained, CFG)
    _, fresh = ql.convert(model, variables, CFG, F32, jax.random.key(2), inputs=(x,))
    loaded = qjax.checkpoint.load_adapters(tmp_path / "a", fresh, CFG)
    assert_identical(loaded, trained)
    np.testing.assert_array_equal(np.asarray(qm.apply(loaded, x)), np.asarray(qm.apply(trained, x)))
    # and as a PEFT adapter: one module per layer, stacked back on load
    names = qjax.interop.save_peft_adapter(tmp_path / "p", trained, CFG)
    assert names["params/layers_2/up"] == "model.layers.2.up" and len(names) == 3 * 2
    assert_identical(qjax.interop.load_peft_adapter(tmp_path / "p", fresh, CFG), trained)


# ----------------------------------------------------------------------------- PEFT / transformers


def _hf_llama(seed):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=EPS,
                                   rope_theta=THETA, tie_word_embeddings=False, attention_bias=False,
                                   mlp_bias=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


def _from_hf(hf):
    """The Flax Llama's variables from the torch model (q/k/o kernels reshaped to their DenseGeneral form)."""
    variables = qjax.interop.from_torch_state_dict({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    dh = D // HEADS
    for i in range(LAYERS):
        attn = variables["params"][f"layers_{i}"]["self_attn"]
        attn["q_proj"]["kernel"] = attn["q_proj"]["kernel"].reshape(D, HEADS, dh)
        attn["k_proj"]["kernel"] = attn["k_proj"]["kernel"].reshape(D, KV_HEADS, dh)
        attn["o_proj"]["kernel"] = attn["o_proj"]["kernel"].reshape(HEADS, dh, D)
    return variables


def _load_into(hf, state_dict):
    import torch
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in
                                              state_dict.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def _logits(hf, tokens):
    import torch
    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


def test_flax_llama_matches_transformers(rng):
    hf, _ = _hf_llama(int(rng.integers(2**31)))
    variables = _from_hf(hf)
    tokens = _tokens(rng)
    np.testing.assert_allclose(np.asarray(Llama().apply(variables, tokens)), _logits(hf, tokens), rtol=1e-4, atol=1e-4)


def _without_adapters(v):
    return jax.tree_util.tree_map_with_path(lambda p, x: None if "lora_" in jax.tree_util.keystr(p) else x, v,
                                            is_leaf=qjax.is_quantized)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_export_of_converted_llama(rng, tmp_path, use_rslora):
    peft = pytest.importorskip("peft")
    hf, hf_cfg = _hf_llama(int(rng.integers(2**31)))
    variables = _from_hf(hf)
    tokens = _tokens(rng)
    lora = qjax.LoraConfig(r=4, alpha=8, use_rslora=use_rslora)
    qm, qv = _convert(variables, tokens, lora=lora)
    layers = type(qm)._qjax_spec.layers
    assert {s.path for s in layers if s.lora} == {f"layers_{i}/{m}" for i in range(LAYERS) for m in (
        "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
        "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
    # a step size small enough for rsLoRA's larger scaling (alpha / sqrt(r) = 4) to descend steadily
    qv, _, losses = _train(qm, qv, tokens, adapters_only(optax.adam(1e-2)), 6)
    assert losses[-1] < losses[0]
    names = qjax.interop.save_peft_adapter(tmp_path / "peft", qv, lora, task_type="CAUSAL_LM")
    assert names["params/layers_1/mlp/down_proj"] == "model.layers.1.mlp.down_proj"
    q = qv["params"]["layers_0"]["self_attn"]["q_proj"]
    assert q["lora_a"].shape == (D, 4) and q["lora_b"].shape == (4, HEADS, D // HEADS)
    assert q["kernel"].shape == (D, D) and qjax.is_quantized(q["kernel"])

    # the torch base model holds the quantized base (dequantized); PEFT adds the adapters
    base_sd = qjax.interop.merged_state_dict(_without_adapters(qv), lora, dtype=jnp.float32)
    base = _load_into(_hf_llama(0)[0], base_sd)
    base_logits = _logits(base, tokens)
    np.testing.assert_allclose(base_logits, np.asarray(qm.apply(_without_adapters(qv), tokens)),
                               rtol=2e-4, atol=2e-4)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours = np.asarray(qm.apply(qv, tokens))
    np.testing.assert_allclose(_logits(model, tokens), ours, rtol=2e-4, atol=2e-4)
    assert not np.allclose(base_logits, ours, atol=1e-3)  # the adapters do change the output

    # and back: the PEFT files load onto a freshly converted model, bit for bit
    _, fresh = _convert(variables, tokens, lora=lora, seed=5)
    back = qjax.interop.load_peft_adapter(tmp_path / "peft", fresh, lora)
    assert_identical(back, qv)

    # merged export (PEFT's merge_and_unload) loads in transformers with the same logits, and its
    # kernels are qjax.linen.merge's
    qjax.interop.save_merged(tmp_path / "merged", qv, lora, dtype=jnp.float32, hf_config=hf_cfg.to_dict())
    import transformers
    merged_hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_logits(merged_hf, tokens), ours, rtol=2e-4, atol=2e-4)
    _, mv = ql.merge(qm, qv, jnp.float32)
    sd = qjax.interop.merged_state_dict(qv, lora, dtype=jnp.float32)
    for s in layers:
        name = "model." + s.path.replace("layers_", "layers.").replace("/", ".") + ".weight"
        node = mv["params"]
        for k in s.path.split("/"):
            node = node[k]
        kernel = np.asarray(node["kernel"]).reshape(math.prod(s.in_shape), math.prod(s.out_shape))
        assert kernel.T.tobytes() == sd[name].tobytes(), name


# ----------------------------------------------------------------------------- NNX


class NAttn(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(D, D, rngs=rngs)
        self.v_proj = nnx.Linear(D, D, rngs=rngs)
        self.o_proj = nnx.LinearGeneral((2, D // 2), D, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.q_proj(x)) * self.v_proj(x)
        return x + self.o_proj(h.reshape(h.shape[:-1] + (2, D // 2)))


class NLayer(nnx.Module):
    def __init__(self, rngs):
        self.self_attn = NAttn(rngs)

    def __call__(self, x):
        return self.self_attn(x)


class NLM(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([NLayer(rngs) for _ in range(2)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, 8, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _nnx_model(seed=1, lora=CFG):
    return qn.convert(NLM(nnx.Rngs(0)), lora, F32, nnx.Rngs(seed))


def test_nnx_train_save_load_adapters_and_full_state(rng, tmp_path):
    x = jnp.asarray(rng.standard_normal((4, D)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    model = _nnx_model()
    base_before = nnx.state(model, qn.BaseParam)
    losses, opt = nnx_train_mse(model, x, y, 6)
    assert losses[-1] < losses[0]
    assert_identical(nnx.state(model, qn.BaseParam), base_before)
    n_adapter = sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(model, qn.LoRAParam)))
    assert 2 * n_adapter <= sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(opt, nnx.OptState))) <= 2 * n_adapter + 2

    # adapters alone onto a freshly converted model
    qjax.checkpoint.save_adapters(tmp_path / "adapters", model, CFG)
    fresh = _nnx_model(seed=7)
    assert qjax.checkpoint.load_adapters(tmp_path / "adapters", fresh, CFG) is fresh
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))
    assert_identical(nnx.state(fresh, qn.LoRAParam), nnx.state(model, qn.LoRAParam))

    # the whole state (BaseParam holding QuantizedArrays) through qjax.checkpoint and plain orbax
    state = nnx.state(model)
    qjax.checkpoint.save(tmp_path / "full", state)
    abstract = nnx.state(nnx.eval_shape(lambda: _nnx_model(seed=3)))
    restored = qjax.checkpoint.restore(tmp_path / "full", abstract)
    other = _nnx_model(seed=3)
    nnx.update(other, restored)
    assert isinstance(other.layers[0].self_attn.o_proj.kernel, qn.BaseParam)
    assert qjax.is_quantized(other.layers[0].self_attn.o_proj.kernel.get_value())
    assert_identical(nnx.state(other), state)
    np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(model(x)))
    # without a target: the QuantizedArrays come back from the metadata
    raw = qjax.checkpoint.restore(tmp_path / "full")
    k = raw["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    k = k["value"] if isinstance(k, dict) else k
    assert qjax.is_quantized(k)
    assert_identical(k, model.layers[0].self_attn.q_proj.kernel.get_value())
    # a pure-dict save restores without a target straight into the model
    qjax.checkpoint.save(tmp_path / "pure", nnx.to_pure_dict(state))
    pure = qjax.checkpoint.restore(tmp_path / "pure")
    third = _nnx_model(seed=4)
    st = nnx.state(third)
    nnx.replace_by_pure_dict(st, pure)
    nnx.update(third, st)
    assert_identical(nnx.state(third), state)
    # plain orbax, onto the abstract state
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "plain", state)
    ck.wait_until_finished()
    assert_identical(ck.restore(tmp_path / "plain", abstract), state)


def test_nnx_peft_roundtrip(rng, tmp_path):
    x = jnp.asarray(rng.standard_normal((4, D)), jnp.float32)
    lora = qjax.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = _nnx_model(lora=lora)
    nnx_train_mse(model, x, jnp.zeros((4, 8)), 3)
    names = qjax.interop.save_peft_adapter(tmp_path, model, lora, name_map=qjax.interop.LLAMA_NNX)
    assert names["layers/1/self_attn/v_proj"] == "model.layers.1.self_attn.v_proj"
    fresh = _nnx_model(seed=8, lora=lora)
    qjax.interop.load_peft_adapter(tmp_path, fresh, lora, name_map=qjax.interop.LLAMA_NNX)
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))
