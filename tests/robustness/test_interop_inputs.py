"""Bad and mismatched inputs to the PyTorch-ecosystem interop and adapter checkpoints: each gives an
error that names the file / key, shape and dtype, or loads exactly; never a silent wrong answer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
import qjax.nnx as qn
from qjax._src.adapters import tree as ad
from qlora_trees import apply, qlora_variables

F32 = qjax.QuantConfig(compute_dtype=jnp.float32)
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


class _Net(nnx.Module):
    def __init__(self, d, rngs):
        self.q_proj = nnx.Linear(d, d, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return self.v_proj(jnp.tanh(self.q_proj(x)))


def _randomized(rng, tree):
    new = {p: jnp.asarray(rng.standard_normal(np.shape(v)).astype(np.float32) * 0.1)
           for p, v in ad.flat_adapters(tree).items()}
    return ad.replace_adapters(tree, new)


def _nnx(rng, cfg, seed, d=16):
    """A converted NNX _Net whose base weights depend on `seed` only, with random adapters."""
    model = qn.convert(_Net(d, nnx.Rngs(seed)), cfg, F32, nnx.Rngs(seed + 1))
    return _randomized(rng, model)


def _peft_dir(tmp_path, rng, cfg=qjax.LoraConfig(r=4, alpha=8), **edit):
    """A PEFT adapter directory of qlora_variables(r=cfg.r); `edit` overrides adapter_config.json entries."""
    qjax.interop.save_peft_adapter(tmp_path, qlora_variables(rng, r=cfg.r, layers=1), cfg)
    if edit:
        f = tmp_path / "adapter_config.json"
        f.write_text(json.dumps(dict(json.loads(f.read_text()), **edit)))
    return tmp_path


def _edit_tensors(directory, fn):
    tensors = qjax.interop.load_safetensors(directory / "adapter_model.safetensors")
    fn(tensors)
    qjax.interop.save_safetensors(directory / "adapter_model.safetensors", tensors)


# ----------------------------------------------------------------------------- scaling (r, alpha, use_rslora)


def test_nnx_model_with_other_alpha_raises_naming_both(rng, tmp_path):
    """A PEFT file trained with alpha 32 loaded into a model converted with alpha 16 was 2x off, silently."""
    src = _nnx(rng, qjax.LoraConfig(r=4, alpha=32), seed=3)
    qjax.interop.save_peft_adapter(tmp_path, src, qjax.LoraConfig(r=4, alpha=32), name_map=qjax.interop.IDENTITY)
    dst = _nnx(rng, qjax.LoraConfig(r=4, alpha=16), seed=3)
    match = (r"\['q_proj', 'v_proj'\] apply r=4, alpha=16, use_rslora=False \(scaling 4\) in the model, but the "
             r"file records r=4, alpha=32, use_rslora=False \(scaling 8\)")
    for cfg in (None, qjax.LoraConfig(r=4, alpha=32)):  # passing the file's config does not hide the model's
        with pytest.raises(ValueError, match=match):
            qjax.interop.load_peft_adapter(tmp_path, dst, cfg, name_map=qjax.interop.IDENTITY)
    rs = _nnx(rng, qjax.LoraConfig(r=4, alpha=32, use_rslora=True), seed=3)
    with pytest.raises(ValueError, match=r"use_rslora=True \(scaling 16\) in the model"):
        qjax.interop.load_peft_adapter(tmp_path, rs, name_map=qjax.interop.IDENTITY)
    # the same scaling loads without lora_config, and computes what the source computes
    same = _nnx(rng, qjax.LoraConfig(r=4, alpha=32), seed=3)
    qjax.interop.load_peft_adapter(tmp_path, same, name_map=qjax.interop.IDENTITY)
    x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(same(x)), np.asarray(src(x)))


def test_linen_variables_need_lora_config(rng, tmp_path):
    """Linen variables do not record the scaling: loading without lora_config was a silent guess."""
    d = _peft_dir(tmp_path, rng, qjax.LoraConfig(r=4, alpha=32))
    variables = qlora_variables(rng, r=4, layers=1)
    with pytest.raises(ValueError, match=r"not recorded in Linen variables.*pass lora_config=.*the file has r=4, "
                                         r"alpha=32, use_rslora=False \(scaling 8\)"):
        qjax.interop.load_peft_adapter(d, variables)
    with pytest.raises(ValueError, match="alpha: file 32, given 16"):
        qjax.interop.load_peft_adapter(d, variables, qjax.LoraConfig(r=4, alpha=16))
    cfg = qjax.interop.read_peft_config(d)
    loaded = qjax.interop.load_peft_adapter(d, variables, cfg)
    src = qjax.interop.load_safetensors(d / "adapter_model.safetensors")
    np.testing.assert_array_equal(np.asarray(loaded["params"]["layers_0"]["self_attn"]["q_proj"]["lora_a"]),
                                  src[KEY].T)
    with pytest.raises(TypeError, match="lora_config must be a qjax.LoraConfig, got dict"):
        qjax.interop.load_peft_adapter(d, variables, {"r": 4, "lora_alpha": 32})


def test_adapter_checkpoint_scaling_checked(rng, tmp_path):
    """qjax's own adapter checkpoints: the same rule as PEFT files (NNX layers checked, Linen needs the config)."""
    src = _nnx(rng, qjax.LoraConfig(r=4, alpha=32), seed=5)
    qjax.checkpoint.save_adapters(tmp_path / "n", src, qjax.LoraConfig(r=4, alpha=32))
    with pytest.raises(qjax.checkpoint.CheckpointError, match=r"alpha=16.*in the model, but the checkpoint records "
                                                                 r"r=4, alpha=32, use_rslora=False \(scaling 8\)"):
        qjax.checkpoint.load_adapters(tmp_path / "n", _nnx(rng, qjax.LoraConfig(r=4, alpha=16), seed=5))
    same = _nnx(rng, qjax.LoraConfig(r=4, alpha=32), seed=5)
    assert qjax.checkpoint.load_adapters(tmp_path / "n", same) is same
    x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(same(x)), np.asarray(src(x)))
    cfg = qjax.LoraConfig(r=4, alpha=8)
    qjax.checkpoint.save_adapters(tmp_path / "l", qlora_variables(rng, r=4, layers=1), cfg)
    with pytest.raises(qjax.checkpoint.CheckpointError, match=r"not recorded in Linen variables.*pass lora_config="):
        qjax.checkpoint.load_adapters(tmp_path / "l", qlora_variables(rng, r=4, layers=1))
    with pytest.raises(TypeError, match="lora_config must be a qjax.LoraConfig, got str"):
        qjax.checkpoint.load_adapters(tmp_path / "l", qlora_variables(rng, r=4, layers=1), "r=4")


