"""Bad LoRA configs, mismatched variables and runaway training fail loudly, naming what is wrong.

LoraConfig validates every field at construction; convert / apply / merge name the layer path, the
shapes and dtypes when variables or inputs do not fit; adapters_only refuses a tree without
adapters; skip_nonfinite skips NaN/Inf steps and raise_if_nonfinite stops the run.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
import qjax.linen as ql
import qjax.nnx as qn
from qjax import LoraConfig
from qjax.optim import adapters_only, raise_if_nonfinite, skip_nonfinite

# ----------------------------------------------------------------------------- LoraConfig

BAD_CONFIGS = [
    (dict(alpha=float("nan")), ValueError, r"LoraConfig\.alpha must be a finite number > 0.*got nan \(type=float\)"),
    (dict(alpha=float("inf")), ValueError, r"LoraConfig\.alpha .*got inf \(type=float\)"),
    (dict(alpha=0), ValueError, r"LoraConfig\.alpha must be a finite number > 0.*got 0 \(type=int\)"),
    (dict(alpha=-8), ValueError, r"LoraConfig\.alpha .*got -8 \(type=int\)"),
    (dict(alpha=None), TypeError, r"LoraConfig\.alpha must be a real number, got None \(type=NoneType\)"),
    (dict(alpha="16"), TypeError, r"LoraConfig\.alpha must be a real number, got '16' \(type=str\)"),
    (dict(alpha=True), TypeError, r"LoraConfig\.alpha .*got True \(type=bool\)"),
    (dict(r=0), ValueError, r"LoraConfig\.r must be a positive int.*got 0 \(type=int\)"),
    (dict(r=8.0), TypeError, r"LoraConfig\.r must be a positive int, got 8\.0 \(type=float\)"),
    (dict(r=True), TypeError, r"LoraConfig\.r must be a positive int, got True \(type=bool\)"),
    (dict(dropout=None), TypeError, r"LoraConfig\.dropout must be a real number, got None"),
    (dict(dropout="0.1"), TypeError, r"LoraConfig\.dropout must be a real number, got '0\.1' \(type=str\)"),
    (dict(dropout=1.0), ValueError, r"LoraConfig\.dropout must be in \[0, 1\), got 1\.0"),
    (dict(use_rslora="yes"), TypeError, r"LoraConfig\.use_rslora must be a bool, got 'yes' \(type=str\)"),
    (dict(init=None), ValueError, r"LoraConfig\.init must be one of \['default', 'gaussian', 'loftq'\], got None"),
    (dict(init="pissa"), ValueError, r"LoraConfig\.init must be one of .*'loftq'\], got 'pissa' \(type=str\)"),
    (dict(loftq_iter=1.5), TypeError, r"LoraConfig\.loftq_iter must be a positive int, got 1\.5 \(type=float\)"),
    (dict(loftq_iter=0), ValueError, r"LoraConfig\.loftq_iter must be a positive int.*got 0"),
    (dict(loftq_method=None), ValueError, r"LoraConfig\.loftq_method must be one of \['svd', 'randomized'\]"),
    (dict(target_modules=None), TypeError, r"LoraConfig\.target_modules=None: pass 'all-linear'"),
    (dict(target_modules=[1, 2]), TypeError, r"LoraConfig\.target_modules must be a str, an re\.Pattern or a "
                                             r"sequence of them.*got \[1, 2\] \(type=list\)"),
    (dict(target_modules=[]), ValueError, r"LoraConfig\.target_modules=\[\] selects no layer.*lora_config=None"),
    (dict(target_modules="re:q_(proj"), ValueError, r"LoraConfig\.target_modules pattern 're:q_\(proj' is not a "
                                                    r"valid regular expression"),
    (dict(exclude=3), TypeError, r"LoraConfig\.exclude must be a str.*got 3 \(type=int\)"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_lora_config_rejects_bad_fields_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)


def test_lora_config_normalizes_numpy_scalars_and_single_patterns():
    config = LoraConfig(r=np.int64(8), alpha=np.float32(16.0), dropout=np.float64(0.1), use_rslora=np.bool_(True),
                        loftq_iter=np.int32(2), target_modules="q_proj", exclude=None)
    assert type(config.r) is int and config.r == 8
    assert type(config.alpha) is float and config.alpha == 16.0
    assert type(config.loftq_iter) is int and type(config.use_rslora) is bool
    assert config.target_modules == ("q_proj",) and config.exclude == ()
    assert config.scaling == 16.0 / np.sqrt(8)
    assert LoraConfig(target_modules={"v_proj", "q_proj"}).target_modules == ("q_proj", "v_proj")
    hash(config)  # static in ConversionSpec: must stay hashable


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="down")(nn.gelu(nn.Dense(32, name="up")(x)))


class Other(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="proj")(x)


class NMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


def _x(rng, shape=(4, 16), dtype=np.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _linen(rng, lora_config=LoraConfig(r=4), quant_config=qjax.QuantConfig()):
    x = _x(rng)
    variables = MLP().init(jax.random.key(int(rng.integers(1 << 30))), x)
    qm, qv = ql.convert(MLP(), variables, lora_config, quant_config, jax.random.key(1), inputs=(x,))
    return x, variables, qm, qv


# ----------------------------------------------------------------------------- layer selection


def test_exclude_matching_nothing_warns_and_names_the_layers(rng):
    x = _x(rng)
    variables = MLP().init(jax.random.key(0), x)
    with pytest.warns(UserWarning, match=r"exclude pattern 'dwon' matches no linear layer.*\['up', 'down'\]"):
        ql.convert(MLP(), variables, LoraConfig(r=4, exclude=["dwon"]), qjax.QuantConfig(), jax.random.key(1),
                   inputs=(x,))
    with pytest.warns(UserWarning, match=r"exclude pattern 'dwon' matches no linear layer"):
        qn.convert(NMLP(nnx.Rngs(0)), LoraConfig(r=4, exclude=["dwon"]), qjax.QuantConfig(), nnx.Rngs(0))


def test_lora_config_selecting_no_layer_raises_instead_of_quantizing_only(rng):
    x = _x(rng)
    variables = MLP().init(jax.random.key(0), x)
    match = r"LoraConfig\(target_modules='all-linear', exclude=\('\*',\)\) selects no layer.*\['up', 'down'\]"
    with pytest.raises(ValueError, match=match):
        ql.convert(MLP(), variables, LoraConfig(r=4, exclude="*"), qjax.QuantConfig(), jax.random.key(1),
                   inputs=(x,))
    with pytest.raises(ValueError, match=r"selects no layer for adapters.*lora_config=None"):
        qn.convert(NMLP(nnx.Rngs(0)), LoraConfig(r=4, exclude="*"), qjax.QuantConfig(), nnx.Rngs(0))


def test_convert_rejects_wrong_config_and_rng_types(rng):
    x = _x(rng)
    variables = MLP().init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"lora_config must be a qjax\.LoraConfig or None, got \{'r': 4\} "
                                        r"\(type=dict\)"):
        ql.convert(MLP(), variables, {"r": 4}, qjax.QuantConfig(), jax.random.key(1), inputs=(x,))
    with pytest.raises(TypeError, match=r"quant_config must be a qjax\.QuantConfig.*got 'nf4' \(type=str\)"):
        qn.convert(NMLP(nnx.Rngs(0)), LoraConfig(r=4), "nf4", nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"rng must be a jax key.*got type=int"):
        ql.convert(MLP(), variables, LoraConfig(r=4), qjax.QuantConfig(), 0, inputs=(x,))
    with pytest.raises(TypeError, match=r"rngs must be an nnx\.Rngs, got shape=\(\) dtype=key.*nnx\.Rngs\(0\)"):
        qn.convert(NMLP(nnx.Rngs(0)), LoraConfig(r=4), qjax.QuantConfig(), jax.random.key(0))


# ----------------------------------------------------------------------------- variables that do not fit


def test_convert_names_missing_paths_for_another_models_variables(rng):
    x = _x(rng)
    other = Other().init(jax.random.key(0), x)
    match = (r"do not fit MLP.*4 params it creates are missing \(params/down/bias, params/down/kernel, "
             r"params/up/bias, params/up/kernel; the variables' params hold \['proj/bias', 'proj/kernel'\]")
    with pytest.raises(ValueError, match=match):
        ql.convert(MLP(), other, LoraConfig(r=4), qjax.QuantConfig(), jax.random.key(1), inputs=(x,))


def test_convert_names_path_shape_and_dtype_of_kernels_that_do_not_fit(rng):
    x = _x(rng)
    variables = MLP().init(jax.random.key(0), x)
    params = dict(variables["params"])
    params["up"] = {"kernel": _x(rng, (8, 32)), "bias": params["up"]["bias"]}
    with pytest.raises(ValueError, match=r"'params/up/kernel' \(shape=\(8, 32\) dtype=float32\) where it creates "
                                         r"shape=\(16, 32\) dtype=float32"):
        ql.convert(MLP(), {"params": params}, LoraConfig(r=4), qjax.QuantConfig(), jax.random.key(1), inputs=(x,))
    params["up"] = {"kernel": jnp.asarray(rng.integers(-3, 3, (16, 32)), jnp.int32), "bias": params["up"]["bias"]}
    with pytest.raises(ValueError, match=r"'params/up/kernel' \(shape=\(16, 32\) dtype=int32\) where it creates "
                                         r"shape=\(16, 32\) dtype=float32"):
        ql.convert(MLP(), {"params": params}, LoraConfig(r=4), None, jax.random.key(1), inputs=(x,))
    # Without inputs nothing tells the expected shapes, but an integer kernel is still refused (it was kept and
    # merged back as int32, the adapters' delta truncated away).
    with pytest.raises(TypeError, match=r"'params/up/kernel' \(shape=\(16, 32\) dtype=int32\) is not a float kernel"):
        ql.convert(MLP(), {"params": params}, LoraConfig(r=4), None, jax.random.key(1))


def test_linen_apply_names_layer_inputs_and_leaves_that_do_not_fit(rng):
    x, variables, qm, qv = _linen(rng)
    with pytest.raises(ValueError, match=r"params/up called on inputs shape=\(4, 8\) dtype=float32: kernel is a "
                                         r"QuantizedArray of shape \(16, 32\).*expected shape \(8, 32\)"):
        qm.apply(qv, _x(rng, (4, 8)))
    _, _, _, qv8 = _linen(rng, LoraConfig(r=8))
    with pytest.raises(ValueError, match=r"params/up called on inputs shape=\(4, 16\) dtype=float32: lora_a "
                                         r"\(shape=\(16, 8\) dtype=float32\) should have shape \(16, 4\)"):
        qm.apply(qv8, x)
    _, _, _, qv_quant_only = _linen(rng, None)
    with pytest.raises(ValueError, match=r"params/up called on inputs .*lora_a is missing; lora_b is missing"):
        qm.apply(qv_quant_only, x)


def test_linen_merge_refuses_variables_of_another_rank_or_without_adapters(rng):
    _, _, qm, qv = _linen(rng)
    _, _, _, qv8 = _linen(rng, LoraConfig(r=8))
    with pytest.raises(ValueError, match=r"params/up: lora_a \(shape=\(16, 8\) dtype=float32\) should have shape "
                                         r"\(16, 4\); lora_b \(shape=\(8, 32\) dtype=float32\) should have shape "
                                         r"\(4, 32\)"):
        ql.merge(qm, qv8)
    _, _, _, qv_quant_only = _linen(rng, None)
    with pytest.raises(ValueError, match=r"params/up: lora_a is missing; lora_b is missing .*r=4"):
        ql.merge(qm, qv_quant_only)  # used to merge silently without the adapters
    _, _, _, qv_other = _linen(rng)
    qv_other = {"params": {"proj": qv_other["params"]["up"]}}
    with pytest.raises(ValueError, match=r"params/up: the variables have no 'up' at params/ \(it holds \['proj'\]\)"):
        ql.merge(qm, qv_other)


@pytest.mark.parametrize("quant", [qjax.QuantConfig(), None], ids=["nf4", "16bit"])
def test_nnx_layers_name_inputs_and_adapters_that_do_not_fit(quant, rng):
    model = qn.convert(NMLP(nnx.Rngs(0)), LoraConfig(r=4), quant, nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"up: x \(shape=\(4, 8\) dtype=float32\) must end in the layer's in_shape "
                                         r"\(16,\)"):
        model(_x(rng, (4, 8)))
    model.up.lora_a.set_value(_x(rng, (16, 8)))
    match = r"up: lora_a \(shape=\(16, 8\) dtype=float32\) should have shape \(16, 4\).*r=4"
    with pytest.raises(ValueError, match=match):
        model(_x(rng))
    with pytest.raises(ValueError, match=match):
        qn.merge(model)


# ----------------------------------------------------------------------------- prepare_for_kbit_training


def test_prepare_for_kbit_training_rejects_bad_trees_and_dtypes(rng):
    tree = {"norm": {"scale": _x(rng, (8,), jnp.bfloat16)}}
    with pytest.raises(TypeError, match=r"dtype=<class 'jax.numpy.int8'> must be a float dtype"):
        qjax.prepare_for_kbit_training(tree, dtype=jnp.int8)
    with pytest.raises(TypeError, match=r"expected a params / variables tree .*got NoneType"):
        qjax.prepare_for_kbit_training(None)
    model = NMLP(nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"got NMLP; for an NNX model use qjax\.nnx\.prepare_for_kbit_training"):
        qjax.upcast_half_params(model)
    with pytest.raises(TypeError, match=r"remat must be a str, an re\.Pattern or a sequence of them.*got True "
                                        r"\(type=bool\)"):
        qn.prepare_for_kbit_training(model, remat=True)
    with pytest.raises(TypeError, match=r"remat= is for NNX models .*got dict"):
        qn.prepare_for_kbit_training(tree, remat="blocks/*")
    model.up.bias.set_value(model.up.bias.get_value().astype(jnp.bfloat16))
    with pytest.raises(TypeError, match=r"dtype=<class 'jax.numpy.int8'> must be a float dtype"):
        qn.prepare_for_kbit_training(model, dtype=jnp.int8)
    assert model.up.bias.get_value().dtype == jnp.bfloat16  # nothing cast before the error


# ----------------------------------------------------------------------------- optimizers


def test_adapters_only_on_a_tree_without_adapters_raises(rng):
    params = MLP().init(jax.random.key(0), _x(rng))["params"]
    match = (r"adapters_only: found no adapter leaves \(leaves whose path has a component named 'lora_a' or "
             r"'lora_b'\) among the 4 leaves of params \(\['down/bias'.*Convert the model first")
    with pytest.raises(ValueError, match=match):
        adapters_only(optax.adamw(1e-3)).init(params)


def _linen_step(qm, x, tx):
    @jax.jit
    def step(params, opt_state):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((qm.apply({"params": p}, x) - 1.0) ** 2),
                                     allow_int=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_plain_optax_over_quantized_codes_names_the_leaves_and_the_fix(jit, rng):
    x, _, qm, qv = _linen(rng)
    tx = skip_nonfinite(optax.adamw(1e-3))  # no adapters_only: adam meets the uint8 codes' float0 gradients
    grad = jax.grad(lambda p: jnp.mean(qm.apply({"params": p}, x) ** 2), allow_int=True)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(TypeError, match=r"cannot update integer / float0 leaves \(\d+: 'down/kernel/packed' "
                                        r"\(shape=\(\d+,\) dtype=.*wrap the optimizer in qjax\.optim\.adapters_only"):
        update(grad(qv["params"]), tx.init(qv["params"]), qv["params"])


TXS = {
    "adamw": lambda: optax.adamw(1e-2),
    "chain_clip_schedule": lambda: optax.chain(optax.clip_by_global_norm(0.5),
                                               optax.adamw(optax.cosine_decay_schedule(1e-2, 20))),
}


@pytest.mark.parametrize("order", ["guard_outside", "guard_inside"])
@pytest.mark.parametrize("tx_name", sorted(TXS))
def test_skip_nonfinite_leaves_finite_runs_bit_identical(order, tx_name, rng):
    x, _, qm, qv = _linen(rng)
    plain = adapters_only(TXS[tx_name]())
    guarded = (skip_nonfinite(adapters_only(TXS[tx_name]())) if order == "guard_outside"
               else adapters_only(skip_nonfinite(TXS[tx_name]())))
    p1, s1 = qv["params"], plain.init(qv["params"])
    p2, s2 = qv["params"], guarded.init(qv["params"])
    step1, step2 = _linen_step(qm, x, plain), _linen_step(qm, x, guarded)
    for _ in range(4):
        p1, s1, _ = step1(p1, s1)
        p2, s2, _ = step2(p2, s2)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert raise_if_nonfinite(s2) == 0


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_skip_nonfinite_skips_a_nan_step_whole_and_counts_it(jit, rng):
    params = {"lora_a": _x(rng, (8, 2)), "lora_b": _x(rng, (2, 4))}
    tx = skip_nonfinite(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(1e-2, 0, 10))))
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    good = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    _, state = update(good, state, params)
    bad = {"lora_a": good["lora_a"].at[3, 1].set(jnp.nan), "lora_b": good["lora_b"]}
    updates, new_state = update(bad, state, params)
    for u in jax.tree_util.tree_leaves(updates):
        np.testing.assert_array_equal(np.asarray(u), 0.0)
    for before, after in zip(jax.tree_util.tree_leaves(state.inner), jax.tree_util.tree_leaves(new_state.inner)):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))  # counts and moments unchanged
    assert (int(new_state.count), int(new_state.notfinite_count), int(new_state.total_notfinite)) == (2, 1, 1)
    _, new_state = update(good, new_state, params)
    assert (int(new_state.count), int(new_state.notfinite_count), int(new_state.total_notfinite)) == (3, 0, 1)


def test_runaway_linen_training_stops_with_floating_point_error(rng):
    x, _, qm, qv = _linen(rng)
    tx = skip_nonfinite(adapters_only(optax.sgd(1e8)))
    step = _linen_step(qm, x, tx)
    params, state = qv["params"], tx.init(qv["params"])
    with pytest.raises(FloatingPointError, match=r"2 consecutive optimizer steps \(steps (\d+) to (\d+)\) had NaN/Inf "
                                                 r"gradients or updates, more than max_consecutive=1.*those after step"):
        for _ in range(12):
            params, state, _ = step(params, state)
            raise_if_nonfinite(state, max_consecutive=1)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(params)
               if jnp.issubdtype(a.dtype, jnp.floating))


def test_runaway_nnx_training_stops_with_floating_point_error(rng):
    model = qn.convert(NMLP(nnx.Rngs(0)), LoraConfig(r=4), qjax.QuantConfig(), nnx.Rngs(1))
    opt = nnx.Optimizer(model, skip_nonfinite(optax.sgd(1e8)), wrt=qn.LoRAParam)
    x = _x(rng)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2),
                                     argnums=nnx.DiffState(0, qn.LoRAParam))(model)
        opt.update(model, g)
        return loss

    with pytest.raises(FloatingPointError, match=r"consecutive optimizer steps \(steps \d+ to \d+\).*"
                                                 r"max_consecutive=0"):
        for _ in range(12):
            step(model, opt)
            raise_if_nonfinite(opt, max_consecutive=0)
    assert bool(jnp.all(jnp.isfinite(model.up.lora_b.get_value())))


def test_raise_if_nonfinite_needs_the_guard_state(rng):
    params = {"lora_a": _x(rng, (8, 2)), "lora_b": _x(rng, (2, 4))}
    with pytest.raises(ValueError, match=r"the ScaleByAdamState holds no SkipNonfiniteState.*skip_nonfinite\(tx\)"):
        raise_if_nonfinite(optax.scale_by_adam().init(params))
    with pytest.raises(ValueError, match=re.escape("max_consecutive must be an int >= 0, got -1")):
        raise_if_nonfinite(skip_nonfinite(optax.adam(1e-3)).init(params), max_consecutive=-1)


def test_merge_refuses_integer_dtype_and_bad_requantize(rng):
    _, _, qm, qv = _linen(rng)
    with pytest.raises(TypeError, match=r"merge dtype=<class 'jax.numpy.int8'> must be a float dtype"):
        ql.merge(qm, qv, jnp.int8)  # used to truncate the merged kernels to int8
    with pytest.raises(TypeError, match=r"requantize must be a qjax\.QuantConfig or None, got 'nf4' \(type=str\)"):
        ql.merge(qm, qv, requantize="nf4")
    model = qn.convert(NMLP(nnx.Rngs(0)), LoraConfig(r=4), qjax.QuantConfig(), nnx.Rngs(1))
    with pytest.raises(TypeError, match=r"merge dtype='int32' must be a float dtype"):
        qn.merge(model, "int32")


def test_standalone_layers_name_a_config_of_the_wrong_type(rng):
    x = _x(rng)
    with pytest.raises(TypeError, match=r"(?s)<root>: lora_config must be a qjax\.LoraConfig or None, got .*"
                                        r"\(type=FrozenDict\)"):
        ql.QLoRADense(8, lora_config={"r": 4}).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"QLoRALinear: quant_config must be a qjax\.QuantConfig or None, got 'nf4' "
                                        r"\(type=str\)"):
        qn.QLoRALinear(16, 8, quant_config="nf4", rngs=nnx.Rngs(0))
