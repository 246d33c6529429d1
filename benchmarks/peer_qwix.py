"""Benchmark: qjax against qwix (Google's JAX quantization/LoRA library) on the same tunix NNX Llama3.

The model is tunix's own `Llama3` (tunix.models.llama3.model: attention projections are tunix
`Einsum` modules with 3-D kernels, the MLP is nnx.Linear), shaped like SmolLM2-135M (d 576, 9
query / 3 KV heads of 64, FFN 1536, vocab 49152, tied embeddings) but with `--layers` layers.
tunix initializes the MLP kernels to zeros; they are redrawn (normal * 0.02) so every projection
carries signal. Both variants get rank-16 (alpha 32) adapters on q/k/v/o/gate/up/down, every zero
adapter factor redrawn (normal * 0.01, so both factors get gradients), and train the adapters alone
with adamw on the next-token loss, in one process, one after the other:

- qwix: `qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=..., rank=16, alpha=32,
  weight_qtype="nf4", tile_size=64), *inputs, rngs=...)`: QLoRA (the base kernels stored as qwix
  NF4 QArrays, uint4 codes + one scale per 64 contraction entries, in the param dtype), or plain
  LoRA with `--qwix-lora` (or if NF4 fails; the table says which).
- qjax: `qjax.nnx.convert(model, qjax.LoraConfig(r=16, alpha=32, target_modules=TARGETS), qjax.QuantConfig(), nnx.Rngs(0),
  inputs=<f(model): one forward>)` (NF4 + double quant, blocksize 64). If that call fails (the
  any-model conversion is new), the script prints `qjax: not available (<error>)` and reports qwix alone.

    python -m benchmarks.peer_qwix                       # 4 layers, batch 2 x 128, float32
    python -m benchmarks.peer_qwix --layers 2 --steps 3  # quick check on a CPU
    python -m benchmarks.peer_qwix --dtype bfloat16 --layers 30 --batch 8 --seq 512

Reported per variant: compile time of the jitted train step (`.lower(...).compile()`), the median
of `--steps` individually synchronized steps after one warm-up step, and the compiled step's
memory (`memory_analysis()`: argument, temporary and output bytes), with ratios qjax / qwix.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qjax.models.text import next_token_loss

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# SmolLM2-135M: 30 layers, d 576, FFN 1536, 9 query / 3 KV heads of 64, vocab 49152, tied embeddings.
SMOLLM2 = dict(vocab_size=49152, embed_dim=576, hidden_dim=1536, num_heads=9, head_dim=64, num_kv_heads=3,
               rope_theta=100_000, norm_eps=1e-5, weight_tying=True)


def tunix_llama3():
    """tunix.models.llama3.model, imported under an empty `tunix` package (tunix/__init__ needs its trainer stack)."""
    if "tunix" not in sys.modules:
        spec = importlib.util.find_spec("tunix")
        if spec is None:
            raise SystemExit("needs `pip install --no-deps google-tunix==0.1.7 qwix==0.1.8` and `pip install "
                             "jaxtyping einops`")
        pkg = types.ModuleType("tunix")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["tunix"] = pkg
    return importlib.import_module("tunix.models.llama3.model")


def build(layers: int, dtype, seed: int = 0) -> nnx.Module:
    """A random SmolLM2-shaped tunix Llama3 with `layers` layers, every parameter in dtype, no all-zero kernel."""
    mod = tunix_llama3()
    model = mod.Llama3(mod.ModelConfig(num_layers=layers, **SMOLLM2), rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            value = node.get_value()
            if not jnp.any(value):
                key, sub = jax.random.split(key)
                value = jax.random.normal(sub, value.shape, jnp.float32) * 0.02
            node.set_value(value.astype(dtype))
    return model


def forward(model, ids):
    """Logits (batch, seq, vocab) float32 of tunix's causal call model(ids, positions, None, mask)."""
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), jnp.bool_)), (b, t, t))
    logits, _ = model(ids, positions, None, mask)
    return logits.astype(jnp.float32)


def with_qwix(model, ids, nf4: bool):
    """(model, mode): qwix LoRA r=16 on TARGETS, base NF4 (QLoRA, tile 64) if nf4 and qwix accepts it, else plain."""
    import qwix

    b, t = ids.shape
    inputs = (ids, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), None,
              jnp.broadcast_to(jnp.tril(jnp.ones((t, t), jnp.bool_)), (b, t, t)))
    rule = dict(module_path=r".*/(" + "|".join(TARGETS) + ")", rank=16, alpha=32.0)
    if nf4:
        try:
            provider = qwix.LoraProvider(**rule, weight_qtype="nf4", tile_size=64)
            return qwix.apply_lora_to_model(model, provider, *inputs, rngs=nnx.Rngs(0)), "QLoRA nf4/64"
        except Exception as e:  # noqa: BLE001 - fall back to plain LoRA, and say so
            print(f"qwix: nf4 QLoRA failed ({type(e).__name__}: {e}); plain LoRA instead")
    return qwix.apply_lora_to_model(model, qwix.LoraProvider(**rule), *inputs, rngs=nnx.Rngs(0)), "LoRA"


