"""Adapter variants: docs/extending.md's toy variant (its second block) runs as written and computes what plain jnp says."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from doc_blocks import python_blocks, run_block
from helpers import nnx_train_mse

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "extending.md"


@pytest.fixture(scope="module")
def doc():
    """The namespace of the doc's second python block (the toy variant), run as written on its own."""
    blocks = python_blocks(DOC)
    assert len(blocks) == 3 and blocks[1].skip is None
    ns = {}  # as tests/test_docs.py runs it, so re-registering the class replaces it
    run_block(blocks[1], ns)
    return ns


def _reference(x, params, scaling):
    """MLP(x) in plain jnp: each layer x . W + b + scaling * x . A . (B * s), W the dequantized base."""
    def layer(x, p):
        w = jnp.reshape(qjax.dequantize(p["kernel"], jnp.float32), (x.shape[-1], -1))
        b = p["lora_b"] * p["lora_s"][None, :]
        return x @ w + p["bias"][None] + scaling * ((x @ p["lora_a"]) @ b)

    return layer(jax.nn.relu(layer(x, params["up"])), params["down"])


def test_doc_variant_matches_plain_jnp(doc, rng):
    qmodel, trained, config = doc["qmodel"], doc["trained"], doc["config"]
    assert config.scaling == 2.0 and type(config.variant).__name__ == "ScaledLoRA"
    x = jnp.asarray(rng.standard_normal((7, 16)), jnp.float32)  # fresh data, not the doc's
    got = qmodel.apply({"params": trained}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(x, trained, config.scaling)),
                               rtol=2e-5, atol=2e-5)
    assert not np.allclose(np.asarray(trained["down"]["lora_s"]), 1.0)
    merged_model, merged = qjax.linen.merge(qmodel, {"params": trained})  # the variant's merge: B * s folded in
    np.testing.assert_allclose(np.asarray(merged_model.apply(merged, x)), np.asarray(got), rtol=1e-4, atol=1e-4)


def test_doc_variant_merge_and_tree_queries(doc, rng):
    variant = doc["config"].variant
    a = jnp.asarray(rng.standard_normal((3, 5, 2)), jnp.float32)  # (*in, r)
    b = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    s = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32)
    merged = variant.merge({"lora_a": a, "lora_b": b, "lora_s": s}, w, scaling=0.5)
    want = w + 0.5 * jnp.reshape(jnp.reshape(a, (15, 2)) @ (b * s[None]), (3, 5, 4))
    np.testing.assert_allclose(np.asarray(merged), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert variant.shapes((3, 5), (4,), 2, lead=(6,)) == {"lora_a": (6, 3, 5, 2), "lora_b": (6, 2, 4),
                                                          "lora_s": (6, 4)}
    assert qjax.optim.is_adapter_path("params/up/lora_s")
    adapters, rest = qjax.optim.split_adapters(doc["trained"])
    assert adapters["up"]["lora_s"] is not None and rest["up"]["lora_s"] is None
    with pytest.raises(ValueError, match=r"ScaledLoRA\(\) has no PEFT form"):
        qjax.interop.save_peft_adapter(str(doc["path"]) + "_peft", {"params": doc["trained"]}, doc["config"])


def test_doc_variant_in_nnx(doc, rng):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(16, 32, rngs=rngs)

        def __call__(self, x):
            return self.up(x)

    config = dataclasses.replace(doc["config"], target_modules=["up"])
    model = qjax.nnx.convert(Net(nnx.Rngs(0)), config, qjax.QuantConfig(compute_dtype=jnp.float32),
                             rngs=nnx.Rngs(1))
    assert isinstance(model.up.lora_s, nnx.LoRAParam) and model.up.lora_s.get_value().shape == (32,)
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)
    codes = np.asarray(model.up.kernel.get_value().packed)
    losses, _ = nnx_train_mse(model, x, y, 10)
    assert losses[-1] < losses[0] and not np.allclose(np.asarray(model.up.lora_s.get_value()), 1.0)
    np.testing.assert_array_equal(np.asarray(model.up.kernel.get_value().packed), codes)
    p = {k: v.get_value() for k, v in (("lora_a", model.up.lora_a), ("lora_b", model.up.lora_b),
                                        ("lora_s", model.up.lora_s))}
    w = qjax.dequantize(model.up.kernel.get_value(), jnp.float32)
    want = x @ w + model.up.bias.get_value()[None] + 2.0 * (x @ p["lora_a"]) @ (p["lora_b"] * p["lora_s"][None])
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_register_variant_checks():
    with pytest.raises(TypeError, match="AdapterVariant subclass"):
        qjax.register_variant(int)

    for attrs, match in (({"name": "lora"}, "name 'lora' is taken"),
                         ({"name": "frozen_b", "trainable": ("lora_a",)}, "disagree on whether leaf 'lora_b' trains")):
        bad = dataclasses.dataclass(frozen=True)(type("Bad", (qjax.LoRA,), attrs))
        with pytest.raises(ValueError, match=match):
            qjax.register_variant(bad)

    @dataclasses.dataclass(frozen=True)
    class Unregistered(qjax.LoRA):
        name = "unregistered"

    with pytest.raises(ValueError, match="is not registered"):
        qjax.LoraConfig(variant=Unregistered())
    with pytest.raises(TypeError, match="AdapterVariant instance"):
        qjax.LoraConfig(variant="lora")
