"""qjax.checkpoint.save_adapters / load_adapters on Linen-style trees and NNX modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qlora_trees import apply, qlora_variables
from qjax.checkpoint import CheckpointError


def _adapters(v):
    return {k: np.asarray(x) for k, x in qjax._src.adapters.tree.flat_adapters(v).items()}


def test_roundtrip_onto_converted_model(rng, tmp_path):
    cfg = qjax.LoraConfig(r=4, alpha=8, target_modules=["*q_proj", "*v_proj"])
    trained = qlora_variables(rng, r=4)
    fresh = qlora_variables(rng, r=4, zero_b=True)  # same shapes, other base + adapters
    fresh = jax.tree.map(lambda a, b: a, trained, fresh, is_leaf=qjax.is_quantized)  # same base weights
    fresh = qjax._src.adapters.tree.replace_adapters(
        fresh, {p: jnp.zeros_like(x) for p, x in qjax._src.adapters.tree.flat_adapters(fresh).items()})
    qjax.checkpoint.save_adapters(tmp_path / "ad", trained, cfg)
    # only the adapters are on disk: far less than the quantized base
    on_disk = sum(f.stat().st_size for f in (tmp_path / "ad").rglob("*") if f.is_file())
    loaded = qjax.checkpoint.load_adapters(tmp_path / "ad", fresh, cfg)
    for p, x in _adapters(trained).items():
        assert _adapters(loaded)[p].tobytes() == x.tobytes()
    x = jnp.asarray(rng.standard_normal((3, 32)).astype(np.float32))
    np.testing.assert_array_equal(apply(loaded, x, cfg.scaling), apply(trained, x, cfg.scaling))
    assert qjax.checkpoint.read_adapter_config(tmp_path / "ad") == cfg
    assert on_disk < 64 * 1024


def test_mismatches_are_named(rng, tmp_path):
    cfg = qjax.LoraConfig(r=4, alpha=8)
    qjax.checkpoint.save_adapters(tmp_path / "ad", qlora_variables(rng, r=4), cfg)
    with pytest.raises(CheckpointError, match=r"LoRA rank r=4 in the checkpoint, r=8 in the model"):
        qjax.checkpoint.load_adapters(tmp_path / "ad", qlora_variables(rng, r=8))
    with pytest.raises(CheckpointError, match=r"layers_1/self_attn/q_proj/lora_a is in the checkpoint but not"):
        qjax.checkpoint.load_adapters(tmp_path / "ad", qlora_variables(rng, r=4, layers=1))
    with pytest.raises(CheckpointError, match=r"shape=\(32, 4\), model shape=\(48, 4\)"):
        qjax.checkpoint.load_adapters(tmp_path / "ad", qlora_variables(rng, r=4, d=48))
    with pytest.raises(CheckpointError, match=r"alpha: checkpoint 8, given 16"):
        qjax.checkpoint.load_adapters(tmp_path / "ad", qlora_variables(rng, r=4), qjax.LoraConfig(r=4, alpha=16))
    with pytest.raises(ValueError, match="rank.*lora_config.r=8"):
        qjax.checkpoint.save_adapters(tmp_path / "bad", qlora_variables(rng, r=4), qjax.LoraConfig(r=8))
    with pytest.raises(ValueError, match="found no adapters"):
        qjax.checkpoint.save_adapters(tmp_path / "bad", {"params": {"kernel": jnp.ones((2, 2))}}, cfg)
    qjax.checkpoint.save(tmp_path / "plain", qlora_variables(rng, r=4))
    with pytest.raises(CheckpointError, match="no adapter metadata"):
        qjax.checkpoint.load_adapters(tmp_path / "plain", qlora_variables(rng, r=4))


class _Proj(nnx.Module):
    def __init__(self, d, r, rngs):
        self.kernel = nnx.Param(jnp.asarray(rngs.params.normal((d, d))))
        self.lora_a = nnx.LoRAParam(rngs.params.normal((d, r)))
        self.lora_b = nnx.LoRAParam(rngs.params.normal((r, d)))

    def __call__(self, x):
        return x @ self.kernel + x @ self.lora_a @ self.lora_b


class _Net(nnx.Module):
    def __init__(self, d, r, rngs):
        self.layers = nnx.List([_Proj(d, r, rngs) for _ in range(2)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_nnx_module(tmp_path):
    cfg = qjax.LoraConfig(r=2, alpha=4)
    a, b = _Net(8, 2, nnx.Rngs(1)), _Net(8, 2, nnx.Rngs(2))
    b.layers[0].kernel[...] = a.layers[0].kernel[...]
    b.layers[1].kernel[...] = a.layers[1].kernel[...]
    qjax.checkpoint.save_adapters(tmp_path / "ad", a, cfg)
    out = qjax.checkpoint.load_adapters(tmp_path / "ad", b, cfg)
    assert out is b
    x = jnp.ones((1, 8))
    np.testing.assert_array_equal(np.asarray(b(x)), np.asarray(a(x)))
    # an nnx.State works as the source too
    qjax.checkpoint.save_adapters(tmp_path / "st", nnx.state(a), cfg)
    assert qjax.checkpoint.read_adapter_config(tmp_path / "st") == cfg