def with_qjax(model, ids):
    """(model, mode): qjax.nnx.convert with LoraConfig(r=16, alpha=32) on TARGETS and the default QuantConfig
    (NF4 + DQ, blocksize 64)."""
    import qjax
    import qjax.nnx

    model = qjax.nnx.convert(model, qjax.LoraConfig(r=16, alpha=32, target_modules=list(TARGETS)), qjax.QuantConfig(),
                             nnx.Rngs(0),
                             inputs=lambda m: forward(m, ids))
    return model, "QLoRA nf4+dq/64"


def measure(name: str, mode: str, model, ids, steps: int) -> dict:
    """Compiles and times an adapters-only adamw step of `model` (its nnx.LoRAParam leaves) on ids."""
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype) * 0.01
                            if not jnp.any(a) else a, adapters)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(adapters)

    def loss(adapters, rest, ids):
        return next_token_loss(forward(nnx.merge(graphdef, adapters, rest), ids), ids)

    def step(adapters, opt_state, rest, ids):
        value, grads = jax.value_and_grad(loss)(adapters, rest, ids)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(adapters, opt_state, rest, ids).compile()
    compile_s = time.perf_counter() - t0
    adapters, opt_state, first = compiled(adapters, opt_state, rest, ids)  # warm-up
    jax.block_until_ready(first)
    times, value = [], first
    for _ in range(steps):
        t1 = time.perf_counter()
        adapters, opt_state, value = compiled(adapters, opt_state, rest, ids)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - t1)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    out = dict(name=name, mode=mode, compile_s=compile_s, step_ms=1e3 * statistics.median(times),
               base_bytes=nbytes(rest), adapter_bytes=nbytes(adapters), n_adapters=len(jax.tree.leaves(adapters)),
               loss_first=float(first), loss_last=float(value))
    mem = compiled.memory_analysis()
    if mem is not None:
        out.update(argument_bytes=mem.argument_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                   output_bytes=mem.output_size_in_bytes)
    return out


def table(results, header: str) -> str:
    """A markdown table of `measure` results, each row with its ratio to the qwix row (x qwix)."""
    base = next((r for r in results if r["name"] == "qwix"), None)
    mib = lambda v: "" if v is None else f"{v / 2**20:,.1f}"  # noqa: E731

    def cell(r, key, fmt):
        v = r.get(key)
        if v is None:
            return ""
        s = fmt(v)
        if base is not None and r is not base and base.get(key):
            s += f" ({v / base[key]:.2f})"
        return s

    lines = [header, "| library | mode | adapters | compile s (x qwix) | step ms, median (x qwix) | argument MiB (x qwix) "
             "| temp MiB (x qwix) | output MiB | base MiB | loss first -> last |", "|" + "---|" * 10]
    for r in results:
        lines.append(f"| {r['name']} | {r['mode']} | {r['n_adapters']} | {cell(r, 'compile_s', lambda v: f'{v:.1f}')} "
                     f"| {cell(r, 'step_ms', lambda v: f'{v:.1f}')} | {cell(r, 'argument_bytes', mib)} "
                     f"| {cell(r, 'temp_bytes', mib)} | {mib(r.get('output_bytes'))} | {mib(r['base_bytes'])} "
                     f"| {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    parser.add_argument("--qwix-lora", action="store_true", help="qwix without NF4 (plain LoRA on a dense base)")
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    ids = jax.random.randint(jax.random.key(3), (args.batch, args.seq), 0, SMOLLM2["vocab_size"], jnp.int32)
    results = []
    model, mode = with_qwix(build(args.layers, dtype), ids, nf4=not args.qwix_lora)
    results.append(measure("qwix", mode, model, ids, args.steps))
    del model
    try:
        model, mode = with_qjax(build(args.layers, dtype), ids)
    except Exception as e:  # noqa: BLE001 - the qwix half still reports
        print(f"qjax: not available ({type(e).__name__}: {e})")
    else:
        try:
            results.append(measure("qjax", mode, model, ids, args.steps))
        except Exception as e:  # noqa: BLE001 - converted, but its train step failed: still print qwix's row
            print(f"qjax: train step failed ({type(e).__name__}: {str(e).splitlines()[0]})")
    header = (f"# {time.strftime('%Y-%m-%d')} | {jax.devices()[0].device_kind} | jax {jax.__version__} | tunix Llama3, "
              f"SmolLM2-135M shape, {args.layers} layers | {args.dtype} params | batch {args.batch} x {args.seq} | "
              f"r 16 on {'/'.join(t.split('_')[0] for t in TARGETS)} | adamw on adapters | median of {args.steps} steps")
    print(table(results, header))
    return results


if __name__ == "__main__":
    main()
