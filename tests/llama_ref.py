"""An independent numpy Llama forward pass, written from the llama.cpp side of the format.

It reads GGUF tensors with its own Q4_1 / Q8_0 decoders and applies rotary embeddings the way
llama.cpp does on the GGUF weights as stored: rotating adjacent pairs (x[2i], x[2i+1]).
qjax instead un-permutes q/k rows and rotates halves (Hugging Face's layout); agreement between the
two checks the loader's permutation fix, dequantization and the Flax model at once.
"""

import numpy as np

QK = 32  # elements per block in Q4_1 and Q8_0


def decode_q8_0(raw: np.ndarray, shape) -> np.ndarray:
    """Q8_0 block: float16 scale d, 32 int8 q; x = d * q."""
    blocks = raw.reshape(-1, 2 + QK)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(shape)


def decode_q4_1(raw: np.ndarray, shape) -> np.ndarray:
    """Q4_1 block: float16 scale d, float16 min m, 16 bytes; low nibbles are x[0:16], high x[16:32]."""
    blocks = raw.reshape(-1, 4 + QK // 2)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(shape)


def read_gguf_weights(path) -> tuple[dict, dict]:
    """({tensor name: float32 array in GGUF's (out, in) row order}, {metadata key: value})."""
    import gguf
    reader = gguf.GGUFReader(path)
    weights = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        raw = np.asarray(t.data)
        kind = t.tensor_type.name
        if kind == "F32":
            weights[t.name] = raw.astype(np.float32).reshape(shape)
        elif kind == "Q8_0":
            weights[t.name] = decode_q8_0(raw, shape)
        elif kind == "Q4_1":
            weights[t.name] = decode_q4_1(raw, shape)
        else:
            raise NotImplementedError(f"reference decoder has no {kind} ({t.name})")
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    return weights, meta


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta, interleaved):
    """x: (seq, heads, head_dim)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]          # (seq, d/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]              # (seq, 1, d/2)
    if interleaved:   # llama.cpp: pairs (x[2i], x[2i+1])
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2:]  # Hugging Face: halves
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def forward(weights: dict, ids, *, n_layers, n_heads, n_kv_heads, theta, eps, interleaved_rope):
    """Logits (seq, vocab) float32 of one sequence, weights by GGUF name in (out, in) layout."""
    ids = np.asarray(ids)
    t = len(ids)
    emb = weights["token_embd.weight"]
    x = emb[ids].astype(np.float32)
    pos = np.arange(t)
    causal = np.tril(np.ones((t, t), bool))
    for i in range(n_layers):
        w = lambda n: weights[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = _rms_norm(x, w("attn_norm"), eps)
        q = (h @ w("attn_q").T).reshape(t, n_heads, -1)
        k = (h @ w("attn_k").T).reshape(t, n_kv_heads, -1)
        v = (h @ w("attn_v").T).reshape(t, n_kv_heads, -1)
        d = q.shape[-1]
        q = _rope(q, pos, theta, interleaved_rope).astype(np.float32)
        k = _rope(k, pos, theta, interleaved_rope).astype(np.float32)
        rep = n_heads // n_kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / float(np.sqrt(d))  # a Python float keeps float32
        s = np.where(causal[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", p, v).reshape(t, -1)
        x = x + a @ w("attn_output").T
        h = _rms_norm(x, w("ffn_norm"), eps)
        g, u = h @ w("ffn_gate").T, h @ w("ffn_up").T
        x = x + (g / (1.0 + np.exp(-g)) * u) @ w("ffn_down").T
        assert x.dtype == np.float32, x.dtype  # a float64 slip would also make this 10x slower
    x = _rms_norm(x, weights["output_norm.weight"], eps)
    head = weights.get("output.weight", emb)
    return (x @ head.T).astype(np.float32)


def perplexity(logits, ids) -> float:
    logits = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - logits[np.arange(len(ids) - 1), np.asarray(ids)[1:]]
    return float(np.exp(nll.mean()))


def flax_to_gguf_names(params: dict, n_layers: int) -> dict:
    """A Flax LlamaForCausalLM params tree as GGUF-named (out, in) numpy weights (no q/k permutation)."""
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    out = {"token_embd.weight": np.asarray(params["embed_tokens"]["embedding"], np.float32),
           "output_norm.weight": np.asarray(params["norm"]["scale"], np.float32)}
    if "lm_head" in params:
        out["output.weight"] = np.asarray(params["lm_head"]["kernel"], np.float32).T
    for i in range(n_layers):
        layer = params[f"layers_{i}"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"blk.{i}.{names[norm]}.weight"] = np.asarray(layer[norm]["scale"], np.float32)
        for group in ("self_attn", "mlp"):
            for proj, leaf in layer[group].items():
                out[f"blk.{i}.{names[proj]}.weight"] = np.asarray(leaf["kernel"], np.float32).T
    return out
