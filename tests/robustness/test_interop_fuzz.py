"""Fuzzing the readers of bitsandbytes state dicts and PEFT adapter directories with damaged inputs.

Property: each input gives either a clear error (ValueError / TypeError whose message names the
damaged entry) or a correct load (exactly the bytes / values given, nothing guessed).
"""

import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import qjax
from qjax._src.adapters import tree as ad
from qlora_trees import qlora_variables

JSON_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                      st.text(max_size=6), st.lists(st.integers(-3, 70), max_size=3),
                      st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
QKEY = {"nf4": "quant_state.bitsandbytes__nf4", "fp4": "quant_state.bitsandbytes__fp4"}


_QUANTIZED = {}


def _quantized(shape, fmt, double_quant):
    """One fresh random weight per (shape, fmt, double_quant) and test run (quantize compiles per shape)."""
    key = (shape, fmt, double_quant)
    if key not in _QUANTIZED:
        x = np.random.default_rng().standard_normal(shape).astype(np.float32)
        _QUANTIZED[key] = qjax.quantize(jnp.asarray(x), fmt, blocksize=32, double_quant=double_quant)
    return _QUANTIZED[key]


def _mutate_array(x: np.ndarray, how: str, rng) -> np.ndarray:
    if how == "shorter":
        return x.reshape(-1)[:-1]
    if how == "longer":
        return np.concatenate([x.reshape(-1), x.reshape(-1)[:1]])
    if how == "nan":
        y = x.astype(np.float32).copy()
        y.reshape(-1)[rng.integers(y.size)] = np.nan
        return y
    return x.astype({"float64": np.float64, "float16": np.float16, "int32": np.int32, "uint8": np.uint8}[how])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from([(16, 64), (9, 40), (64,)]), fmt=st.sampled_from(["nf4", "fp4"]),
       double_quant=st.booleans(), seed=st.integers(0, 2**31 - 1),
       target=st.sampled_from(["drop_key", "blob_field", "drop_field", "blob_bytes", "array"]),
       key_pick=st.integers(0, 10), value=JSON_JUNK, junk=st.binary(max_size=40),
       how=st.sampled_from(["shorter", "longer", "nan", "float64", "float16", "int32", "uint8"]))
def test_from_bnb_state_dict_fuzz(shape, fmt, double_quant, seed, target, key_pick, value, junk, how):
    rng = np.random.default_rng(seed)
    q = _quantized(shape, fmt, double_quant)
    packed, sd = qjax.interop.bnb_weight(q), qjax.interop.bnb_state_dict(q)
    blob = json.loads(bytes(sd[QKEY[fmt]]).decode())
    arrays = [k for k in sd if k != QKEY[fmt]]
    if target == "drop_key":
        named = list(sd)[key_pick % len(sd)]
        del sd[named]
    elif target in ("blob_field", "drop_field"):
        named = list(blob)[key_pick % len(blob)]
        if target == "drop_field":
            del blob[named]
        else:
            blob[named] = value
        sd[QKEY[fmt]] = np.frombuffer(json.dumps(blob).encode(), np.uint8).copy()
    elif target == "blob_bytes":
        named = QKEY[fmt]
        sd[named] = np.frombuffer(junk, np.uint8).copy()
    else:
        named = arrays[key_pick % len(arrays)]
        sd[named] = _mutate_array(np.asarray(sd[named]), how, rng)
    try:
        back = qjax.interop.from_bnb_state_dict(packed, sd)
    except (ValueError, TypeError) as e:
        msg = str(e)
        names = {named, QKEY[fmt]} if target in ("blob_field", "drop_field", "blob_bytes") else {named}
        if named in ("nested_absmax", "nested_quant_map"):
            names.add("nested_absmax")
        assert any(n in msg for n in names), (named, msg)
        event(f"{type(e).__name__} on {target}")
        return
    event(f"loaded after {target}")
    # a correct load: exactly the arrays given, with the static data the (possibly edited) blob records
    final = json.loads(bytes(sd[QKEY[fmt]]).decode())
    assert (back.format, back.blocksize, tuple(back.shape)) == (final["quant_type"], final["blocksize"],
                                                                tuple(final["shape"]))
    assert np.asarray(back.packed).tobytes() == packed.tobytes()
    assert np.asarray(back.absmax).tobytes() == np.asarray(sd["absmax"]).tobytes()
    if back.double_quant:
        assert np.array_equal(np.asarray(back.nested_absmax), np.asarray(sd["nested_absmax"], np.float32))
        assert float(back.offset) == np.float32(final["nested_offset"])
        assert np.isfinite(np.asarray(back.nested_absmax)).all() and np.isfinite(np.asarray(back.offset))
    else:
        assert np.isfinite(np.asarray(back.absmax)).all()


CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules", "exclude_modules", "bias",
               "use_dora", "modules_to_save", "peft_type", "init_lora_weights", "fan_in_fan_out", "lora_bias",
               "rank_pattern", "layers_to_transform"]
CFG = qjax.LoraConfig(r=4, alpha=8)
D = 16


@pytest.fixture(scope="module")
def peft_source():
    """A PEFT directory's files (config dict, tensors) and the Linen variables they fit."""
    rng = np.random.default_rng(0)
    variables = qlora_variables(rng, d=D, r=4, layers=1)
    with tempfile.TemporaryDirectory() as d:
        qjax.interop.save_peft_adapter(d, variables, CFG)
        config = json.loads((Path(d) / "adapter_config.json").read_text())
        tensors = qjax.interop.load_safetensors(Path(d) / "adapter_model.safetensors")
    return config, tensors, variables


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["config_key", "drop_config_key", "config_junk", "tensor", "drop_tensor",
                               "extra_tensor"]),
       key_pick=st.integers(0, 20), value=JSON_JUNK, seed=st.integers(0, 2**31 - 1),
       how=st.sampled_from(["transpose", "row", "nan", "inf", "float16", "float64", "int32", "bool", "rank3"]))
def test_load_peft_adapter_fuzz(peft_source, target, key_pick, value, seed, how):
    config, tensors, variables = peft_source
    config, tensors = dict(config), dict(tensors)
    rng = np.random.default_rng(seed)
    if target == "config_key":
        named = CONFIG_KEYS[key_pick % len(CONFIG_KEYS)]
        config[named] = value
    elif target == "drop_config_key":
        named = CONFIG_KEYS[key_pick % len(CONFIG_KEYS)]
        config.pop(named, None)
    elif target == "config_junk":
        named, config = "adapter_config.json", value
    else:
        named = sorted(tensors)[key_pick % len(tensors)]
        x = tensors[named]
        if target == "drop_tensor":
            del tensors[named]
        elif target == "extra_tensor":
            named = named.replace("q_proj", "k_proj")
            tensors[named] = x
        elif how == "transpose":
            tensors[named] = np.ascontiguousarray(x.T)
        elif how == "row":
            tensors[named] = np.concatenate([x, x[:1]])
        elif how in ("nan", "inf"):
            x = x.copy()
            x[rng.integers(x.shape[0]), rng.integers(x.shape[1])] = np.nan if how == "nan" else -np.inf
            tensors[named] = x
        elif how == "rank3":
            tensors[named] = x[None]
        else:
            tensors[named] = x.astype(how)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "adapter_config.json").write_text(json.dumps(config))
        qjax.interop.save_safetensors(Path(d) / "adapter_model.safetensors", tensors)
        try:
            loaded = qjax.interop.load_peft_adapter(d, variables, CFG)
        except (ValueError, TypeError) as e:
            assert named in str(e), (named, str(e))
            event(f"{type(e).__name__} on {target}")
            return
        event(f"loaded after {target}")
        # a correct load: the file's scaling is the model's and the adapters are the file's, cast to float32
        file_cfg = qjax.interop.read_peft_config(d)
    assert file_cfg.scaling == CFG.scaling and file_cfg.r == CFG.r
    for path, x in ad.flat_adapters(loaded).items():
        key = f"base_model.model.model.layers.0.self_attn.{path[-2]}.lora_{path[-1][-1].upper()}.weight"
        assert x.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(tensors[key], np.float32).T)
