"""Tiny random models built by other JAX libraries' own model code (tunix NNX), for the any-model tests.

Install: `pip install --no-deps -r tests/peers.txt` (jaxtyping and einops come with the `test` extra;
.ci/run does this). `import tunix` would import tunix's whole trainer stack, so `tunix_model_module`
registers an empty `tunix` package and imports only `tunix.models.<name>.model`. Importing one sets
flax's global `flax_always_shard_variable` to False (tunix's env_utils does it at import); the loader
puts the flag back and the builders turn it off only while tunix builds a model (its params carry
sharding annotations and there is no mesh), so the other tests of the same worker see Flax's default.

Each builder returns a `Peer(model, forward, tokens)`: `forward(model)` runs one causal forward pass
on `tokens` (int32, (2, 8)) and returns the float32 logits (2, 8, 256). tunix initializes its dense
MLP kernels to zeros; the builders redraw every all-zero parameter (normal * 0.02, from the seed) so
each projection's input and output gradients are nonzero.
"""

import importlib
import importlib.util
import sys
import types
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

B, T, VOCAB = 2, 8, 256
TINY = dict(num_layers=2, vocab_size=VOCAB, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16,
            num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6)


class Peer(NamedTuple):
    """model: the nnx.Module; forward(model) -> logits (B, T, VOCAB) float32; tokens: (B, T) int32."""

    model: nnx.Module
    forward: Callable
    tokens: jax.Array


def tunix_model_module(name: str) -> types.ModuleType:
    """`tunix.models.<name>.model` (llama3, qwen2, qwen3, gemma, gemma3), imported without tunix's __init__.

    Skips the calling test when tunix, jaxtyping or einops is not installed.
    """
    missing = [m for m in ("jaxtyping", "einops") if importlib.util.find_spec(m) is None]
    if "tunix" not in sys.modules:
        spec = importlib.util.find_spec("tunix")  # locates the package; does not run its __init__
        if spec is None or not spec.submodule_search_locations:
            missing.insert(0, "tunix (google-tunix)")
        elif not missing:
            pkg = types.ModuleType("tunix")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["tunix"] = pkg
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: `pip install --no-deps -r tests/peers.txt` "
                    "and `pip install jaxtyping einops`")
    import flax
    flag = flax.config.flax_always_shard_variable
    try:
        return importlib.import_module(f"tunix.models.{name}.model")
    finally:
        flax.config.update("flax_always_shard_variable", flag)


def causal_inputs(tokens: jax.Array) -> tuple:
    """(tokens, positions (B, T) int32, cache None, attention_mask (B, T, T) bool causal): tunix's __call__ args."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), jnp.bool_)), (b, t, t))
    return tokens, positions, None, mask


def _forward(model, tokens):
    """Logits (B, T, V) float32 of tunix's model(tokens, positions, None, mask), which returns (logits, cache)."""
    with jax.numpy_rank_promotion("allow"):  # tunix's RMSNorm broadcasts (D,) * (B, T, D); conftest raises on it
        logits, _ = model(*causal_inputs(tokens))
    return logits.astype(jnp.float32)


def _redraw_zeros(model: nnx.Module, seed: int) -> None:
    """Replaces each all-zero nnx.Param of model (tunix's zero-init MLP kernels) by normal * 0.02 draws."""
    key = jax.random.key(seed + 1)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and not jnp.any(value := node.get_value()):
            key, sub = jax.random.split(key)
            node.set_value((jax.random.normal(sub, value.shape, jnp.float32) * 0.02).astype(value.dtype))


def _build(make: Callable[[], nnx.Module]) -> nnx.Module:
    """make() with flax_always_shard_variable off, as tunix's env_utils sets it (put back afterwards)."""
    import flax
    flag = flax.config.flax_always_shard_variable
    flax.config.update("flax_always_shard_variable", False)
    try:
        return make()
    finally:
        flax.config.update("flax_always_shard_variable", flag)


def _peer(model, seed):
    _redraw_zeros(model, seed)
    tokens = jax.random.randint(jax.random.key(seed + 2), (B, T), 0, VOCAB, jnp.int32)
    return Peer(model, lambda m: _forward(m, tokens), tokens)


def tiny_llama3(seed: int = 0) -> Peer:
    """tunix Llama3: 2 layers, d 64, 4 heads / 2 KV of 16, FFN 128, vocab 256, untied lm_head, float32.

    Projections: q/k/v/o and lm_head are tunix `Einsum` modules (3-D kernels 'BTD,DNH->BTNH' etc., param `w`);
    gate/up/down are nnx.Linear.
    """
    mod = tunix_model_module("llama3")
    return _peer(_build(lambda: mod.Llama3(mod.ModelConfig(**TINY), rngs=nnx.Rngs(seed))), seed)


def tiny_qwen3(seed: int = 0) -> Peer:
    """tunix Qwen3 (dense): llama3's sizes plus per-head q/k RMSNorm; Einsum attention, nnx.Linear MLP, float32."""
    mod = tunix_model_module("qwen3")
    return _peer(_build(lambda: mod.Qwen3(mod.ModelConfig(**TINY), rngs=nnx.Rngs(seed))), seed)


def tiny_qwen3_moe(seed: int = 0) -> Peer:
    """tunix Qwen3 MoE: tiny_qwen3 with 4 experts, top-2; expert kernels are raw nnx.Params (E, D, F) / (E, F, D).

    On CPU the MoE layer takes its dense fallback (a Python loop over experts reading `gate_proj.value[i]`).
    """
    mod = tunix_model_module("qwen3")
    config = mod.ModelConfig(**TINY, num_experts=4, num_experts_per_tok=2)
    return _peer(_build(lambda: mod.Qwen3(config, rngs=nnx.Rngs(seed))), seed)


