"""LoftQ and LLM.int8 on synthetic matrices: reconstruction / product error tables (CPU-friendly).

Usage: PYTHONPATH=. python benchmarks/loftq_error.py [--shape 576 1536] [--rank 16] [--seed 0]
Prints markdown tables (pasted into benchmarks/RESULTS.md).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from qjax._src.adapters.loftq import relative_error


def weights(rng, shape, dist):
    x = rng.standard_normal(shape) if dist == "normal" else rng.standard_t(3.0, size=shape)
    return (0.02 * x).astype(np.float32)


def loftq_table(shape, rank, rng):
    print(f"\n### LoftQ relative error ||dequantize(q) + A B - W|| / ||W||, W {shape}, r={rank}, blocksize 64\n")
    print("| W | format | plain quantization | LoftQ iter 1 | iter 2 | iter 5 | iter 5 randomized SVD | seconds (iter 5, incl. compile) |")
    print("|---|---|---|---|---|---|---|---|")
    for dist in ("normal", "student-t(3)"):
        w = jnp.asarray(weights(rng, shape, "normal" if dist == "normal" else "t"))
        for fmt in ("nf4", "nf3", "nf2"):
            plain = float(relative_error(w, qjax.quantize(w, fmt)))
            errs = []
            for n in (1, 2, 5):
                t = time.perf_counter()
                out = qjax.loftq(w, rank, fmt, num_iter=n, transposed=True)
                jax.block_until_ready(out)
                errs.append(float(relative_error(w, *out)))
                dt = time.perf_counter() - t
            rnd = float(relative_error(w, *qjax.loftq(w, rank, fmt, num_iter=5, transposed=True,
                                                      method="randomized")))
            print(f"| {dist} | {fmt} | {plain:.4f} | {errs[0]:.4f} | {errs[1]:.4f} | {errs[2]:.4f} | "
                  f"{rnd:.4f} | {dt:.1f} |")


def int8_table(rng, m=64, k=1024, n=512):
    print(f"\n### LLM.int8: relative error of x @ W, x ({m}, {k}) N(0,1) with planted outlier columns "
          f"(+-U(20, 60)), W ({k}, {n})\n")
    print("| outlier columns | plain int8 vs x@deq(W) | decomposed vs x@deq(W) | ratio | plain vs x@W | "
          "decomposed vs x@W |")
    print("|---|---|---|---|---|---|")
    w = weights(rng, (k, n), "normal")
    q = qjax.quantize(jnp.asarray(w), "int8", blocksize=None)
    wd = np.asarray(qjax.dequantize(q))
    f = jax.jit(qjax.int8_matmul, static_argnames="threshold")
    for n_out in (0, 1, 4, 16):
        x = np.clip(rng.standard_normal((m, k)), -5, 5).astype(np.float32)
        cols = rng.choice(k, n_out, replace=False)
        x[:, cols] = rng.choice([-1.0, 1.0], (m, n_out)) * rng.uniform(20, 60, (m, n_out))
        plain, dec = np.asarray(f(x, q, threshold=0.0)), np.asarray(f(x, q, threshold=6.0))
        rel = lambda o, ref: np.linalg.norm(o - ref) / np.linalg.norm(ref)  # noqa: E731
        r1, r2 = x @ wd, x @ w
        print(f"| {n_out} | {rel(plain, r1):.5f} | {rel(dec, r1):.5f} | {rel(plain, r1) / rel(dec, r1):.1f}x | "
              f"{rel(plain, r2):.5f} | {rel(dec, r2):.5f} |")


def mixed_table(rng, n_layers=30, d=576, f=1536):
    print(f"\n### Mixed precision footprint: {n_layers} blocks of 7 SmolLM2-135M-shaped kernels\n")
    shapes = {"q": (d, d), "k": (d, 192), "v": (d, 192), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    tree = {f"layers_{i}": {name: jax.ShapeDtypeStruct(s, jnp.bfloat16) for name, s in shapes.items()}
            for i in range(n_layers)}
    print("| rule | quantized bits/param | by format |")
    print("|---|---|---|")
    for k_high in (0, 4, 8, n_layers):
        for dq in (False, True):
            high = qjax.QuantConfig(format="nf4", double_quant=dq)
            low = qjax.QuantConfig(format="nf2", double_quant=dq)
            rules = qjax.first_blocks(k_high, high, low)
            q = jax.eval_shape(lambda t: qjax.quantize_params(t, rules), tree)
            fp = qjax.memory_footprint(q)
            by = ", ".join(f"{k} {v:.3f}" for k, v in fp.bits_by_format().items())
            print(f"| first {k_high} blocks nf4, rest nf2, double_quant={dq} | {fp.quantized_bits_per_param:.3f} | {by} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", type=int, nargs=2, default=(576, 1536))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    loftq_table(tuple(a.shape), a.rank, rng)
    int8_table(rng)
    mixed_table(rng)


if __name__ == "__main__":
    main()
