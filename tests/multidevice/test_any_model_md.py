"""A model whose own layers read raw params (converted where they are, docs/any_model.md), sharded on a
2 x 4 mesh: the adapters' specs derive from their base's, and the sharded forward equals the unsharded one."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import qjax
import qjax.sharding
from _md_helpers import make_mesh


class Einsum(nnx.Module):
    def __init__(self, eq, shape, rngs):
        self.eq = eq
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.1)

    def __call__(self, x):
        return jnp.einsum(self.eq, x, self.w[...])


class Experts(nnx.Module):
    def __init__(self, rngs):
        self.gate_proj = nnx.Param(jax.random.normal(rngs.params(), (4, 128, 128)) * 0.1)
        self.down_proj = nnx.Param(jax.random.normal(rngs.params(), (4, 128, 128)) * 0.1)

    def __call__(self, x):
        return sum(jax.nn.silu(x @ self.gate_proj[i]) @ self.down_proj[i] for i in range(4))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = Einsum("btd,dnh->btnh", (128, 4, 32), rngs)
        self.o_proj = Einsum("btnh,nhd->btd", (4, 32, 128), rngs)
        self.mlp = Experts(rngs)

    def __call__(self, x):
        x = x + self.o_proj(self.q_proj(x))
        return x + self.mlp(x)


def rule(path, leaf):
    """FSDP over data x tensor parallel over model, written over each base's (in, out) matrix (blocksize 32:
    a split must not cut a block)."""
    stack = (None,) * len(leaf.stack_shape) if qjax.is_quantized(leaf) else ()  # experts' stacked matrices
    if path.endswith(("q_proj/w", "gate_proj")):
        return P(*stack, "data", "model")  # column parallel
    if path.endswith(("o_proj/w", "down_proj")):
        return P(*stack, "model", "data")  # row parallel
    return None


def test_routed_params_shard_and_compute_like_unsharded():
    mesh = make_mesh()
    x = jax.random.normal(jax.random.key(3), (4, 8, 128))
    model = Block(nnx.Rngs(0))
    qjax.nnx.convert(model, qjax.LoraConfig(r=8), qjax.QuantConfig(blocksize=32, compute_dtype=jnp.float32), nnx.Rngs(1),
                     inputs=(x,), strict=True)
    state = nnx.state(model)
    keys = iter(jax.random.split(jax.random.key(4), 64))
    pure = nnx.to_pure_dict(state)
    pure = jax.tree_util.tree_map_with_path(  # non-zero lora_b: the delta is exercised
        lambda p, v: jax.random.normal(next(keys), v.shape) * 0.05 if "lora_b" in str(p[-1]) else v, pure,
        is_leaf=qjax.is_quantized)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    graphdef = nnx.graphdef(model)
    ref = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)

    specs = qjax.sharding.params_sharding(pure, mesh, rule)
    spec = lambda *path: specs[path[0]][path[1]].spec if len(path) == 2 else specs[path[0]][path[1]][path[2]].spec  # noqa: E731
    # adapters follow their base: lora_a like the base's in axis, lora_b like its out axis (after the rank)
    assert spec("q_proj", "lora_a") == P("data") and spec("q_proj", "lora_b")[:2] == (None, "model")
    assert spec("o_proj", "lora_a")[:1] == ("model",) and spec("o_proj", "lora_b") == P(None, "data")
    assert spec("mlp", "gate_proj_lora", "lora_a") == P(None, "data")
    assert spec("mlp", "down_proj_lora", "lora_b") == P(None, None, "data")
    sharded = qjax.sharding.shard_params(pure, mesh, rule)
    codes = sharded["q_proj"]["w"].packed
    assert len({str(s.index) for s in codes.addressable_shards}) == 8  # each device holds a different slice
    nnx.replace_by_pure_dict(state, sharded)
    y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    # float32 everywhere; the sharded matmuls sum in another order
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
