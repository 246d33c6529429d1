"""Bare module names in QuantConfig / QuantRules patterns, and QuantConfig.from_hf / to_hf against
transformers' BitsAndBytesConfig."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax._src.core.policy import DEFAULT_SKIP, HF_ALWAYS_SKIP
from qjax._src.paths import matches, path_str


def _w(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.bfloat16)


def _tree(rng, prefix=True):
    layers = {f"layers_{i}": {"attn": {"q_proj": {"kernel": _w(rng, 32, 64)}, "k_proj": {"kernel": _w(rng, 32, 64)}},
                              "mlp": {"up_proj": {"kernel": _w(rng, 32, 128)}}} for i in range(2)}
    tree = {**layers, "lm_head": {"kernel": _w(rng, 32, 64)}, "lm_head_2": {"kernel": _w(rng, 32, 64)},
            "embed_tokens": {"embedding": _w(rng, 64, 32)}}
    return {"params": tree} if prefix else tree


def _quantized(tree) -> set:
    return {path_str(p).removeprefix("params/") for p, x in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=qjax.is_quantized)[0] if qjax.is_quantized(x)}


ALL = {f"layers_{i}/{m}/kernel" for i in range(2) for m in ("attn/q_proj", "attn/k_proj", "mlp/up_proj")}


# ----------------------------------------------------------------------------- bare names

@pytest.mark.parametrize("prefix", [False, True], ids=["lm_head/kernel", "params/lm_head/kernel"])
def test_skip_bare_name_matches_a_component(rng, prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = qjax.quantize_params(_tree(rng, prefix), qjax.QuantConfig(skip=("lm_head", "*embed*")))
    assert _quantized(out) == ALL | {"lm_head_2/kernel"}  # "lm_head" is not "lm_head_2"


def test_target_bare_name_selects_every_layer(rng):
    out = qjax.quantize_params(_tree(rng), qjax.QuantConfig(target=("q_proj",)))
    assert _quantized(out) == {"layers_0/attn/q_proj/kernel", "layers_1/attn/q_proj/kernel"}
    out = qjax.quantize_params(_tree(rng), qjax.QuantConfig(target="attn"))  # a module: all its kernels
    assert _quantized(out) == {p for p in ALL if "/attn/" in p}
    out = qjax.quantize_params(_tree(rng), qjax.QuantConfig(skip=DEFAULT_SKIP + ("layers_1", "k_proj")))
    assert _quantized(out) == {"layers_0/attn/q_proj/kernel", "layers_0/mlp/up_proj/kernel"}


def test_multi_component_names_match_a_run(rng):
    out = qjax.quantize_params(_tree(rng), qjax.QuantConfig(target=("attn/q_proj", "layers_1/mlp")))
    assert _quantized(out) == {"layers_0/attn/q_proj/kernel", "layers_1/attn/q_proj/kernel",
                               "layers_1/mlp/up_proj/kernel"}
    with pytest.warns(UserWarning, match=r"target pattern 'layers_0/q_proj' matched no parameter path"):
        out = qjax.quantize_params(_tree(rng), qjax.QuantConfig(target=("layers_0/q_proj",)))  # not consecutive
    assert _quantized(out) == set()


def test_matches_names_globs_and_regexes():
    path = "params/layers_0/attn/q_proj/kernel"
    for name in ("q_proj", "attn/q_proj", "params", "kernel", path, "/attn/q_proj/", "Q_PROJ"):
        assert matches(path, name), name
    for name in ("proj", "q_pro", "layers_0/q_proj", "attn/kernel", "params/layers_0/attn/q_proj/kernel/x"):
        assert not matches(path, name), name
    # globs keep matching the whole path, "*" crossing "/"
    assert matches(path, "*q_proj*") and matches(path, "params/*/kernel") and matches(path, "*LAYERS_?/*")
    assert not matches(path, "q_proj*") and not matches(path, "*q_proj") and not matches(path, "attn/[qk]_proj")
    assert matches("attn/k_proj", "attn/[qk]_proj")
    # regexes are searched
    assert matches(path, "re:q_pro") and matches(path, re.compile("attn/q")) and not matches(path, "re:^attn")
    assert matches(path, "re:q_proj/kernel$") and not matches(path, re.compile("Q_PROJ"))
    # names=False: the old meaning (a str without glob characters matches only the whole path)
    assert not matches(path, "q_proj", names=False) and matches(path, path, names=False)
    assert matches(path, "*q_proj*", names=False)


def test_rules_take_bare_names(rng):
    rules = qjax.QuantRules(((("mlp",), qjax.QuantConfig(format="nf2")), (("layers_1/attn",), None)))
    out = qjax.quantize_params(_tree(rng), rules)
    assert _quantized(out) == {p for p in ALL if not p.startswith("layers_1/attn")}
    assert out["params"]["layers_1"]["mlp"]["up_proj"]["kernel"].format == "nf2"
    assert out["params"]["layers_0"]["attn"]["q_proj"]["kernel"].format == "nf4"
    assert not qjax.is_quantized(out["params"]["lm_head"]["kernel"])  # DEFAULT_SKIP's "*lm_head*"


def test_bare_names_that_match_nothing_still_warn(rng):
    with pytest.warns(UserWarning, match=r"target pattern 'up' matched no parameter path; target pattern 'nope' "
                                         r"matched no parameter path\. Paths look like .*a bare name matches whole"):
        out = qjax.quantize_params(_tree(rng), qjax.QuantConfig(target=["up", "nope"]))
    assert _quantized(out) == set()
    with pytest.warns(UserWarning, match=r"skip pattern 'output' matched no parameter path"):
        qjax.quantize_params(_tree(rng), qjax.QuantConfig(skip=DEFAULT_SKIP + ("output",)))
    with pytest.warns(UserWarning, match=r"rules\[0\] pattern 'decoder' matched no parameter path"):
        qjax.quantize_params(_tree(rng), qjax.QuantRules(((("decoder",), None),)))
    with pytest.warns(UserWarning, match=r"target pattern 'embed_tokens' matched only parameters that stay dense"):
        qjax.quantize_params(_tree(rng), qjax.QuantConfig(target="embed_tokens"))  # skipped by DEFAULT_SKIP
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qjax.quantize_params(_tree(rng), qjax.QuantConfig(target=["q_proj", "mlp/up_proj"], skip=("lm_head",)))


# ----------------------------------------------------------------------------- from_hf / to_hf

def _four(quant_type="fp4", double=False, dtype=jnp.float32, skip=DEFAULT_SKIP, threshold=6.0):
    return qjax.QuantConfig(format=quant_type, blocksize=64, double_quant=double, compute_dtype=dtype, skip=skip,
                            llm_int8_threshold=threshold)


def _eight(dtype=jnp.float32, skip=DEFAULT_SKIP, threshold=6.0):
    return qjax.QuantConfig(format="int8", blocksize=None, double_quant=False, compute_dtype=dtype, skip=skip,
                            llm_int8_threshold=threshold)


DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_4bit_round_trip(quant_type, double, dtype):
    d = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": quant_type,
         "bnb_4bit_use_double_quant": double, "bnb_4bit_compute_dtype": dtype}
    q = qjax.QuantConfig.from_hf(d)
    assert q == _four(quant_type, double, DTYPES[dtype])
    assert q.skip == DEFAULT_SKIP and q.target is None and q.blocksize == 64
    assert qjax.QuantConfig.from_hf({**d, "bnb_4bit_compute_dtype": "torch." + dtype}) == q
    out = q.to_hf()
    assert out == {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                   "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None,
                   "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
                   "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double,
                   "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8"}
    assert qjax.QuantConfig.from_hf(out) == q


def test_4bit_defaults_are_transformers_defaults():
    assert qjax.QuantConfig.from_hf({"load_in_4bit": True}) == _four("fp4", False, jnp.float32)
    assert qjax.QuantConfig(double_quant=False, compute_dtype=jnp.float16).to_hf()["bnb_4bit_quant_type"] == "nf4"


@pytest.mark.parametrize("threshold", [6.0, 0.0, 3.5])
@pytest.mark.parametrize("modules", [None, [], ["lm_head"], ["lm_head", "model.layers.0.mlp", "gate"]])
def test_8bit_round_trip(threshold, modules):
    d = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": threshold,
         "llm_int8_skip_modules": modules, "bnb_4bit_compute_dtype": "float16"}
    q = qjax.QuantConfig.from_hf(d)
    skip = DEFAULT_SKIP if modules is None else tuple(m.replace(".", "/") for m in modules) + HF_ALWAYS_SKIP
    assert q == _eight(jnp.float16, skip, threshold) and q.is_llm_int8
    out = q.to_hf()
    assert out["load_in_8bit"] and not out["load_in_4bit"] and out["llm_int8_threshold"] == threshold
    assert out["llm_int8_skip_modules"] == modules and out["bnb_4bit_compute_dtype"] == "float16"
    assert qjax.QuantConfig.from_hf(out) == q


def test_skip_modules_as_bare_names(rng):
    q = qjax.QuantConfig.from_hf({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                  "llm_int8_skip_modules": ["lm_head", "layers_1.attn"]})
    assert q.skip == ("lm_head", "layers_1/attn") + HF_ALWAYS_SKIP
    out = qjax.quantize_params(_tree(rng), q)
    assert _quantized(out) == {p for p in ALL if not p.startswith("layers_1/attn")} | {"lm_head_2/kernel"}
    # an explicit list replaces transformers' head default, as in transformers: lm_head is quantized
    q = qjax.QuantConfig.from_hf({"load_in_4bit": True, "llm_int8_skip_modules": ["mlp"]})
    assert "lm_head/kernel" in _quantized(qjax.quantize_params(_tree(rng), q))
    assert "embed_tokens/embedding" not in _quantized(qjax.quantize_params(_tree(rng), q))
    # DEFAULT_SKIP plus names: "*lm_head*" is written as "lm_head"
    assert qjax.QuantConfig(skip=DEFAULT_SKIP + ("mlp", "layers_0/attn")).to_hf()["llm_int8_skip_modules"] == \
        ["lm_head", "mlp", "layers_0.attn"]


def test_from_hf_takes_a_config_object_and_enum_method():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert qjax.QuantConfig.from_hf(cfg) == _four("nf4")
    assert qjax.QuantConfig.from_hf(cfg.to_dict()) == _four("nf4")  # quant_method is transformers' enum there


# ----------------------------------------------------------------------------- against transformers itself

def _golden_cases():
    cases = []
    for quant_type in ("nf4", "fp4"):
        for double in (False, True):
            for dtype in DTYPES:
                cases.append((dict(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                   bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=dtype),
                              _four(quant_type, double, DTYPES[dtype])))
    cases.append((dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype="bfloat16", llm_int8_skip_modules=["lm_head", "model.vision_tower"]),
                  _four("nf4", True, jnp.bfloat16, ("lm_head", "model/vision_tower") + HF_ALWAYS_SKIP)))
    cases.append((dict(load_in_4bit=True), _four()))
    cases.append((dict(load_in_8bit=True), _eight()))
    cases.append((dict(load_in_8bit=True, llm_int8_threshold=4.0, llm_int8_skip_modules=["lm_head", "gate"]),
                  _eight(jnp.float32, ("lm_head", "gate") + HF_ALWAYS_SKIP, 4.0)))
    cases.append((dict(load_in_8bit=True, llm_int8_threshold=0.0, bnb_4bit_compute_dtype="bfloat16"),
                  _eight(jnp.bfloat16, DEFAULT_SKIP, 0.0)))
    return cases


FIELDS = ("load_in_4bit", "load_in_8bit", "llm_int8_threshold", "llm_int8_skip_modules",
          "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype",
          "bnb_4bit_quant_storage")


@pytest.mark.parametrize("kwargs,expected", _golden_cases(), ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_against_transformers(kwargs, expected):
    transformers = pytest.importorskip("transformers")
    B = transformers.BitsAndBytesConfig
    cfg = B(**kwargs)
    q = qjax.QuantConfig.from_hf(cfg.to_dict())
    assert q == expected
    back = B.from_dict(q.to_hf())
    for field in FIELDS:
        assert getattr(back, field) == getattr(cfg, field), field
    assert str(back.quant_method.value) == "bitsandbytes"
    if cfg.load_in_4bit:
        assert (back.bnb_4bit_quant_type, back.bnb_4bit_use_double_quant) == \
            (cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant)
    assert qjax.QuantConfig.from_hf(back.to_dict()) == q


# ----------------------------------------------------------------------------- refusals

FOUR = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


@pytest.mark.parametrize("d,error,match", [
    ({**FOUR, "quant_method": "gptq"}, ValueError, r"'quant_method'\]='gptq' is not 'bitsandbytes'"),
    ({**FOUR, "load_in_8bit": True}, ValueError, r"both 'load_in_4bit' and 'load_in_8bit'"),
    ({"quant_method": "bitsandbytes"}, ValueError, r"neither 'load_in_4bit' nor 'load_in_8bit'"),
    ({**FOUR, "load_in_4bit": False}, ValueError, r"neither 'load_in_4bit' nor 'load_in_8bit'"),
    ({**FOUR, "load_in_4bit": "yes"}, TypeError, r"'load_in_4bit'\]='yes' must be a bool"),
    ({**FOUR, "_load_in_4bit": False}, ValueError, r"'load_in_4bit'\]=True contradicts .*'_load_in_4bit'"),
    ({**FOUR, "llm_int8_enable_fp32_cpu_offload": True}, ValueError, r"'llm_int8_enable_fp32_cpu_offload'\]=True"),
    ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, ValueError, r"'llm_int8_has_fp16_weight'\]=True"),
    ({**FOUR, "bnb_4bit_quant_storage": "bfloat16"}, ValueError, r"'bnb_4bit_quant_storage'\]='bfloat16'.*uint8"),
    ({**FOUR, "bnb_4bit_quant_storage": "torch.float16"}, ValueError, r"'bnb_4bit_quant_storage'\]='torch.float16'"),
    ({**FOUR, "bnb_4bit_quant_type": "nf3"}, ValueError, r"'bnb_4bit_quant_type'\]='nf3' must be 'nf4' or 'fp4'"),
    ({**FOUR, "bnb_4bit_compute_dtype": "int8"}, ValueError, r"'bnb_4bit_compute_dtype'\]='int8' is not a float"),
    ({**FOUR, "bnb_4bit_compute_dtype": 3}, TypeError, r"'bnb_4bit_compute_dtype'\]=3 must be a dtype name"),
    ({**FOUR, "bnb_4bit_use_double_quant": 1}, TypeError, r"'bnb_4bit_use_double_quant'\]=1 must be a bool"),
    ({**FOUR, "llm_int8_threshold": -1.0}, ValueError, r"'llm_int8_threshold'\]=-1.0 must be >= 0"),
    ({**FOUR, "llm_int8_threshold": "6"}, TypeError, r"'llm_int8_threshold'\]='6' must be a number"),
    ({**FOUR, "llm_int8_skip_modules": "lm_head"}, TypeError, r"'llm_int8_skip_modules'\]='lm_head' must be None"),
    ({**FOUR, "llm_int8_skip_modules": ["layers.*"]}, ValueError, r"llm_int8_skip_modules entry 'layers.\*' is not"),
    ({**FOUR, "llm_int8_skip_modules": [3]}, TypeError, r"llm_int8_skip_modules entry 3 must be a str"),
    ({**FOUR, "bnb_4bit_blocksize": 128}, ValueError, r"keys \['bnb_4bit_blocksize'\] that qjax does not know"),
    ("load_in_4bit", TypeError, r"takes a BitsAndBytesConfig dict"),
])
def test_from_hf_refusals(d, error, match):
    with pytest.raises(error, match=match):
        qjax.QuantConfig.from_hf(d)


def test_8bit_ignores_4bit_only_fields():
    # transformers' to_dict writes the 4-bit fields for an 8-bit config too; they do not apply
    q = qjax.QuantConfig.from_hf({"load_in_8bit": True, "bnb_4bit_quant_type": "fp4",
                                  "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "bfloat16"})
    assert q == _eight()


@pytest.mark.parametrize("q,match", [
    (qjax.QuantConfig(format="nf3"), r"format 'nf3' is qjax's own"),
    (qjax.QuantConfig(format="nf2"), r"format 'nf2' is qjax's own"),
    (qjax.QuantConfig(blocksize=128), r"4-bit layers use blocksize 64, not 128"),
    (qjax.QuantConfig(format="int8", blocksize=256, double_quant=False), r"blockwise int8 \(blocksize=256\)"),
    (qjax.QuantConfig(target=("q_proj",)), r"target=\('q_proj',\): transformers quantizes every nn.Linear"),
    (qjax.QuantConfig(target="*attn*"), r"target=\('\*attn\*',\)"),
    (qjax.QuantConfig(min_size=4096), r"min_size=4096"),
    (qjax.QuantConfig(skip=("lm_head",)), r"lacks \['\*embed\*', '\*norm\*', '\*ln_\*', '\*layernorm\*'\]"),
    (qjax.QuantConfig(skip=HF_ALWAYS_SKIP + ("*mlp*",)), r"skip pattern '\*mlp\*' is not a module name"),
    (qjax.QuantConfig(skip=HF_ALWAYS_SKIP + ("re:mlp",)), r"skip pattern 're:mlp' is not a module name"),
    (qjax.QuantConfig(skip=HF_ALWAYS_SKIP + (re.compile("mlp"),)), r"skip pattern 'mlp' is not a module name"),
    (qjax.QuantConfig(skip=HF_ALWAYS_SKIP + ("a.b",)), r"skip name 'a.b' holds '.'"),
    (qjax.QuantConfig(compute_dtype=jnp.float8_e4m3fn), r"compute_dtype float8_e4m3fn is not one of"),
])
def test_to_hf_refusals(q, match):
    with pytest.raises(ValueError, match=r"QuantConfig.to_hf: .* has no BitsAndBytesConfig equivalent: .*" + match):
        q.to_hf()
