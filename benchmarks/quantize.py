"""Quantize / dequantize throughput: qjax (XLA, jit) against bitsandbytes' CPU functions.

Run: python benchmarks/quantize.py [--mb 64] [--repeats 5]
Prints one table: GB/s of 16-bit input (bf16 weights), NF4 with and without double quant.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax


def _best_time(fn, repeats):
    fn()  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=64, help="size of the bf16 weight in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch
    import bitsandbytes.functional as F

    n = args.mb * 2**20 // 2
    cols = 4096
    x_np = np.random.default_rng(0).standard_normal((n // cols, cols)).astype(np.float32)
    x = jnp.asarray(x_np, jnp.bfloat16)
    t = torch.from_numpy(x_np).to(torch.bfloat16)
    gb = x.size * 2 / 1e9
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), weight {x.shape} bfloat16 = {args.mb} MiB")
    rows = []
    for dq in (False, True):
        quant = jax.jit(lambda a: qjax.quantize(a, "nf4", blocksize=64, double_quant=dq))
        deq = jax.jit(qjax.dequantize)
        q = quant(x)
        tq = _best_time(lambda: jax.block_until_ready(quant(x)), args.repeats)
        td = _best_time(lambda: jax.block_until_ready(deq(q)), args.repeats)
        packed, state = F.quantize_4bit(t, blocksize=64, compress_statistics=dq, quant_type="nf4")
        bq = _best_time(lambda: F.quantize_4bit(t, blocksize=64, compress_statistics=dq, quant_type="nf4"),
                        args.repeats)
        bd = _best_time(lambda: F.dequantize_4bit(packed, state), args.repeats)
        name = "nf4+dq" if dq else "nf4"
        rows.append((name, "quantize", gb / tq, gb / bq))
        rows.append((name, "dequantize", gb / td, gb / bd))
    print(f"{'format':8} {'op':11} {'qjax GB/s':>10} {'bnb GB/s':>10} {'qjax/bnb':>9}")
    for name, op, ours, theirs in rows:
        print(f"{name:8} {op:11} {ours:10.2f} {theirs:10.2f} {ours / theirs:9.2f}")


if __name__ == "__main__":
    main()
