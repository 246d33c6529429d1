"""Benchmark: tokens/s and device memory of a QLoRA train step against a bf16 LoRA step, same Llama.

Both variants are the same Linen Llama (`qjax.models.llama`, `remat=True`, bf16 compute) with
rank-16 LoRA adapters on all seven projections of every block, trained by adamw on the adapters
alone (float32); the base is NF4 + double quant (QLoRA: embeddings and norms kept in bf16, as
qjax's default skip) or bf16 (LoRA). One variant per process, so the device's peak memory counter
belongs to that variant alone.

    python -m benchmarks.train_step --variant qlora           # Llama-3.2-1B shape, batch 4 x 512
    python -m benchmarks.train_step --variant lora --layers 4 --json lora.json
    python -m benchmarks.train_step --variant qlora --dry-run  # a tiny Llama: proves the script on a CPU

Reported: tokens/s over `--steps` steps after a compiled, warmed-up one (dispatched back to back,
synchronized once), the compiled step's memory (`memory_analysis()`: arguments, temporaries,
outputs; its peak estimate is arguments + temporaries + outputs - aliased), and the process's
peak device bytes (`memory_stats()['peak_bytes_in_use']`, where the backend reports it; it
includes initialization and quantization).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import optax

import qjax
import qjax.linen
from qjax.models.llama import LlamaConfig, LlamaForCausalLM
from qjax.models.text import next_token_loss
from qjax.optim import merge_adapters, split_adapters

# Llama-3.2-1B: 16 layers, d 2048, FFN 8192, 32 query / 8 KV heads, vocab 128256, tied embeddings.
LLAMA_1B = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=131072, tie_word_embeddings=True)


def qlora_llama(config: LlamaConfig, *, quantized: bool, backend: str = "auto", dtype=jnp.bfloat16, r: int = 16,
                seed: int = 0):
    """(model, adapters, rest): a random Llama with LoRA on all-linear, base NF4 + DQ or dense in dtype.

    adapters: the float32 lora_a / lora_b tree (lora_b drawn at random, not PEFT's zeros, so
    gradients of both factors are nonzero); rest: everything frozen. backend: qmatmul's.
    """
    model = LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, remat=True)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    quant = qjax.QuantConfig(format="nf4", blocksize=64, double_quant=True, compute_dtype=dtype) if quantized else None
    qmodel, qvars = qjax.linen.convert(model, {"params": params}, qjax.LoraConfig(r=r, alpha=2 * r,
                                       target_modules="all-linear"), quant, jax.random.key(seed + 1), backend=backend)
    adapters, rest = split_adapters(qvars["params"])
    keys = iter(jax.random.split(jax.random.key(seed + 2), len(jax.tree.leaves(adapters))))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.random.normal(next(keys), a.shape, a.dtype) * 0.01 if "lora_b" in str(p) else a, adapters)
    return qmodel, adapters, rest


def loss_fn(model):
    """(adapters, rest, ids (batch, seq) int32) -> mean next-token loss, float32."""
    return lambda adapters, rest, ids: next_token_loss(model.apply({"params": merge_adapters(adapters, rest)}, ids), ids)


def make_step(model, tx):
    """jitted (adapters, opt_state, rest, ids) -> (adapters, opt_state, loss); adapters and state donated."""
    loss = loss_fn(model)

    def step(adapters, opt_state, rest, ids):
        value, grads = jax.value_and_grad(loss)(adapters, rest, ids)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def measure(config: LlamaConfig, variant: str, *, batch: int, seq: int, steps: int, backend: str = "auto") -> dict:
    """Compiles and times `steps` train steps of one variant ("qlora" or "lora"); returns a dict of results."""
    t0 = time.perf_counter()
    model, adapters, rest = qlora_llama(config, quantized=variant == "qlora", backend=backend)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(adapters)
    ids = jax.random.randint(jax.random.key(3), (batch, seq), 0, config.vocab_size, jnp.int32)
    step = make_step(model, tx)
    t_setup = time.perf_counter() - t0
    compiled = step.lower(adapters, opt_state, rest, ids).compile()
    t_compile = time.perf_counter() - t0 - t_setup
    mem = compiled.memory_analysis()
    adapters, opt_state, first = compiled(adapters, opt_state, rest, ids)  # warm-up
    jax.block_until_ready(first)
    t1 = time.perf_counter()
    losses = []
    for _ in range(steps):
        adapters, opt_state, loss = compiled(adapters, opt_state, rest, ids)
        losses.append(loss)
    jax.block_until_ready(losses)
    elapsed = time.perf_counter() - t1
    stats = jax.devices()[0].memory_stats() or {}
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    out = dict(variant=variant, device=jax.devices()[0].device_kind, jax=jax.__version__, backend=backend,
               config=dataclasses.asdict(config), batch=batch, seq=seq, steps=steps,
               tokens_per_s=batch * seq * steps / elapsed, step_ms=1e3 * elapsed / steps,
               setup_s=t_setup, compile_s=t_compile, loss_first=float(first), loss_last=float(losses[-1]),
               base_bytes=nbytes(rest), adapter_bytes=nbytes(adapters),
               peak_bytes_in_use=stats.get("peak_bytes_in_use"))
    if mem is not None:
        out.update(argument_bytes=mem.argument_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                   output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                   step_bytes=mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes)
    return out


def table(results) -> str:
    """A markdown table of `measure` results, each row with its ratio to the "lora" row if there is one."""
    base = next((r for r in results if r["variant"] == "lora"), None)
    gib = lambda v: "" if v is None else f"{v / 2**30:.2f}"  # noqa: E731
    lines = ["| variant | layers | batch x seq | tokens/s (x LoRA) | step ms | compile s | base GiB | "
             "step GiB (x LoRA) | temp GiB | peak GiB | loss first -> last |", "|" + "---|" * 11]
    for r in results:
        rate, mem = f"{r['tokens_per_s']:,.0f}", gib(r.get("step_bytes"))
        if base is not None and r is not base:
            rate += f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f})"
            if r.get("step_bytes") and base.get("step_bytes"):
                mem += f" ({r['step_bytes'] / base['step_bytes']:.2f})"
        lines.append(f"| {r['variant']} | {r['config']['num_hidden_layers']} | {r['batch']} x {r['seq']} | {rate} | "
                     f"{r['step_ms']:.1f} | {r['compile_s']:.0f} | {gib(r['base_bytes'])} | {mem} | "
                     f"{gib(r.get('temp_bytes'))} | {gib(r.get('peak_bytes_in_use'))} | "
                     f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["qlora", "lora"], required=True)
    parser.add_argument("--layers", type=int, default=LLAMA_1B.num_hidden_layers)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny Llama (backend 'auto': the XLA path on a CPU): proves the script")
    parser.add_argument("--json", default=None, help="write the result to this file")
    args = parser.parse_args(argv)
    config = dataclasses.replace(LLAMA_1B, num_hidden_layers=args.layers)
    if args.dry_run:  # every projection's storage rows are whole 64-blocks, so each one has a kernel
        config = LlamaConfig.tiny(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
    result = measure(config, args.variant, batch=args.batch, seq=args.seq, steps=args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(table([result]))
    return result


if __name__ == "__main__":
    main()