def test_rank_mismatch_names_both_ranks_and_module(rng, tmp_path):
    d = _peft_dir(tmp_path, rng, qjax.LoraConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match=r"params/layers_0/self_attn/q_proj/lora_a: file has shape=\(32, 4\).*"
                                         rf"'{KEY}' \(shape=\(4, 32\) dtype=float32\); LoRA rank r=4 in the file, "
                                         r"r=8 in the model"):
        qjax.interop.load_peft_adapter(d, qlora_variables(rng, r=8, layers=1))


def test_config_rank_differs_from_tensors(rng, tmp_path):
    """adapter_config.json r=8 over rank-4 tensors: PEFT would apply alpha / 8 to them."""
    d = _peft_dir(tmp_path, rng, qjax.LoraConfig(r=4, alpha=8), r=8)
    with pytest.raises(ValueError, match=rf"says r=8, but '{KEY}' \(shape=\(4, 32\) dtype=float32\) has rank 4"):
        qjax.interop.load_peft_adapter(d, qlora_variables(rng, r=4, layers=1), qjax.LoraConfig(r=8, alpha=8))


# ----------------------------------------------------------------------------- tensors: dtype, NaN, overflow


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_non_float_tensor_raises(rng, tmp_path, dtype):
    d = _peft_dir(tmp_path, rng)
    _edit_tensors(d, lambda t: t.__setitem__(KEY, (rng.standard_normal(t[KEY].shape) > 0).astype(dtype)))
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=rf"'{KEY}' \(shape=\(4, 32\) dtype={name}\): adapters are float"):
        qjax.interop.load_peft_adapter(d, qlora_variables(rng, r=4, layers=1), qjax.LoraConfig(r=4, alpha=8))


