"""PEFT adapter files both ways, against peft's PeftModel on a tiny torch model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import qjax
import qjax.linen as ql
import qjax.nnx as qn
from qjax._src.adapters import tree as ad
from qjax._src import paths
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
    ours = qjax.interop.load_peft_adapter(tmp_path / "again", variables, cfg)
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


# ----------------------------------------------------------------------------- stacked (scanned) layers

F32 = qjax.QuantConfig(compute_dtype=jnp.float32)


class _LinenAttn(linen.Module):
    d: int
    general: bool = False  # q_proj a DenseGeneral with (2, d // 2) outputs

    @linen.compact
    def __call__(self, x):
        if self.general:
            q = linen.DenseGeneral((2, self.d // 2), name="q_proj")(x).reshape(x.shape)
        else:
            q = linen.Dense(self.d, name="q_proj")(x)
        return jnp.tanh(q) * linen.Dense(self.d, name="v_proj")(x)


class _LinenLayer(linen.Module):
    d: int
    general: bool = False

    @linen.compact
    def __call__(self, x, _):
        return _LinenAttn(self.d, self.general, name="self_attn")(x), None


class _ScannedLM(linen.Module):
    """TinyLM as a Linen nn.scan over its layers: params/layers/self_attn/{q_proj,v_proj} stacked."""
    d: int
    n: int
    general: bool = False

    @linen.compact
    def __call__(self, x):
        scan = linen.scan(_LinenLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.n)
        return scan(self.d, self.general, name="layers")(x, None)[0]


class _NNXAttn(nnx.Module):
    def __init__(self, d, general, rngs):
        self.q_proj = nnx.LinearGeneral(d, (2, d // 2), rngs=rngs) if general else nnx.Linear(d, d, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, rngs=rngs)


class _NNXLayer(nnx.Module):
    def __init__(self, d, general, rngs):
        self.self_attn = _NNXAttn(d, general, rngs)


class _VmappedLM(nnx.Module):
    """TinyLM (general=False) as NNX layers made by nnx.vmap and run by nnx.scan: layers/self_attn/... stacked."""

    def __init__(self, d, n, rngs, general=False):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(rngs):
            return _NNXLayer(d, general, rngs)
        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(layer, x):
            a = layer.self_attn
            return jnp.tanh(a.q_proj(x)) * a.v_proj(x)
        return step(self.layers, x)


def _stacked_model(kind, rng, d, n, cfg, seed, general=False):
    """(converted variables or NNX model, forward fn) of a stacked TinyLM with n layers of width d.

    general: q_proj is a DenseGeneral / LinearGeneral with (2, d // 2) outputs (no forward then).
    """
    x = jnp.zeros((1, d), jnp.float32)
    if kind == "linen":
        model = _ScannedLM(d, n, general)
        v = model.init(jax.random.key(int(rng.integers(2**31))), x)
        qm, qv = ql.convert(model, v, cfg, F32, jax.random.key(seed), inputs=(x,))
        return qv, lambda tree, x: qm.apply(tree, x)
    model = _VmappedLM(d, n, nnx.Rngs(int(rng.integers(2**31))), general)
    qn.convert(model, cfg, F32, nnx.Rngs(seed))
    return model, lambda m, x: m(x)


def _randomized(rng, tree):
    new = {p: jnp.asarray(rng.standard_normal(np.shape(v)).astype(np.float32) * 0.1)
           for p, v in ad.flat_adapters(tree).items()}
    return ad.replace_adapters(tree, new)


def _unstacked(stack, n):
    """qlora_trees variables (dequantized kernels) of the layers of a stacked {"self_attn": ...} tree."""
    params = {"norm": {"scale": jnp.ones(stack["self_attn"]["q_proj"]["bias"].shape[-1:], jnp.float32)}}
    for i in range(n):
        params[f"layers_{i}"] = {"self_attn": {
            name: {k: (qjax.dequantize(x, jnp.float32) if qjax.is_quantized(x) else x)[i]
                   for k, x in stack["self_attn"][name].items()} for name in PROJ}}
    return {"params": params}


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_stacked_save_loads_in_peft_with_same_outputs(rng, tmp_path, kind):
    d, n = 16, 3
    cfg = qjax.LoraConfig(r=4, alpha=8)
    model, forward = _stacked_model(kind, rng, d, n, cfg, seed=1)
    model = _randomized(rng, model)
    names = qjax.interop.save_peft_adapter(tmp_path, model, cfg)
    layer = "layers_2" if kind == "linen" else "layers/2"
    assert names[("params/" if kind == "linen" else "") + f"{layer}/self_attn/v_proj"] == \
        "model.layers.2.self_attn.v_proj"
    assert len(names) == n * len(PROJ)
    stack = model["params"]["layers"] if kind == "linen" else nnx.to_pure_dict(nnx.state(model))["layers"]
    flat = _unstacked(stack, n)
    # the same file as the adapters of the unscanned model, bit for bit
    qjax.interop.save_peft_adapter(tmp_path / "flat", flat, cfg)
    ours, ref = (qjax.interop.load_safetensors(p / "adapter_model.safetensors") for p in (tmp_path, tmp_path / "flat"))
    assert set(ours) == set(ref) and all(ours[k].tobytes() == ref[k].tobytes() for k in ref)
    # PEFT matches every module of the unscanned torch model and computes what the scanned qjax model does
    peft_model = peft.PeftModel.from_pretrained(_torch_base(flat, d, n), tmp_path).eval()
    check = peft_model.load_adapter(tmp_path, adapter_name="check")
    assert not check.missing_keys and not check.unexpected_keys
    x = rng.standard_normal((5, d)).astype(np.float32)
    with torch.no_grad():
        want = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    lora_b = peft_model.base_model.model.model.layers[2].self_attn.v_proj.lora_B["default"].weight.detach().numpy()
    np.testing.assert_array_equal(lora_b.T, np.asarray(stack["self_attn"]["v_proj"]["lora_b"][2]))


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_stacked_round_trip(rng, tmp_path, kind):
    d, n = 16, 2
    cfg = qjax.LoraConfig(r=4, alpha=8)
    model = _randomized(rng, _stacked_model(kind, rng, d, n, cfg, seed=1, general=True)[0])
    qjax.interop.save_peft_adapter(tmp_path, model, cfg)
    tensors = qjax.interop.load_safetensors(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * n * len(PROJ)
    # DenseGeneral / LinearGeneral q_proj: lora_b (L, r, 2, d // 2) is one (d, r) Linear per layer
    assert [v.shape for p, v in ad.flat_adapters(model).items() if p[-2:] == ("q_proj", "lora_b")] == [(n, 4, 2, d // 2)]
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (d, 4)
    fresh = _stacked_model(kind, rng, d, n, cfg, seed=2, general=True)[0]
    loaded = qjax.interop.load_peft_adapter(tmp_path, fresh, cfg)
    want, got = ad.flat_adapters(model), ad.flat_adapters(loaded)
    assert set(got) == set(want)
    for p, v in want.items():
        assert got[p].dtype == v.dtype and np.asarray(got[p]).tobytes() == np.asarray(v).tobytes()


def _adapter(rng, *lead, d=16, r=4):
    return {"lora_a": jnp.asarray(rng.standard_normal((*lead, d, r)), jnp.float32),
            "lora_b": jnp.asarray(rng.standard_normal((*lead, r, d)), jnp.float32)}


def test_stacked_errors_name_path_and_shapes(rng, tmp_path):
    cfg = qjax.LoraConfig(r=4, alpha=8)
    stacked = lambda n, r=4: {"params": {"layers": {"self_attn": {"q_proj": _adapter(rng, n, r=r)}}}}
    shapes = r"\(lora_a shape=\(2, 16, 4\), lora_b shape=\(2, 4, 16\)\)"
    with pytest.raises(ValueError, match=rf"'params/layers/self_attn/q_proj' has stacked adapters {shapes} "
                                         r"and 0 path components named stacked_module='blocks'"):
        qjax.interop.save_peft_adapter(tmp_path, stacked(2), cfg, stacked_module="blocks")
    with pytest.raises(ValueError, match=rf"'params/layers/layers/q_proj' has stacked adapters {shapes} "
                                         r"and 2 path components named stacked_module='layers'"):
        qjax.interop.save_peft_adapter(tmp_path, {"params": {"layers": {"layers": {"q_proj": _adapter(rng, 2)}}}}, cfg)
    with pytest.raises(ValueError, match=r"'params/layers/q_proj' has stacked adapters \(lora_a shape=\(2, 3, 16, 4\), "
                                         r"lora_b shape=\(2, 3, 4, 16\)\) with 2 stacked axes"):
        qjax.interop.save_peft_adapter(tmp_path, {"params": {"layers": {"q_proj": _adapter(rng, 2, 3)}}}, cfg)
    clash = stacked(2)
    clash["params"]["layers_1"] = {"self_attn": {"q_proj": _adapter(rng)}}
    with pytest.raises(ValueError, match=r"'params/layers_1/self_attn/q_proj' both map to torch module "
                                         r"'model\.layers\.1\.self_attn\.q_proj'"):
        qjax.interop.save_peft_adapter(tmp_path, clash, cfg)
    # another scan name, both ways
    blocks = {"params": {"blocks": {"attn": _adapter(rng, 2)}}}
    names = qjax.interop.save_peft_adapter(tmp_path / "b", blocks, cfg, stacked_module="blocks")
    assert names == {"params/blocks_0/attn": "model.blocks_0.attn", "params/blocks_1/attn": "model.blocks_1.attn"}
    back = qjax.interop.load_peft_adapter(tmp_path / "b", _randomized(rng, blocks), cfg, stacked_module="blocks")
    assert np.asarray(back["params"]["blocks"]["attn"]["lora_b"]).tobytes() == \
        np.asarray(blocks["params"]["blocks"]["attn"]["lora_b"]).tobytes()
    # loading into stacks of another depth or rank
    qjax.interop.save_peft_adapter(tmp_path, stacked(2), cfg)
    with pytest.raises(ValueError, match=r"params/layers_2/self_attn/q_proj/lora_a: "
                                         r"'base_model\.model\.model\.layers\.2\.self_attn\.q_proj\.lora_A\.weight' "
                                         r"is not in the file"):
        qjax.interop.load_peft_adapter(tmp_path, stacked(3))
    with pytest.raises(ValueError, match=r"file tensors with no adapter in the model.*layers\.1\.self_attn"):
        qjax.interop.load_peft_adapter(tmp_path, stacked(1))
    with pytest.raises(ValueError, match=r"params/layers_0/self_attn/q_proj/lora_a: file has shape=\(16, 4\) "
                                         r"\(as lora_a\), model has shape=\(16, 8\) \(layer 0 of "
                                         r"'params/layers/self_attn/q_proj', shape=\(2, 16, 8\)\)"):
        qjax.interop.load_peft_adapter(tmp_path, stacked(2, r=8))
    with pytest.raises(ValueError, match="0 path components named stacked_module='blocks'"):
        qjax.interop.load_peft_adapter(tmp_path, stacked(2), stacked_module="blocks")


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_stacked_merged_export_is_per_layer(rng, kind):
    """merged_state_dict splits a scanned / vmapped stack into one torch module per layer: each
    weight is that layer's dequantized kernel + scaling * A_i @ B_i, named model.layers.{i}...."""
    cfg = qjax.LoraConfig(r=4, alpha=8)
    tree, _ = _stacked_model(kind, rng, 16, 3, cfg, seed=5)
    tree = _randomized(rng, tree)
    sd = qjax.interop.merged_state_dict(tree, cfg, dtype=jnp.float32)
    flat = ad.flat_adapters(tree)
    kernels = {paths.path_keys(p)[-2]: x for p, x in jax.tree_util.tree_flatten_with_path(
        ad.as_tree(nnx.state(tree)) if kind == "nnx" else tree, is_leaf=qjax.is_quantized)[0]
        if paths.path_keys(p)[-1] == "kernel"}
    for i in range(3):
        for name in PROJ:
            key = f"model.layers.{i}.self_attn.{name}.weight"
            path = next(p for p in flat if p[-2] == name and p[-1] == "lora_a")
            a, b = np.asarray(flat[path])[i], np.asarray(flat[path[:-1] + ("lora_b",)])[i]
            w = np.asarray(qjax.dequantize(kernels[name], jnp.float32))[i] + cfg.scaling * (a @ b)
            np.testing.assert_allclose(sd[key], w.T, rtol=1e-6, atol=1e-7)
    assert not any(".layers.self_attn" in k for k in sd)
    with pytest.raises(ValueError, match="stacked adapters"):
        qjax.interop.merged_state_dict(tree, cfg, stacked_module=None)
