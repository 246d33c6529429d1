"""Memory of full fine-tuning vs bf16 LoRA vs qjax QLoRA for Llama-shaped models, and CPU step time.

Weights and optimizer state come from abstract shapes (`jax.eval_shape`, no real weights);
peak temporaries from `jit(train_step).lower(...).compile().memory_analysis()` (XLA's estimate for
the backend it runs on). The step-time section trains a small model for real, bf16 LoRA and
QLoRA side by side in one process.

    python benchmarks/qlora_memory.py                 # 1B and 7B tables + CPU step time
    python benchmarks/qlora_memory.py --no-compile    # skip the peak-temporaries column
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import qjax
import qjax.linen as ql
from qjax.optim import adapters_only, merge_adapters, split_adapters


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


CONFIGS = {
    "llama-1B": LlamaConfig(vocab=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn=8192),
    "llama-7B": LlamaConfig(vocab=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn=11008),
    "tiny": LlamaConfig(vocab=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, ffn=704),
}


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (y * scale[None, None]).astype(x.dtype)


class Block(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, h, _):
        c, dt = self.cfg, jnp.bfloat16
        dense = lambda f, name: nn.Dense(f, use_bias=False, dtype=dt, param_dtype=dt, name=name)
        x = RMSNorm(name="attn_norm")(h)
        b, s, _ = x.shape
        q = dense(c.n_heads * c.head_dim, "q_proj")(x).reshape(b, s, c.n_heads, c.head_dim)
        k = dense(c.n_kv_heads * c.head_dim, "k_proj")(x).reshape(b, s, c.n_kv_heads, c.head_dim)
        v = dense(c.n_kv_heads * c.head_dim, "v_proj")(x).reshape(b, s, c.n_kv_heads, c.head_dim)
        rep = c.n_heads // c.n_kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        mask = jnp.tril(jnp.ones((s, s), bool))[None, None]
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c.head_dim).astype(np.float32)
        att = jax.nn.softmax(jnp.where(mask, att.astype(jnp.float32), -1e30), axis=-1).astype(dt)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, c.n_heads * c.head_dim)
        h = h + dense(c.d_model, "o_proj")(o)
        x = RMSNorm(name="mlp_norm")(h)
        gate = dense(c.ffn, "gate_proj")(x)
        up = dense(c.ffn, "up_proj")(x)
        return h + dense(c.d_model, "down_proj")(jax.nn.silu(gate) * up), None


class Llama(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        h = nn.Embed(c.vocab, c.d_model, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="embed")(tokens)
        layers = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                         length=c.n_layers)
        h, _ = layers(c, name="layers")(h, None)
        h = RMSNorm(name="final_norm")(h)
        return nn.Dense(c.vocab, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="lm_head")(h)


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def _loss(model, params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
    labels = tokens[:, 1:]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def build(cfg: LlamaConfig, mode: str, tokens):
    """(model, abstract-or-concrete params builder) for mode in full / lora16 / qlora."""
    model = Llama(cfg)
    init = lambda: model.init(jax.random.key(0), tokens)
    if mode == "full":
        return model, init
    # "qlora": the default policy (embedding, lm_head and norms stay 16-bit, as bitsandbytes/PEFT);
    # "qlora_head": lm_head quantized too (frozen, no adapter), only the embedding and norms kept.
    skip = {"qlora": qjax.DEFAULT_SKIP, "qlora_head": ("*embed*", "*norm*")}
    quant = (qjax.QuantConfig(format="nf4", blocksize=64, double_quant=True, skip=skip[mode])
             if mode in skip else None)
    lora = qjax.LoraConfig(r=16, alpha=32)
    holder = {}

    def convert():
        holder["model"], qv = ql.convert(model, init(), lora, quant, jax.random.key(1), inputs=(tokens,))
        return qv
    jax.eval_shape(convert)  # abstractly, to get the converted model class
    return holder["model"], convert


def make_step(model, mode, tx):
    if mode == "full":
        def step(params, opt_state, tokens):
            loss, grads = jax.value_and_grad(lambda p: _loss(model, p, tokens))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss
        return step

    def step(params, opt_state, tokens):
        adapters, rest = split_adapters(params)
        loss, grads = jax.value_and_grad(lambda a: _loss(model, merge_adapters(a, rest), tokens))(adapters)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def memory_row(name, cfg, mode, batch, seq, compile_it):
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    model, builder = build(cfg, mode, tokens)
    variables = jax.eval_shape(builder)
    params = variables["params"]
    tx = optax.adamw(1e-4) if mode == "full" else adapters_only(optax.adamw(1e-4))
    opt_state = jax.eval_shape(tx.init, params)
    row = {"model": name, "mode": mode, "weights": _nbytes(params), "opt_state": _nbytes(opt_state),
           "n_params": sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)), "temp": None}
    if compile_it:
        t0 = time.perf_counter()
        compiled = jax.jit(make_step(model, mode, tx), donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
        mem = compiled.memory_analysis()
        row["temp"] = mem.temp_size_in_bytes if mem is not None else None
        row["compile_s"] = time.perf_counter() - t0
    return row


def gib(n):
    return "-" if n is None else f"{n / 2**30:.2f}"


def memory_table(compile_it, batch, seq):
    lines = [f"batch={batch} seq={seq}, adamw, LoRA r=16 on q/k/v/o/gate/up/down (all-linear minus lm_head), "
             "QLoRA = NF4 blocksize 64 + double quant; embed/lm_head/norms stay bf16/f32", "",
             "| model | mode | weights GiB | opt state GiB | weights+opt GiB | x bf16 LoRA | peak temp GiB |",
             "|---|---|---|---|---|---|---|"]
    for name in ("llama-1B", "llama-7B"):
        modes = ("full", "lora16", "qlora", "qlora_head")
        rows = {m: memory_row(name, CONFIGS[name], m, batch, seq, compile_it) for m in modes}
        ref = rows["lora16"]["weights"] + rows["lora16"]["opt_state"]
        for mode, label in (("full", "full FT (bf16)"), ("lora16", "bf16 LoRA"), ("qlora", "qjax QLoRA"),
                            ("qlora_head", "qjax QLoRA, lm_head NF4")):
            r = rows[mode]
            tot = r["weights"] + r["opt_state"]
            lines.append(f"| {name} ({rows['full']['n_params'] / 1e9:.2f}B params) | {label} | {gib(r['weights'])} | "
                         f"{gib(r['opt_state'])} | {gib(tot)} | {tot / ref:.3f} | {gib(r['temp'])} |")
        print("\n".join(lines[-len(modes):]), flush=True)
    return "\n".join(lines)


def step_time(steps=10, batch=4, seq=64):
    cfg = CONFIGS["tiny"]
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab)
    out = {}
    for mode in ("lora16", "qlora"):
        model, builder = build(cfg, mode, tokens)
        params = builder()["params"]
        tx = adapters_only(optax.adamw(1e-3))
        opt_state = tx.init(params)
        step = jax.jit(make_step(model, mode, tx))
        params, opt_state, loss = step(params, opt_state, tokens)
        jax.block_until_ready(loss)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, tokens)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t0)
        out[mode] = float(np.median(times))
    return (f"tiny Llama (d=256, 2 layers, vocab 512), batch={batch} seq={seq}, median of {steps} jitted steps: "
            f"bf16 LoRA {out['lora16'] * 1e3:.1f} ms, QLoRA {out['qlora'] * 1e3:.1f} ms, "
            f"ratio QLoRA/bf16 LoRA {out['qlora'] / out['lora16']:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true", help="skip the peak-temporaries column")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(memory_table(not args.no_compile, args.batch, args.seq))
    print(step_time())


if __name__ == "__main__":
    main()