def test_nan_and_inf_tensors_raise_with_counts(rng, tmp_path):
    d = _peft_dir(tmp_path, rng)

    def poison(t):
        t[KEY] = t[KEY].copy()
        t[KEY][0, :3] = np.nan
        t[KEY][1, 0] = np.inf

    _edit_tensors(d, poison)
    with pytest.raises(ValueError, match=rf"'{KEY}' \(shape=\(4, 32\) dtype=float32\) holds 3 NaN and 1 Inf values"):
        qjax.interop.load_peft_adapter(d, qlora_variables(rng, r=4, layers=1), qjax.LoraConfig(r=4, alpha=8))


def test_values_overflowing_the_model_dtype_raise(rng, tmp_path):
    d = _peft_dir(tmp_path, rng)
    _edit_tensors(d, lambda t: t.__setitem__(KEY, t[KEY] + np.float32(1e5)))
    half = ad.replace_adapters(qlora_variables(rng, r=4, layers=1), {
        p: v.astype(jnp.float16) for p, v in ad.flat_adapters(qlora_variables(rng, r=4, layers=1)).items()})
    with pytest.raises(ValueError, match=r"overflows the model's adapter dtype.*'params/layers_0/self_attn/q_proj/"
                                         r"lora_a' \(shape=\(32, 4\) dtype=float16\) holds 0 NaN and 128 Inf"):
        qjax.interop.load_peft_adapter(d, half, qjax.LoraConfig(r=4, alpha=8))


# ----------------------------------------------------------------------------- adapter_config.json


@pytest.mark.parametrize("text,err,match", [
    ("[1, 2]", ValueError, "holds a JSON list, not the object"),
    ("{\"r\": 4", ValueError, "is not valid JSON"),
    ("{\"lora_alpha\": 8}", ValueError, "has no 'r' value"),
    ("{\"r\": 4}", ValueError, "has no 'lora_alpha' value"),
    ("{\"r\": \"8\", \"lora_alpha\": 8}", TypeError, r"r='8' \(str\) must be a JSON integer"),
    ("{\"r\": 4.0, \"lora_alpha\": 8}", TypeError, r"r=4.0 \(float\) must be a JSON integer"),
    ("{\"r\": 4, \"lora_alpha\": true}", TypeError, r"lora_alpha=True \(bool\) must be a JSON number"),
    ("{\"r\": 4, \"lora_alpha\": 8, \"use_rslora\": \"yes\"}", TypeError, r"use_rslora='yes' \(str\)"),
    ("{\"r\": 4, \"lora_alpha\": 8, \"lora_dropout\": 1.5}", ValueError, "dropout must be in"),
    ("{\"r\": 0, \"lora_alpha\": 8}", ValueError, "r must be a positive int"),
    ("{\"r\": 4, \"lora_alpha\": 8, \"target_modules\": 5}", TypeError, "target_modules=5 must be a regex string"),
])
def test_bad_config_json_names_file_and_entry(tmp_path, text, err, match):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(err, match=match) as e:
        qjax.interop.read_peft_config(tmp_path)
    assert "adapter_config.json" in str(e.value)


