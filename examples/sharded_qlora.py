"""A QLoRA train step on a 2-D (data x model) mesh, on simulated CPU devices or real ones.

    python examples/sharded_qlora.py                      # 8 simulated CPU devices
    python examples/sharded_qlora.py --devices 4 --steps 5

The same script runs on several hosts (one process per host): see docs/sharding.md. The
frozen base is quantized shard by shard (no device ever holds a whole dense kernel), sharded
FSDP-style over `data` and tensor-parallel over `model`; the LoRA adapters and the adam state
follow the kernels' shardings.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices (ignored with --multihost)")
    ap.add_argument("--model-axis", type=int, default=4, help="size of the tensor-parallel mesh axis")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--d", type=int, default=256, help="model width")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize() first")
    return ap.parse_args()


ARGS = parse_args()
if not ARGS.multihost and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qjax  # noqa: E402
import qjax.sharding  # noqa: E402


def init_dense(key, d, layers=2):
    """A tiny MLP stack: per layer `up` (d, 4d) and `down` (4d, d) kernels, with adapters."""
    params = {}
    for i in range(layers):
        for name, shape in (("up", (d, 4 * d)), ("down", (4 * d, d))):
            key, k1, k2 = jax.random.split(key, 3)
            params[f"layer{i}_{name}"] = {
                "kernel": jax.random.normal(k1, shape) / np.sqrt(shape[0]),
                "lora_a": jax.random.normal(k2, (shape[0], ARGS.r)) / np.sqrt(shape[0]),
                "lora_b": jnp.zeros((ARGS.r, shape[1])),
            }
    return params


# compute layouts: the kernels gathered over `data` (FSDP) but still split over `model`
COMPUTE = {"up": P(None, "model"), "down": P("model", None)}


def forward(lora, frozen, x, mesh, layers=2):
    def dense(h, name):
        p = {**frozen[name], **lora[name]}
        # gather the 4-bit codes here (not the dequantized weight XLA would otherwise pick)
        kernel = qjax.sharding.with_sharding_constraint(p["kernel"], mesh, COMPUTE[name.split("_")[1]])
        return qjax.qmatmul(h, kernel) + (h @ p["lora_a"]) @ p["lora_b"] * 2.0

    h = x
    for i in range(layers):
        h = h + dense(jax.nn.gelu(dense(h, f"layer{i}_up")), f"layer{i}_down")
    return h


def split(params):
    lora = {k: {"lora_a": v["lora_a"], "lora_b": v["lora_b"]} for k, v in params.items()}
    frozen = {k: {"kernel": v["kernel"]} for k, v in params.items()}
    return lora, frozen


def main():
    if ARGS.multihost:
        jax.distributed.initialize()  # coordinator, process count and id from the environment
    n = jax.device_count()
    model = ARGS.model_axis
    mesh = Mesh(np.array(jax.devices()).reshape(n // model, model), ("data", "model"))  # Auto axes
    print(f"process {jax.process_index()}/{jax.process_count()}: mesh {dict(mesh.shape)}")

    # spec over the dense shapes: up is column-parallel, down row-parallel; both FSDP over data
    def rule(path, leaf):
        if path.endswith("up/kernel"):
            return P("data", "model")
        if path.endswith("down/kernel"):
            return P("model", "data")
        return None  # lora_a / lora_b: derived from the kernel by shard_params

    # dense weights are created sharded (each device makes its slice) and quantized shard by shard
    key = jax.random.key(0)
    init = lambda k: init_dense(k, ARGS.d)
    abstract = jax.eval_shape(init, key)
    dense = jax.jit(init, out_shardings=qjax.sharding.params_sharding(abstract, mesh, rule))(key)
    config = qjax.QuantConfig(format="nf4", blocksize=64, double_quant=True, target="*kernel")
    params = qjax.sharding.quantize_params_sharded(dense, mesh, rule, config)
    params = qjax.sharding.shard_params(params, mesh, rule)  # adapters now follow their kernels
    del dense

    lora, frozen = split(params)
    opt = optax.adam(1e-2)
    lora_sh = jax.tree.map(lambda a: a.sharding, lora)
    opt_state = jax.jit(opt.init, out_shardings=qjax.sharding.optimizer_sharding(opt, lora, lora_sh))(lora)

    rng = np.random.default_rng(0)
    batch = 8 * (n // model)
    x_sh = NamedSharding(mesh, P("data"))
    w_true = rng.standard_normal((ARGS.d, ARGS.d)).astype(np.float32) / np.sqrt(ARGS.d)

    @jax.jit
    def step(lora, opt_state, frozen, x, y):
        loss, grads = jax.value_and_grad(lambda l: jnp.mean((forward(l, frozen, x, mesh) - y) ** 2))(lora)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    for i in range(ARGS.steps):
        x = rng.standard_normal((batch, ARGS.d)).astype(np.float32)
        xs = jax.make_array_from_callback(x.shape, x_sh, lambda idx: x[idx])
        ys = jax.make_array_from_callback(x.shape, x_sh, lambda idx: np.tanh(x @ w_true)[idx])
        lora, opt_state, loss = step(lora, opt_state, frozen, xs, ys)
        print(f"step {i}: loss {float(loss):.5f}")
    k = frozen["layer0_up"]["kernel"]
    shard = k.packed.addressable_shards[0]
    print(f"layer0_up codes {k.packed.shape} {k.packed.dtype}: device 0 holds {shard.data.shape} at {shard.index}")


if __name__ == "__main__":
    main()
