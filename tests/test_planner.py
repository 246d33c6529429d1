"""The conversion planner shared by qjax.linen.convert and qjax.nnx.convert: same patterns, same layers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import qjax
import qjax.linen as ql
import qjax.nnx as qn
from qjax._src.flax import planner as P
from qjax._src.flax.select import kernel_paths

D = 16


class LBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D, name="o_proj")(nn.relu(nn.Dense(32, name="q_proj")(x)))


class LNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = LBlock(name=f"layers_{i}")(x)
        return nn.Dense(8, name="lm_head")(x)


class NBlock(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(D, 32, rngs=rngs)
        self.o_proj = nnx.Linear(32, D, rngs=rngs)


class NNet(nnx.Module):  # the same module paths as LNet: layers_0/q_proj, ..., lm_head
    def __init__(self, rngs):
        self.layers_0, self.layers_1 = NBlock(rngs), NBlock(rngs)
        self.lm_head = nnx.Linear(D, 8, rngs=rngs)


ALL = {f"layers_{i}/{n}" for i in range(2) for n in ("q_proj", "o_proj")}
NF2 = qjax.QuantConfig(format="nf2", double_quant=False)

# (lora_config, quant_config, paths with adapters, paths quantized {path: format})
CASES = {
    "defaults": (qjax.LoraConfig(r=4), qjax.QuantConfig(), ALL, dict.fromkeys(ALL, "nf4")),
    "targets_and_skip": (qjax.LoraConfig(r=4, target_modules=("q_proj",)), qjax.QuantConfig(skip=("*o_proj*",)),
                         {"layers_0/q_proj", "layers_1/q_proj"},  # a skip of its own replaces DEFAULT_SKIP
                         {"layers_0/q_proj": "nf4", "layers_1/q_proj": "nf4", "lm_head": "nf4"}),
    # module-path patterns anchored at the model's root (used to miss in Linen, which saw "params/...")
    "anchored_glob": (qjax.LoraConfig(r=4, target_modules=("layers_1/*",), exclude=("o_proj",)),
                      qjax.QuantConfig(target=("layers_0/*",)), {"layers_1/q_proj"},
                      {"layers_0/q_proj": "nf4", "layers_0/o_proj": "nf4"}),
    "anchored_regex": (None, qjax.QuantConfig(target="re:^layers_1/q_proj/kernel$"), set(),
                       {"layers_1/q_proj": "nf4"}),
    # patterns written for the old Linen form "params/<module path>/kernel" keep working, in NNX too
    "legacy_params_prefix": (None, qjax.QuantConfig(skip=("params/layers_0/*", "*/lm_head/*")), set(),
                             {"layers_1/q_proj": "nf4", "layers_1/o_proj": "nf4"}),
    "rules": (qjax.LoraConfig(r=4, target_modules="re:o_proj$"),
              qjax.QuantRules(((("*layers_1*",), None),), qjax.QuantConfig()),
              {"layers_0/o_proj", "layers_1/o_proj"}, {"layers_0/q_proj": "nf4", "layers_0/o_proj": "nf4"}),
    "first_blocks": (qjax.LoraConfig(r=2), qjax.first_blocks(1, qjax.QuantConfig(), NF2), ALL,
                     {p: "nf4" if p.startswith("layers_0") else "nf2" for p in ALL}),
}


def _linen_selection(lora_config, quant_config):
    x = jnp.ones((3, D), jnp.float32)
    variables = LNet().init(jax.random.key(0), x)
    qm, qv = ql.convert(LNet(), variables, lora_config, quant_config, jax.random.key(1), inputs=(x,))
    p = qv["params"]
    lora = {s.path for s in type(qm)._qjax_spec.layers if s.lora}
    quant = {}
    for s in type(qm)._qjax_spec.layers:
        node = p
        for k in s.path.split("/"):
            node = node[k]
        if qjax.is_quantized(node["kernel"]):
            quant[s.path] = node["kernel"].format
    return lora, quant


def _nnx_selection(lora_config, quant_config):
    model = qn.convert(NNet(nnx.Rngs(0)), lora_config, quant_config, nnx.Rngs(1))
    lora, quant = set(), {}
    for parts, node in nnx.iter_graph(model):
        if isinstance(node, qn.QLoRALinear):
            path = "/".join(map(str, parts))
            if node.lora_a is not None:
                lora.add(path)
            if qjax.is_quantized(node.kernel.get_value()):
                quant[path] = node.kernel.get_value().format
    return lora, quant


@pytest.mark.parametrize("case", sorted(CASES))
def test_linen_and_nnx_select_the_same_layers(case):
    lora_config, quant_config, want_lora, want_quant = CASES[case]
    linen = _linen_selection(lora_config, quant_config)
    assert linen == _nnx_selection(lora_config, quant_config)
    assert linen == (want_lora, want_quant)


def test_patterns_of_both_forms_in_one_policy_raise():
    paths = {p: f"{p}/kernel" for p in sorted(ALL)}
    assert kernel_paths(qjax.QuantConfig(), paths) == {p: f"{p}/kernel" for p in paths}
    assert kernel_paths(qjax.QuantConfig(target="params/*"), paths) == {p: f"params/{p}/kernel" for p in paths}
    mixed = qjax.QuantConfig(skip=("params/layers_0/*",), target=("re:^layers",))
    with pytest.raises(ValueError, match=r"\['params/layers_0/\*'\] match layers only as 'params/<module path>/kernel' "
                                         r"and \['re:\^layers'\] only as '<module path>/kernel'"):
        kernel_paths(mixed, paths)
    with pytest.raises(ValueError, match="match layers only as 'params/"):
        qn.convert(NNet(nnx.Rngs(0)), None, mixed)


class DictFinder:
    """A finder over a plain {path: kernel} dict, as a finder that is neither Linen nor NNX would be."""

    model_name, layer_kinds = "dict", "matrix"

    def __init__(self, kernels, layouts):
        self.kernels, self.layouts = kernels, layouts

    def candidates(self):
        return [P.Candidate(p, p, k, self.layouts[p]) for p, k in self.kernels.items()]


def test_a_third_finder_plans_creates_and_merges_through_the_planner(rng):
    kernels = {"proj": jnp.asarray(rng.standard_normal((4, 8, 3, 16)), jnp.float32),  # (lead, in, n, h)
               "experts": jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32),  # "etd,edh->eth"
               "tiny": jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)}
    layouts = {"proj": P.KernelLayout((8,), (3, 16), lead=(4,)),
               "experts": P.KernelLayout((8,), (16,), batch=(2,), einsum="etd,edh->eth"),
               "tiny": P.KernelLayout((8,), (2,))}
    lora = qjax.LoraConfig(r=4, exclude=("tiny",))
    planned = P.plan(DictFinder(kernels, layouts), lora, qjax.QuantConfig(min_size=64))
    assert [(p.path, p.lora, p.quant_config is not None) for p in planned] == [("proj", True, True),
                                                                           ("experts", True, True)]
    for p, key in zip(planned, jax.random.split(jax.random.key(0), len(planned))):
        base, adapters = P.adapter_params(p.path, p.layout, kernels[p.path], lora, None, key)
        assert base is kernels[p.path]  # quant_config None: the base stays dense
        assert adapters["lora_a"].shape == p.layout.stack + p.layout.in_shape + (4,)
        assert adapters["lora_b"].shape == p.layout.stack + (4,) + p.layout.out_shape
        merged = P.merged_kernel(p.path, p.layout, base, adapters, lora)  # B = 0: the kernel itself
        np.testing.assert_array_equal(np.asarray(merged), np.asarray(kernels[p.path]))
        q, _ = P.adapter_params(p.path, p.layout, kernels[p.path], None, p.quant_config, None)
        assert q.shape == (8, int(np.prod(p.layout.out_shape))) and q.stack_shape == p.layout.stack
    with pytest.raises(ValueError, match=r"proj: LoRA rank r=9 must be in \[1, min\(in=8"):
        P.plan(DictFinder(kernels, layouts), qjax.LoraConfig(r=9, target_modules="proj"), None)
    with pytest.raises(ValueError, match=r"dict has no matrix layer"):
        P.plan(DictFinder({}, {}), lora, None)
    with pytest.raises(ValueError, match=r"experts: lora_a \(shape=\(8, 4\) dtype=float32\) should have shape "
                                         r"\(2, 8, 4\)"):
        P.merged_kernel("experts", layouts["experts"], kernels["experts"],
                        {"lora_a": jnp.zeros((8, 4)), "lora_b": jnp.zeros((4, 16))}, lora)


# ----------------------------------------------------------------------------- prepare_for_kbit_training


def test_one_prepare_for_kbit_training_for_linen_and_nnx(rng):
    assert qjax.prepare_for_kbit_training is ql.prepare_for_kbit_training is qn.prepare_for_kbit_training
    half = jnp.asarray(rng.standard_normal((D,)), jnp.bfloat16)
    tree = {"norm": {"scale": half}, "step": jnp.asarray(3, jnp.int32)}
    for out in (qjax.prepare_for_kbit_training(tree), qjax.prepare_for_kbit_training(tree, jnp.float16),
                qjax.prepare_for_kbit_training(tree, dtype=jnp.float16)):
        assert out["norm"]["scale"].dtype in (jnp.float32, jnp.float16) and out["step"].dtype == jnp.int32
    assert qjax.prepare_for_kbit_training(tree, jnp.float16)["norm"]["scale"].dtype == jnp.float16
    assert tree["norm"]["scale"].dtype == jnp.bfloat16  # Linen variables: a new tree
    with pytest.raises(TypeError, match=r"remat= is for NNX models .*got dict; for Linen wrap the block class in "
                                        r"nn\.remat"):
        qjax.prepare_for_kbit_training(tree, remat="layers_0")

    model = qn.convert(NNet(nnx.Rngs(0)), qjax.LoraConfig(r=4), qjax.QuantConfig(), nnx.Rngs(1))
    model.lm_head.bias.set_value(model.lm_head.bias.get_value().astype(jnp.bfloat16))
    base = model.layers_0.q_proj.kernel.get_value()
    assert qjax.prepare_for_kbit_training(model, remat=re.compile("layers_1$")) is model  # in place
    assert model.lm_head.bias.get_value().dtype == jnp.float32
    after = model.layers_0.q_proj.kernel.get_value()  # the quantized base is left alone
    assert qjax.is_quantized(after) and all(x is y for x, y in zip(jax.tree_util.tree_leaves(after),
                                                                   jax.tree_util.tree_leaves(base)))
    assert getattr(type(model.layers_1), "_qjax_remat", False) and not getattr(type(model.layers_0), "_qjax_remat",
                                                                               False)
    with pytest.raises(ValueError, match=r"remat patterns \['nope'\] match no module"):
        qjax.prepare_for_kbit_training(model, remat="nope")
