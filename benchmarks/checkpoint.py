"""Save / restore time and bytes on disk: a Llama-3.2-1B-shaped tree in bf16 vs NF4 (plain orbax).

The bf16 tree holds Gaussian weights. The NF4 trees have the exact leaf shapes and dtypes
`qjax.quantize(..., "nf4", double_quant=True)` gives (linear kernels quantized; embeddings kept
in bf16 as DEFAULT_SKIP does, or quantized too), filled with random bytes: quantizing 1.2B
parameters on a shared 2-core machine takes longer than the benchmark, and NF4 codes of
Gaussian weights are close to uniform over the 16 levels (NF4 levels are normal quantiles), so
random bytes compress as real codes do (orbax's tensorstore writes zstd-compressed chunks). Run: python benchmarks/checkpoint.py [--layers 16] [--dir /tmp/qjax_bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import qjax

D, FFN, KV, VOCAB = 2048, 8192, 512, 128256


def shapes(layers: int) -> dict:
    layer = {"self_attn": {"q_proj": (D, D), "k_proj": (D, KV), "v_proj": (D, KV), "o_proj": (D, D)},
             "mlp": {"gate_proj": (D, FFN), "up_proj": (D, FFN), "down_proj": (FFN, D)}}
    return {"embed_tokens": (VOCAB, D), "norm": (D,), **{f"layers_{i}": layer for i in range(layers)}}


def _random(rng, shape, dtype):
    n = int(np.prod(shape))
    if np.dtype(dtype) == np.dtype(jnp.bfloat16):  # Gaussian weights: their compressibility is realistic
        return jnp.asarray(rng.standard_normal(n, dtype=np.float32).reshape(shape) * 0.02, jnp.bfloat16)
    if np.dtype(dtype) == np.uint8:
        return jnp.asarray(rng.integers(0, 256, n, dtype=np.uint8).reshape(shape))
    return jnp.asarray(rng.random(n, dtype=np.float32).reshape(shape))


def build(layers: int, quantized: bool, rng, embeddings_too: bool = False):
    def leaf(shape, name):
        if len(shape) == 1:
            return {"scale": _random(rng, shape, jnp.bfloat16)}
        if name == "embed_tokens" and not (quantized and embeddings_too):
            return {"embedding": _random(rng, shape, jnp.bfloat16)}
        if not quantized:
            return {"kernel": _random(rng, shape, jnp.bfloat16)}
        abstract = jax.eval_shape(lambda: qjax.quantize(jnp.zeros(shape, jnp.bfloat16), "nf4", double_quant=True))
        return {"kernel": jax.tree.map(lambda s: _random(rng, s.shape, s.dtype), abstract)}

    def walk(tree, name=""):
        if isinstance(tree, tuple):
            return leaf(tree, name)
        return {k: walk(v, k) for k, v in tree.items()}

    return {"params": walk(shapes(layers))}


def du(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def bench(tree, path):
    shutil.rmtree(path, ignore_errors=True)
    jax.block_until_ready(tree)
    ck = ocp.StandardCheckpointer()
    t0 = time.perf_counter()
    ck.save(path, tree)
    ck.wait_until_finished()
    t_save = time.perf_counter() - t0
    abstract = jax.eval_shape(lambda: tree)
    t0 = time.perf_counter()
    out = jax.block_until_ready(ck.restore(path, abstract))
    t_restore = time.perf_counter() - t0
    ok = all(np.asarray(a).tobytes() == np.asarray(b).tobytes() and a.dtype == b.dtype
             for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)))
    ck.close()
    return t_save, t_restore, du(path), ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dir", default="/tmp/qjax_ckpt_bench")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, quantized, emb in (("bf16", False, False), ("nf4+dq, bf16 embeddings", True, False),
                                 ("nf4+dq, embeddings too", True, True)):
        tree = build(args.layers, quantized, rng, emb)
        n_params = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes(args.layers), is_leaf=lambda x: isinstance(x, tuple)))
        mem = sum(x.nbytes for x in jax.tree.leaves(tree))
        t_save, t_restore, disk, ok = bench(tree, os.path.join(args.dir, name))
        rows.append((name, n_params, mem, disk, t_save, t_restore, ok))
        del tree
    shutil.rmtree(args.dir, ignore_errors=True)
    print("| tree | params | in memory (GB) | on disk (GB) | disk vs bf16 | save (s) | restore (s) | bit-identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, mem, disk, ts, tr, ok in rows:
        print(f"| {name} | {n / 1e9:.3f} B | {mem / 1e9:.3f} | {disk / 1e9:.3f} | {disk / rows[0][3]:.3f} | "
              f"{ts:.2f} | {tr:.2f} | {ok} |")


if __name__ == "__main__":
    main()