# --- recurrentgemma (Google DeepMind's Griffin / RecurrentGemma, Flax Linen) ------------------------------------
#
# Install: `pip install --no-deps recurrentgemma==1.0.1 typeguard==2.13.3` (plus absl-py, einops, jaxtyping, which
# qjax's test environment already has). --no-deps because recurrentgemma pins numpy<2.4 and pulls torch /
# sentencepiece / orbax extras that its Linen model code does not use. `recurrentgemma/__init__` imports
# `recurrentgemma.jax`, whose __init__ imports the sampler (sentencepiece), so `recurrentgemma_modules` registers
# empty `recurrentgemma` and `recurrentgemma.jax` packages and imports only `common` and `jax.griffin` (which pulls
# jax.modules, jax.layers, jax.scan, jax.pallas, jax.complex_lib, jax.array_typing).

RG_B, RG_T, RG_VOCAB = 2, 8, 256


class LinenPeer(NamedTuple):
    """model: the unbound linen Module; variables: {"params": ...}; inputs: example positional args for
    `model.apply` (for qjax.linen.convert's `inputs=`); forward(model, variables) -> logits (B, T, VOCAB) float32."""

    model: object
    variables: dict
    inputs: tuple
    forward: Callable


def recurrentgemma_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(`recurrentgemma.common`, `recurrentgemma.jax.griffin`), imported without the packages' __init__ files.

    Skips the calling test when recurrentgemma (or one of its model-code deps) is not installed.
    """
    missing = [m for m in ("recurrentgemma", "typeguard", "jaxtyping", "einops", "absl")
               if m not in sys.modules and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: `pip install --no-deps recurrentgemma==1.0.1 "
                    "typeguard==2.13.3` and `pip install absl-py einops jaxtyping`")
    if "recurrentgemma" not in sys.modules:
        spec = importlib.util.find_spec("recurrentgemma")  # locates the package; does not run its __init__
        root = types.ModuleType("recurrentgemma")
        root.__path__ = list(spec.submodule_search_locations)
        sub = types.ModuleType("recurrentgemma.jax")
        sub.__path__ = [p + "/jax" for p in root.__path__]
        sys.modules["recurrentgemma"] = root
        sys.modules["recurrentgemma.jax"] = sub
        root.jax = sub
    return importlib.import_module("recurrentgemma.common"), importlib.import_module("recurrentgemma.jax.griffin")


def tiny_recurrentgemma(seed: int = 0, gradient_checkpointing: bool = True) -> LinenPeer:
    """recurrentgemma Griffin: width 64, blocks (recurrent, attention), 4 heads (head_dim 16, one KV
    head), MLP 128, LRU width 64, vocab 256 (tied embedding, logits soft cap 30), local attention window 8, float32,
    native (non-Pallas) linear scan. gradient_checkpointing: Griffin's default, True, wraps each residual block in
    nn.remat.

    Params per block: nn.Dense proj_q/k/v/final (attention) or linear_x/y/out (recurrent), ffw_down; its own
    `layers.Einsum` ffw_up (w (2, 64, 128), eqn '...td,cdD->c...tD'); per RG-LRU two `BlockDiagonalLinear` gates
    (w (4, 16, 16), 'h i, h i j'); `Conv1D` w (4, 64) (elementwise, not a matmul); RMSNorm scales; the embedding
    (256, 64), read by a gather (encode) and by `x @ table.T` (decode). RMSNorm scales are zero-initialized
    (scale + 1), biases are zero; nothing is all-zero that a projection's gradient needs.

    inputs: (tokens (B, T) int32, segment_pos (B, T) int32 = arange(T), cache None, return_logits True,
    return_cache False); Griffin returns (logits, None). forward jits `m.apply` once per model object.
    """
    common, griffin = recurrentgemma_modules()
    kind = common.TemporalBlockType
    config = common.GriffinConfig(
        vocab_size=RG_VOCAB, width=64, mlp_expanded_width=128, num_heads=4,
        block_types=(kind.RECURRENT, kind.ATTENTION), embeddings_scale_by_sqrt_dim=True,
        attention_window_size=8, logits_soft_cap=30.0, lru_width=64, scan_type=common.ScanType.LINEAR_NATIVE)
    model = griffin.Griffin(config, gradient_checkpointing=gradient_checkpointing, param_dtype=jnp.float32)
    tokens = jax.random.randint(jax.random.key(seed + 2), (RG_B, RG_T), 0, RG_VOCAB, jnp.int32)
    segment_pos = jnp.broadcast_to(jnp.arange(RG_T, dtype=jnp.int32), (RG_B, RG_T))
    inputs = (tokens, segment_pos, None, True, False)
    with jax.numpy_rank_promotion("allow"):  # its biases broadcast (h, j) + (B, T, h, j); conftest raises on it
        variables = jax.jit(lambda key: model.init(key, *inputs))(jax.random.key(seed))  # eager init: ~10x slower
    compiled = {}  # id(model) -> (model, jitted apply): one compile per model, not one per call

    def forward(m, v):
        if id(m) not in compiled:
            def run(v, m=m):
                with jax.numpy_rank_promotion("allow"):
                    logits, _ = m.apply(v, *inputs)
                return logits.astype(jnp.float32)
            compiled[id(m)] = (m, jax.jit(run))
        return compiled[id(m)][1](v)

    return LinenPeer(model, variables, inputs, forward)