@pytest.mark.parametrize("entry", [
    {"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"lora_bias": True}, {"bias": "all"},
    {"init_lora_weights": "pissa"}, {"init_lora_weights": "pissa_niter_4"}, {"init_lora_weights": "olora"},
    {"trainable_token_indices": [1, 2]}, {"layer_replication": [[0, 2]]}, {"target_parameters": ["experts"]},
    {"alpha_pattern": {"q_proj": 4}},
])
def test_unsupported_peft_features_raise(rng, tmp_path, entry):
    """Each changes what PEFT computes; read as plain LoRA they were silent wrong answers."""
    d = _peft_dir(tmp_path, rng, **entry)
    key = next(iter(entry))
    with pytest.raises(ValueError, match=rf"uses PEFT features qjax adapters do not support.*{key}="):
        qjax.interop.load_peft_adapter(d, qlora_variables(rng, r=4, layers=1), qjax.LoraConfig(r=4, alpha=8))


def test_exclude_modules_is_read(rng, tmp_path):
    d = _peft_dir(tmp_path, rng, exclude_modules=["v_proj"], target_modules="all-linear")
    cfg = qjax.interop.read_peft_config(d)
    assert cfg.exclude == ("*v_proj",) and cfg.target_modules == "all-linear"


# ----------------------------------------------------------------------------- bitsandbytes state dicts


def _bnb(rng, double_quant=True):
    w = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))
    q = qjax.quantize(w, "nf4", blocksize=64, double_quant=double_quant, transposed=True)
    return q, qjax.interop.bnb_weight(q), qjax.interop.bnb_state_dict(q)


def _with_blob(sd, **change):
    key = "quant_state.bitsandbytes__nf4"
    blob = json.loads(bytes(sd[key]).decode())
    blob.update(change)
    blob = {k: v for k, v in blob.items() if v is not None}
    return dict(sd, **{key: np.frombuffer(json.dumps(blob).encode(), np.uint8).copy()})


