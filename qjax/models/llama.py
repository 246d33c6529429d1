"""A Llama-family causal LM in Flax Linen, built from plain `nn.Dense` layers so qjax can convert it.

RMSNorm, rotary position embeddings (Hugging Face's half-rotation layout), grouped-query attention,
SwiGLU MLP, optionally tied input/output embeddings, a causal mask and a KV-cache-free forward.

Parameter tree (names follow Hugging Face's `LlamaForCausalLM`, so qjax's default skip patterns
keep embeddings and norms dense and "all-linear" finds exactly the seven projections per block):

    embed_tokens/embedding                      (vocab_size, hidden_size)
    layers_{i}/input_layernorm/scale            (hidden_size,)
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel  (in_features, out_features), no bias
    layers_{i}/post_attention_layernorm/scale   (hidden_size,)
    layers_{i}/mlp/{gate,up,down}_proj/kernel   (in_features, out_features), no bias
    norm/scale                                  (hidden_size,)
    lm_head/kernel                              (hidden_size, vocab_size), only when not tied
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape hyperparameters of a Llama-family model (Hugging Face's `LlamaConfig` names).

    head_dim: None means hidden_size // num_attention_heads. max_position_embeddings is the
    longest sequence the model was trained for; longer inputs raise ValueError.
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_attention_heads={self.num_attention_heads}; pass head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def smollm2_135m(cls) -> "LlamaConfig":
        """SmolLM2-135M(-Instruct): 30 layers, d_model 576, 9 query / 3 KV heads, 134.5M params."""
        return cls(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                   rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True)

    @classmethod
    def tiny(cls, vocab_size: int = 256, **overrides) -> "LlamaConfig":
        """A few-thousand-parameter config with every feature on (GQA, tied embeddings) for tests."""
        kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        kw.update(overrides)
        return cls(**kw)

    @property
    def num_params(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        block = attn + 3 * h * f + 2 * h
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_hidden_layers * block + h + head


class RMSNorm(nn.Module):
    """x / rms(x) * scale, statistics in float32. x: (..., features) -> (..., features) in dtype."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(self.dtype)


def rotary_embedding(positions, head_dim: int, theta: float):
    """cos, sin of Hugging Face's rotary layout. positions: (batch, seq) int -> two (batch, seq, 1, head_dim) f32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.reshape(1, 1, -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x, cos, sin):
    """x: (batch, seq, heads, head_dim); rotates the two halves of head_dim (HF's `rotate_half`)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class _LlamaModule(nn.Module):
    """The fields every Llama module has, and its bias-free projections."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, use_bias=False, kernel_init=nn.initializers.normal(self.config.initializer_range),
                        name=name, **self._kw)


class LlamaAttention(_LlamaModule):
    """Grouped-query self-attention. x: (batch, seq, hidden); mask: (batch, 1, 1, seq, seq) bool."""

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg = self.config
        b, t, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = self._dense
        q = dense(h * d, "q_proj")(x).reshape(b, t, h, d)
        k = dense(kv * d, "k_proj")(x).reshape(b, t, kv, d)
        v = dense(kv * d, "v_proj")(x).reshape(b, t, kv, d)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Query head j reads KV head j // (h // kv), as HF's repeat_kv; grouping avoids copying K/V.
        q = q.reshape(b, t, kv, h // kv, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores * (d ** -0.5), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * d)
        return dense(cfg.hidden_size, "o_proj")(out)


class LlamaMLP(_LlamaModule):
    """SwiGLU: down(silu(gate(x)) * up(x)). x: (..., hidden) -> (..., hidden)."""

    @nn.compact
    def __call__(self, x):
        cfg, dense = self.config, self._dense
        gate = dense(cfg.intermediate_size, "gate_proj")(x)
        up = dense(cfg.intermediate_size, "up_proj")(x)
        return dense(cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(_LlamaModule):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg, kw = self.config, self._kw
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        x = x + LlamaAttention(cfg, name="self_attn", **kw)(h, cos, sin, mask)
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        return x + LlamaMLP(cfg, name="mlp", **kw)(h)


class LlamaForCausalLM(_LlamaModule):
    """Llama causal LM: token ids -> next-token logits.

    dtype: computation dtype of activations and matmuls (norm statistics, softmax and rotary
    embeddings always run in float32); param_dtype: dtype of freshly initialized params.
    remat: recompute each block in the backward pass (`nn.remat`), trading compute for memory.
    """

    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, positions=None, attention_mask=None):
        """input_ids: (batch, seq) int; positions: (batch, seq) int, default 0..seq-1;
        attention_mask: (batch, seq), nonzero for tokens that may be attended to (padding: 0).

        Returns logits (batch, seq, vocab_size) in float32. Raises ValueError for a sequence
        longer than config.max_position_embeddings or ids that are not (batch, seq).
        """
        cfg, kw = self.config, self._kw
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
        mask = jnp.tril(jnp.ones((t, t), jnp.bool_)).reshape(1, 1, 1, t, t)
        if attention_mask is not None:
            mask = mask & (attention_mask != 0).reshape(b, 1, 1, 1, t)
        cos, sin = rotary_embedding(positions, cfg.head_dim, cfg.rope_theta)

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens",
                         embedding_init=nn.initializers.normal(cfg.initializer_range), **kw)
        x = embed(input_ids)
        block = nn.remat(LlamaDecoderLayer) if self.remat else LlamaDecoderLayer
        for i in range(cfg.num_hidden_layers):
            x = block(cfg, name=f"layers_{i}", **kw)(x, cos, sin, mask)
        x = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = self._dense(cfg.vocab_size, "lm_head")(x)
        return logits.astype(jnp.float32)
