"""PEFT adapter files both ways, against peft's PeftModel on a tiny torch model."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax._src import adapters as ad
from qlora_trees import PROJ, apply, qlora_variables

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
nn = torch.nn


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)


class _Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = _Attn(d)


class _Inner(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(d) for _ in range(n)])
        self.norm = nn.Parameter(torch.ones(d))


class TinyLM(nn.Module):
    """Mirrors qlora_trees.apply: x <- tanh(q_proj(x)) * v_proj(x) per layer, then * norm."""

    def __init__(self, d, n):
        super().__init__()
        self.model = _Inner(d, n)

    def forward(self, x):
        for layer in self.model.layers:
            a = layer.self_attn
            x = torch.tanh(a.q_proj(x)) * a.v_proj(x)
        return x * self.model.norm


def _torch_base(variables, d, n):
    """The torch model with the base weights of `variables` (quantized kernels dequantized)."""
    m = TinyLM(d, n)
    with torch.no_grad():
        for i in range(n):
            for name in PROJ:
                p = variables["params"][f"layers_{i}"]["self_attn"][name]
                w = p["kernel"]
                w = qjax.dequantize(w, jnp.float32) if qjax.is_quantized(w) else w
                lin = getattr(m.model.layers[i].self_attn, name)
                lin.weight.copy_(torch.from_numpy(np.asarray(w).T.copy()))
                lin.bias.copy_(torch.from_numpy(np.array(p["bias"])))
    return m.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_save_loads_in_peft_with_same_outputs(rng, tmp_path, use_rslora):
    d, n = 32, 2
    cfg = qjax.LoraConfig(r=4, alpha=8, use_rslora=use_rslora)
    variables = qlora_variables(rng, d=d, r=4, layers=n)
    names = qjax.interop.save_peft_adapter(tmp_path, variables, cfg)
    assert names["params/layers_1/self_attn/v_proj"] == "model.layers.1.self_attn.v_proj"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    model = peft.PeftModel.from_pretrained(_torch_base(variables, d, n), tmp_path).eval()
    x = rng.standard_normal((5, d)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    ours = np.asarray(apply(variables, jnp.asarray(x), cfg.scaling))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # the loaded torch adapters are the qjax ones transposed, bit for bit
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().numpy()
    np.testing.assert_array_equal(lora_a.T, np.asarray(variables["params"]["layers_0"]["self_attn"]["q_proj"]["lora_a"]))


def test_load_from_peft_with_same_outputs(rng, tmp_path):
    d, n = 32, 2
    variables = qlora_variables(rng, d=d, r=8, layers=n, zero_b=True)
    torch.manual_seed(int(rng.integers(2**31)))
    model = peft.get_peft_model(_torch_base(variables, d, n), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path)
    cfg = qjax.interop.read_peft_config(tmp_path)
    assert (cfg.r, cfg.alpha, cfg.use_rslora) == (8, 16, False)
    loaded = qjax.interop.load_peft_adapter(tmp_path, variables, cfg)
    x = rng.standard_normal((5, d)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(apply(loaded, jnp.asarray(x), cfg.scaling)), ref, rtol=1e-5, atol=1e-5)
    # and back: qjax writes what it read, bit for bit
    qjax.interop.save_peft_adapter(tmp_path / "again", loaded, cfg)
    ours = qjax.interop.load_peft_adapter(tmp_path / "again", variables)
    for p, v in ad.flat_adapters(loaded).items():
        assert np.asarray(ad.flat_adapters(ours)[p]).tobytes() == np.asarray(v).tobytes()


def test_mismatches(rng, tmp_path):
    cfg = qjax.LoraConfig(r=4, alpha=8)
    qjax.interop.save_peft_adapter(tmp_path, qlora_variables(rng, r=4, layers=2), cfg)
    with pytest.raises(ValueError, match=r"q_proj/lora_a: file has shape=\(32, 4\).*model has shape=\(32, 8\)"):
        qjax.interop.load_peft_adapter(tmp_path, qlora_variables(rng, r=8, layers=2))
    with pytest.raises(ValueError, match=r"file tensors with no adapter in the model.*layers\.1"):
        qjax.interop.load_peft_adapter(tmp_path, qlora_variables(rng, r=4, layers=1))
    with pytest.raises(ValueError, match="alpha: file 8, given 16"):
        qjax.interop.load_peft_adapter(tmp_path, qlora_variables(rng, r=4), qjax.LoraConfig(r=4, alpha=16))
    # a user-supplied name map
    custom = qjax.interop.NameMap(to_torch_rules=((r"^params/", "net/"),))
    names = qjax.interop.save_peft_adapter(tmp_path / "c", qlora_variables(rng, r=4, layers=1), cfg, name_map=custom)
    assert names["params/layers_0/self_attn/q_proj"] == "net.layers_0.self_attn.q_proj"


def test_safetensors_round_trip_bfloat16(rng, tmp_path):
    tensors = {"a": jnp.asarray(rng.standard_normal((3, 5)), jnp.bfloat16),
               "b": np.asarray(rng.standard_normal(7), np.float32), "c": np.arange(6, dtype=np.uint8).reshape(2, 3)}
    qjax.interop.save_safetensors(tmp_path / "t.safetensors", tensors, metadata={"kind": "test"})
    back = qjax.interop.load_safetensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors) and not os.path.exists(tmp_path / "t.safetensors.tmp")
    for k, v in tensors.items():
        v = np.asarray(v)
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes()
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        qjax.interop.load_safetensors(tmp_path / "bad.safetensors")