def test_bnb_state_dict_damage_is_named(rng):
    q, packed, sd = _bnb(rng)
    cases = [
        (_with_blob(sd, shape=None), r"quant_state.bitsandbytes__nf4 lacks \['shape'\]"),
        (_with_blob(sd, blocksize=None), r"lacks \['blocksize'\]"),
        (_with_blob(sd, shape=[-32, 64]), r"shape=\[-32, 64\]; expected a list of positive ints"),
        (_with_blob(sd, blocksize=0), r"blocksize=0; expected one of"),
        (_with_blob(sd, dtype="int8"), r"quant_state.bitsandbytes__nf4: bitsandbytes state dict has dtype 'int8'"),
        (_with_blob(sd, nested_offset=None), r"nested_offset=None but the state dict has nested_absmax"),
        (_with_blob(sd, nested_blocksize=128), r"nested_blocksize=128"),
        (_with_blob(sd, quant_type="int4"), r"quant_type='int4'"),
        ({k: v for k, v in sd.items() if k != "absmax"}, r"no 'absmax' entry .* shape \(64, 32\)"),
        (dict(sd, nested_quant_map=np.zeros(256, np.float32)), r"nested_quant_map \(shape=\(256,\) dtype=float32\)"),
        (dict(sd, nested_absmax=np.full_like(sd["nested_absmax"], np.nan)),
         r"nested_absmax \(shape=\(1,\) dtype=float32\) holds 1 NaN"),
        (dict(sd, **{"quant_state.bitsandbytes__nf4": np.frombuffer(b"[1, 2]", np.uint8)}), r"holds a JSON list"),
        (dict(sd, **{"quant_state.bitsandbytes__nf4": np.zeros(4, np.float32)}),
         r"\(shape=\(4,\) dtype=float32\) must hold the uint8 bytes"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            qjax.interop.from_bnb_state_dict(packed, bad, transposed=True)
    _, packed1, sd1 = _bnb(rng, double_quant=False)
    absmax = sd1["absmax"].copy()
    absmax[2] = np.inf
    with pytest.raises(ValueError, match=r"absmax \(shape=\(32,\) dtype=float32\) holds 1 NaN / Inf"):
        qjax.interop.from_bnb_state_dict(packed1, dict(sd1, absmax=absmax), transposed=True)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        qjax.interop.from_bnb_state_dict(packed, list(sd.items()))
    back = qjax.interop.from_bnb_state_dict(packed, sd, transposed=True)
    np.testing.assert_array_equal(np.asarray(back.absmax), np.asarray(q.absmax))


UP = "model.layers.0.mlp.up_proj.weight"


def _bnb_model(rng):
    q, _, _ = _bnb(rng)
    return qjax.interop.bnb_model_state_dict({"params": {"layers_0": {"mlp": {"up_proj": {"kernel": q}}}}})


def test_dropped_quant_state_is_not_a_uint8_kernel(rng):
    sd = _bnb_model(rng)
    no_state = {k: v for k, v in sd.items() if "quant_state" not in k}
    with pytest.raises(ValueError, match=rf"'{UP}.absmax' \(shape=\(32,\) dtype=uint8\).*: bitsandbytes 4-bit "
                                         rf"statistics of '{UP}', but .* no '{UP}.quant_state.bitsandbytes__nf4\|fp4'"):
        qjax.interop.from_torch_state_dict(no_state)
    bare = {UP: sd[UP]}  # every statistic dropped: the packed bytes alone became a (1, 1024) uint8 kernel
    with pytest.raises(ValueError, match=rf"'{UP}' \(shape=\(1024, 1\) dtype=uint8\) looks like a packed "
                                         r"bitsandbytes 4-bit weight"):
        qjax.interop.from_torch_state_dict(bare)
    ints = {"model.norm.weight": rng.integers(0, 5, (8,))}
    with pytest.raises(TypeError, match=r"'model.norm.weight' \(shape=\(8,\) dtype=int64\) is not a float tensor"):
        qjax.interop.from_torch_state_dict(ints)
    with pytest.raises(TypeError, match="state_dict must be a dict of torch tensors"):
        qjax.interop.from_torch_state_dict([("model.norm.weight", np.ones(8))])
    back = qjax.interop.from_torch_state_dict(sd)
    assert qjax.is_quantized(back["params"]["layers_0"]["mlp"]["up_proj"]["kernel"])


def test_truncated_safetensors_is_named(rng, tmp_path):
    d = _peft_dir(tmp_path, rng)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(ValueError, match="adapter_model.safetensors' is not a readable safetensors file"):
        qjax.interop.load_peft_adapter(d, qlora_variables(rng, r=4, layers=1), qjax.LoraConfig(r=4, alpha=8))


# ----------------------------------------------------------------------------- keys on either side


def test_unknown_and_missing_modules_are_named(rng, tmp_path):
    d = _peft_dir(tmp_path, rng)
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    _edit_tensors(d, lambda t: t.__setitem__(extra, rng.standard_normal((4, 32)).astype(np.float32)))
    with pytest.raises(ValueError, match=rf"no adapter in the model: '{extra}' \(shape=\(4, 32\) dtype=float32\) "
                                         r"\(another name_map"):
        qjax.interop.load_peft_adapter(d, qlora_variables(rng, r=4, layers=1), qjax.LoraConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match=r"params/layers_1/self_attn/q_proj/lora_a: .*layers\.1.* is not in the file"):
        qjax.interop.load_peft_adapter(d, qlora_variables(rng, r=4, layers=2), qjax.LoraConfig(r=4, alpha=8))


# ----------------------------------------------------------------------------- writing


def test_save_peft_adapter_refuses_bad_adapters(rng, tmp_path):
    cfg = qjax.LoraConfig(r=4, alpha=8)
    v = qlora_variables(rng, r=4, layers=1)
    nan = ad.replace_adapters(v, {("params", "layers_0", "self_attn", "v_proj", "lora_b"):
                                  jnp.full((4, 32), jnp.nan, jnp.float32)})
    with pytest.raises(ValueError, match=r"'params/layers_0/self_attn/v_proj/lora_b' \(shape=\(4, 32\) "
                                         r"dtype=float32\) holds 128 NaN"):
        qjax.interop.save_peft_adapter(tmp_path / "nan", nan, cfg)
    with pytest.raises(TypeError, match=r"dtype=<class 'numpy.int8'> must be a float dtype"):
        qjax.interop.save_peft_adapter(tmp_path / "i", v, cfg, dtype=np.int8)
    big = ad.replace_adapters(v, {("params", "layers_0", "self_attn", "v_proj", "lora_b"):
                                  jnp.full((4, 32), 1e6, jnp.float32)})
    with pytest.raises(ValueError, match=r"overflow dtype=float16.*v_proj.lora_B.weight' \(shape=\(32, 4\) "
                                         r"dtype=float16\) holds 0 NaN and 128 Inf"):
        qjax.interop.save_peft_adapter(tmp_path / "h", big, cfg, dtype=np.float16)
    with pytest.raises(TypeError, match="lora_config must be a qjax.LoraConfig, got dict"):
        qjax.interop.save_peft_adapter(tmp_path / "d", v, {"r": 4})
    model = _nnx(rng, qjax.LoraConfig(r=4, alpha=32), seed=1)
    with pytest.raises(ValueError, match=r"alpha=32, use_rslora=False \(scaling 8\) in the model, but the "
                                         r"lora_config passed records r=4, alpha=8"):
        qjax.interop.save_peft_adapter(tmp_path / "n", model, cfg, name_map=qjax.interop.IDENTITY)
    assert not any((tmp_path / n).exists() for n in ("nan", "i", "h", "d", "n"))


def test_merged_export_checks_lora_config(rng):
    v = qlora_variables(rng, r=4, layers=1)
    with pytest.raises(ValueError, match=r"params/layers_0/self_attn/q_proj: adapters of rank 4 .*lora_config.r=8"):
        qjax.interop.merged_state_dict(v, qjax.LoraConfig(r=8, alpha=16))
    with pytest.raises(TypeError, match="lora_config must be a qjax.LoraConfig, got NoneType"):
        qjax.interop.merged_state_dict(v, None)
    model = _nnx(rng, qjax.LoraConfig(r=4, alpha=32), seed=1)
    with pytest.raises(ValueError, match=r"merged weights would use another scaling.*\['q_proj', 'v_proj'\] apply "
                                         r"r=4, alpha=32, use_rslora=False \(scaling 8\) in the model, but the "
                                         r"lora_config passed records r=4, alpha=8"):
        qjax.interop.merged_state_dict(model, qjax.LoraConfig(r=4, alpha=8), name_map=qjax.interop.IDENTITY)
    sd = qjax.interop.merged_state_dict(v, qjax.LoraConfig(r=4, alpha=8), dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
    w = sd["model.layers.0.self_attn.q_proj.weight"]
    layer = v["params"]["layers_0"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(np.asarray(x) @ w.T + np.asarray(layer["bias"])[None],
                               np.asarray(qjax.qmatmul(x, layer["kernel"]) + layer["bias"][None]
                                          + 2.0 * (x @ layer["lora_a"]) @ layer["lora_b"]), rtol=1e-4, atol=1e-4)


def test_name_map_rules_checked_up_front():
    with pytest.raises(TypeError, match=r"NameMap.to_torch_rules holds '\^params/'; each rule is a \(regex, "
                                        "replacement\\) pair"):
        qjax.interop.NameMap(to_torch_rules=(r"^params/", ""))
    with pytest.raises(ValueError, match=r"NameMap.to_flax_rules rule \('\(', 'x'\): '\(' is not a valid regex"):
        qjax.interop.NameMap(to_flax_rules=(("(", "x"),))
    assert qjax.interop.NameMap(to_torch_rules=[[r"^params/", ""]]).to_torch("params/a/b") == "a.b"


# ----------------------------------------------------------------------------- adapter checkpoint metadata


def _damage_metadata(path, fn):
    f = next(p for p in path.rglob("_CHECKPOINT_METADATA"))
    doc = json.loads(f.read_text())
    fn(doc["custom_metadata"]["qjax_adapters"])
    f.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage,match", [
    (lambda m: m["lora_config"].update(r="8"), r"LoraConfig stored in .* is not a valid LoraConfig .*r"),
    (lambda m: m.update(lora_config=[1]), r"LoraConfig stored in .* is a JSON list"),
    (lambda m: m["adapters"][0].pop("shape"), r"adapter entry .* is damaged"),
    (lambda m: m["adapters"][0].update(dtype="float99"), r"adapter entry .*float99.* is damaged"),
])
def test_damaged_adapter_metadata_is_named(rng, tmp_path, damage, match):
    cfg = qjax.LoraConfig(r=4, alpha=8)
    qjax.checkpoint.save_adapters(tmp_path / "a", qlora_variables(rng, r=4, layers=1), cfg)
    _damage_metadata(tmp_path / "a", damage)
    with pytest.raises(qjax.checkpoint.CheckpointError, match=match):
        qjax.checkpoint.load_adapters(tmp_path / "a", qlora_variables(rng, r=4, layers=1), cfg)


def test_linen_forward_matches_after_load(rng, tmp_path):
    """The documented Linen call form with lora_config: exact load, same outputs as the saved model."""
    cfg = qjax.LoraConfig(r=4, alpha=8)
    src = qlora_variables(rng, r=4, layers=2)
    qjax.interop.save_peft_adapter(tmp_path, src, cfg)
    fresh = jax.tree_util.tree_map(lambda x: x, src)
    fresh = _randomized(rng, fresh)
    loaded = qjax.interop.load_peft_adapter(tmp_path, fresh, cfg)
    x = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(apply(loaded, x, cfg.scaling)), np.asarray(apply(src, x, cfg.scaling)))


def test_merged_export_refuses_integer_dtype(rng):
    """dtype=int8 cast the merged float weights to integers, silently."""
    with pytest.raises(TypeError, match=r"dtype=<class 'jax.numpy.int8'> must be a float dtype"):
        qjax.interop.merged_state_dict(qlora_variables(rng, r=4, layers=1), qjax.LoraConfig(r=4, alpha=8),
                                       dtype=jnp.int8)


def test_safetensors_helpers_name_the_problem(rng, tmp_path):
    with pytest.raises(TypeError, match=r"would get 'b' \(type=str\), 'c' \(type=NoneType\)"):
        qjax.interop.save_safetensors(tmp_path / "x.safetensors", {"a": rng.standard_normal(3), "b": "w", "c": None})
    d = _peft_dir(tmp_path / "p", rng)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"adapter_model.bin' exists \(PyTorch's pickle format.*"
                                                "safe_serialization=True"):
        qjax.interop.load_peft_adapter(d, qlora_variables(rng, r=4, layers=1), qjax.LoraConfig(r=4, alpha=8))


def test_save_merged_checks_before_writing(rng, tmp_path):
    """A bad hf_config failed after model.safetensors was written (a directory without config.json)."""
    v = qlora_variables(rng, r=4, layers=1)
    with pytest.raises(TypeError, match="hf_config must be a dict .* got list"):
        qjax.interop.save_merged(tmp_path / "m", v, qjax.LoraConfig(r=4, alpha=8), hf_config=[("a", 1), "b"])
    with pytest.raises(ValueError, match="adapters of rank 4"):
        qjax.interop.save_merged(tmp_path / "m", v, qjax.LoraConfig(r=8, alpha=16))
    assert not (tmp_path / "m").exists()
