"""End to end on the GPU: a QLoRA train step of the SmolLM2-shaped Llama through the kernels matches
the XLA path's, and a compiled QLoRA step holds no dense weight."""

import dataclasses

import jax
import jax.numpy as jnp

import qjax
from _gpu_helpers import activations, relative_error, weight
from benchmarks.train_step import loss_fn, qlora_llama
from qjax.models.llama import LlamaConfig

# SmolLM2-135M's widths (d 576, FFN 1536, 9 query / 3 KV heads, vocab 49152) with 4 of its 30
# blocks: every projection shape of the model, at a fraction of the compile time.
SMOLLM2_4 = dataclasses.replace(LlamaConfig.smollm2_135m(), num_hidden_layers=4)

# bf16 compute: the two backends multiply the same bf16-rounded weights with float32 accumulation,
# so each matmul output differs by at most an ulp of bf16 (2^-8 relative) where the two float32 sums
# round differently. Through 4 blocks and the backward pass such flips perturb the result by about
# 1e-3 relative (METHOD.md: bf16 operands land between 1e-3 and 1e-2); a wrong kernel gives O(1).
LOSS_RTOL = 2e-3
GRAD_RTOL = 2e-2


def test_qlora_llama_step_matches_xla(rng):
    ids = jnp.asarray(rng.integers(0, SMOLLM2_4.vocab_size, size=(4, 256)), jnp.int32)
    results = {}
    for backend in ("auto", "xla"):  # the same weights and adapters: same seeds, deterministic quantization
        model, adapters, rest = qlora_llama(SMOLLM2_4, quantized=True, backend=backend)
        results[backend] = jax.jit(jax.value_and_grad(loss_fn(model)))(adapters, rest, ids)
    (loss, grads), (loss_ref, grads_ref) = results["auto"], results["xla"]
    assert jnp.isfinite(loss) and abs(float(loss) - float(loss_ref)) <= LOSS_RTOL * abs(float(loss_ref))
    for path in ("layers_0/self_attn/q_proj", "layers_3/mlp/down_proj", ""):  # two layers, then every adapter
        pick = lambda g: [v for p, v in jax.tree_util.tree_leaves_with_path(g)  # noqa: E731
                          if path in jax.tree_util.keystr(p, simple=True, separator="/")]
        assert pick(grads), f"no adapter gradients under {path!r}"
        assert relative_error(pick(grads), pick(grads_ref)) <= GRAD_RTOL, path


def test_compiled_qlora_step_holds_no_dense_weight(key):
    """Forward + backward of 4 stacked 8192 x 8192 QLoRA layers: temporaries < one dense bf16 layer."""
    k, n, m, r, layers = 8192, 8192, 256, 16, 4
    keys = jax.random.split(key, layers + 1)
    qs = [weight(sub, k, n, transposed=True) for sub in keys[:layers]]
    adapters = [(activations(sub, (k, r), jnp.float32) * 0.01, jnp.full((r, n), 0.01, jnp.float32))
                for sub in jax.random.split(keys[-1], layers)]
    x = activations(keys[-1], (m, k))

    def loss(adapters, qs, x):
        for q, (a, b) in zip(qs, adapters):
            x = qjax.qmatmul(x, q) + ((x.astype(jnp.float32) @ a) @ b).astype(x.dtype)
        return jnp.mean(x.astype(jnp.float32) ** 2)

    memory = jax.jit(jax.grad(loss)).lower(adapters, qs, x).compile().memory_analysis()
    dense_layer = k * n * jnp.dtype(jnp.bfloat16).itemsize
    assert memory.temp_size_in_bytes < dense_layer, (memory.temp_size_in_bytes, dense_layer)
