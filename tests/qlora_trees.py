"""Hand-built QLoRA variables trees shaped like qjax.linen.QLoRADense's, and their forward pass.

A "layer" is {"kernel": QuantizedArray or dense (in, out), ["bias"], "lora_a": (in, r), "lora_b": (r, out)}.
"""

import jax.numpy as jnp
import numpy as np

import qjax
from helpers import random_weights

PROJ = ("q_proj", "v_proj")


def qlora_variables(rng, *, d=32, r=4, layers=2, fmt="nf4", quantized=True, transposed=False,
                    zero_b=False, bias=True):
    """{"params": {"layers_{i}": {"self_attn": {q_proj, v_proj}}, "norm": {"scale"}}} with random adapters."""
    params = {}
    for i in range(layers):
        attn = {}
        for name in PROJ:
            w = random_weights(rng, (d, d), "float32")
            kernel = qjax.quantize(jnp.asarray(w), fmt, double_quant=True, transposed=transposed) if quantized \
                else jnp.asarray(w)
            layer = {"kernel": kernel,
                     "lora_a": jnp.asarray(rng.standard_normal((d, r)).astype(np.float32) / d),
                     "lora_b": jnp.asarray(np.zeros((r, d), np.float32) if zero_b
                                           else rng.standard_normal((r, d)).astype(np.float32) * 0.1)}
            if bias:
                layer["bias"] = jnp.asarray(rng.standard_normal(d).astype(np.float32) * 0.1)
            attn[name] = layer
        params[f"layers_{i}"] = {"self_attn": attn}
    params["norm"] = {"scale": jnp.ones((d,), jnp.float32)}
    return {"params": params}


def dense(layer, x, scaling):
    k = layer["kernel"]
    y = qjax.qmatmul(x, k) if qjax.is_quantized(k) else x @ k
    if "bias" in layer:
        y = y + layer["bias"][None, :]
    return y + scaling * ((x @ layer["lora_a"]) @ layer["lora_b"])


def apply(variables, x, scaling):
    """Each layer: x <- tanh(q_proj(x)) * v_proj(x)."""
    p = variables["params"]
    i = 0
    while f"layers_{i}" in p:
        a = p[f"layers_{i}"]["self_attn"]
        x = jnp.tanh(dense(a["q_proj"], x, scaling)) * dense(a["v_proj"], x, scaling)
        i += 1
    return x * p["norm"]["scale"][None, :]
