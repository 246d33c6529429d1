"""Causal-LM helpers for any Flax model mapping (batch, seq) ids to (batch, seq, vocab) logits.

Next-token loss, perplexity over fixed-length windows, and greedy generation without a KV cache.
They take `(model, variables)` so a QLoRA-converted model works exactly like the dense one.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def next_token_nll(logits, input_ids, mask=None):
    """Summed negative log-likelihood of input_ids[:, 1:] under logits[:, :-1], and the token count.

    logits: (batch, seq, vocab) any float dtype (log-softmax runs in float32); input_ids: (batch, seq)
    int; mask: (batch, seq) or None, nonzero where a token counts as a target. Returns two float32
    scalars (sum, count).
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = input_ids[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[:, :, 0]
    weight = jnp.ones(targets.shape, jnp.float32) if mask is None else (mask[:, 1:] != 0).astype(jnp.float32)
    return jnp.sum(nll * weight), jnp.sum(weight)


def next_token_loss(logits, input_ids, mask=None):
    """Mean next-token cross-entropy (float32 scalar); see `next_token_nll`."""
    total, count = next_token_nll(logits, input_ids, mask)
    return total / jnp.maximum(count, 1.0)


def chunk_tokens(ids, seq_len: int) -> np.ndarray:
    """Non-overlapping windows: a 1-D token sequence -> (len(ids) // seq_len, seq_len) int32.

    The tail shorter than seq_len is dropped. Raises ValueError if not even one window fits.
    """
    ids = np.asarray(ids, np.int32).reshape(-1)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one window of seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


@functools.partial(jax.jit, static_argnums=0)
def _nll_batch(model, variables, ids, row_mask):
    mask = jnp.broadcast_to(row_mask[:, None], ids.shape)
    return next_token_nll(model.apply(variables, ids), ids, mask)


def perplexity(model, variables, windows, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over token windows (n, seq_len), evaluated batch_size at a time.

    Every window is scored on its own (no context carried across windows). The last partial batch is
    padded to batch_size (one compiled shape) and the padding rows are not counted.
    """
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"windows must be a non-empty (n, seq_len) array, got shape {windows.shape}")
    total, count = 0.0, 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        n = len(batch)
        row_mask = np.arange(batch_size) < n
        batch = np.concatenate([batch, np.zeros((batch_size - n, batch.shape[1]), np.int32)])
        s, c = _nll_batch(model, variables, jnp.asarray(batch), jnp.asarray(row_mask))
        total, count = total + float(s), count + float(c)
    return math.exp(total / count)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _greedy_step(model, variables, buffer, pos):
    logits = model.apply(variables, buffer)
    last = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False)
    token = jnp.argmax(last, axis=-1).astype(buffer.dtype)
    return jax.lax.dynamic_update_index_in_dim(buffer, token, pos, axis=1), token


def greedy_generate(model, variables, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None,
                    max_length: int | None = None) -> np.ndarray:
    """Greedy continuation of equal-length prompts, recomputing the whole prefix each step (no KV cache).

    prompt_ids: (batch, prompt_len) or (prompt_len,) ints. Returns the new tokens, (batch, n) or (n,)
    int32 with n <= max_new_tokens (generation stops once every row has produced eos_token_id; later
    tokens of a finished row are eos_token_id). max_length: the model's longest sequence; raises
    ValueError if prompt_len + max_new_tokens exceeds it.
    """
    prompt = np.asarray(prompt_ids, np.int32)
    squeeze = prompt.ndim == 1
    prompt = prompt.reshape(1, -1) if squeeze else prompt
    b, p = prompt.shape
    if p == 0:
        raise ValueError("prompt_ids is empty: greedy generation needs at least one token")
    total = p + max_new_tokens
    if max_length is not None and total > max_length:
        raise ValueError(f"prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"the model's maximum length {max_length}")
    # Round the buffer up so prompts of nearby lengths share one compilation; causal attention makes
    # the padding invisible to earlier positions.
    length = -(-total // 32) * 32 if max_length is None else min(-(-total // 32) * 32, max_length)
    buffer = jnp.zeros((b, length), jnp.int32).at[:, :p].set(prompt)
    done = np.zeros(b, bool)
    out = []
    for pos in range(p, total):
        buffer, token = _greedy_step(model, variables, buffer, jnp.int32(pos))
        token = np.asarray(token)
        if eos_token_id is not None:
            token = np.where(done, eos_token_id, token)
            done |= token == eos_token_id
        out.append(token)
        if eos_token_id is not None and done.all():
            break
    new = np.stack(out, axis=1) if out else np.zeros((b, 0), np.int32)
    return new[0] if squeeze else new
