"""Benchmark: qjax.qmatmul against a dense matmul in the same dtype, in one process.

For each K = N and M it times, with the same x:
  dense      x @ W                     (W dense in the compute dtype, as a bf16/f32 layer holds it)
  unfused    x @ dequantize(q)         (two jitted calls: the dense W is written to memory, then read)
  xla        qmatmul(x, q, backend="xla")     (dequant fused into the same jitted computation)
  pallas     qmatmul(x, q, backend="pallas")  (only on a GPU)
and prints time, the ratio to dense, the bytes each one must move at least, and the fraction of
the memory bandwidth that is (bytes / time / bandwidth; bandwidth measured here with a large copy,
or the H100 SXM spec 3.35 TB/s on a GPU). q is NF4 with double quantization in torch's
`(out, in)` storage, as bitsandbytes/PEFT checkpoints hold it.

    python benchmarks/qmatmul.py                        # the issue's full grid
    python benchmarks/qmatmul.py --sizes 2048 4096 --ms 1 16 256 --dtypes float32 bfloat16
    python benchmarks/qmatmul.py --layers 16 ...    # stream 16 distinct weights per timed call

With `--layers L` each timed call runs over L distinct weights (times are per weight), so the
weights do not stay in a large last-level cache between calls, as a model's layers do not.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3 spec


def _time(fn, *args, iters: int, min_time: float = 0.2) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    start = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - start < min_time and len(times) < 50 * iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth() -> float:
    """Read bandwidth (bytes/s) of a dense float32 GEMV over a 64 MiB matrix: the roof here.

    On a GPU the H100 SXM spec is used instead (this script does not know the card's clocks).
    """
    if jax.default_backend() == "gpu":
        return H100_BANDWIDTH
    a = jnp.ones((4096, 4096), jnp.float32)  # 64 MiB, beyond the caches
    v = jnp.ones((1, 4096), jnp.float32)
    t = _time(jax.jit(lambda v, a: v @ a), v, a, iters=10)
    return a.nbytes / t


def _bytes(m, k, n, itemsize, weight_bytes):
    return weight_bytes + (m * k + m * n) * itemsize


def _over_layers(fn):
    """fn(x, w) -> one jitted call running fn on every weight of a tuple."""
    return jax.jit(lambda x, ws: [fn(x, w) for w in ws])


def run(sizes, ms, dtypes, iters, layers=1):
    bandwidth = measure_bandwidth()
    on_gpu = jax.default_backend() == "gpu"
    print(f"# {datetime.date.today()} | {platform.node()} | {jax.devices()[0].device_kind} | "
          f"jax {jax.__version__} | bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"({'H100 spec' if on_gpu else 'measured: dense f32 GEMV, 64 MiB'}) | "
          f"{layers} distinct weight(s) per timed call, times per weight")
    header = (f"| dtype | K=N | M | dense ms | unfused ms (x) | xla ms (x) |"
              f"{' pallas ms (x) |' if on_gpu else ''} dense GB | q GB | dense BW % | xla BW % |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rng = np.random.default_rng(0)
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        for k in sizes:
            n = k
            ws = [jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02, dtype) for _ in range(layers)]
            qs = tuple(jax.block_until_ready(qjax.quantize(w, "nf4", double_quant=True, transposed=True))
                       for w in ws)
            del ws
            q = qs[0]
            w_dense = tuple(jax.block_until_ready(qjax.dequantize(qi, dtype)) for qi in qs)
            dense = _over_layers(lambda x, w: x @ w)
            dequant = jax.jit(lambda qs: [qjax.dequantize(qi, dtype) for qi in qs])
            unfused = lambda x, qs: dense(x, dequant(qs))  # noqa: E731
            fused = _over_layers(lambda x, q: qjax.qmatmul(x, q, backend="xla"))
            pallas = _over_layers(lambda x, q: qjax.qmatmul(x, q, backend="pallas"))
            for m in ms:
                x = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
                t_dense = _time(dense, x, w_dense, iters=iters) / layers
                t_unfused = _time(unfused, x, qs, iters=iters) / layers
                t_xla = _time(fused, x, qs, iters=iters) / layers
                dense_bytes = _bytes(m, k, n, dtype.itemsize, k * n * dtype.itemsize)
                q_bytes = _bytes(m, k, n, dtype.itemsize, q.nbytes)
                row = (f"| {dtype_name} | {k} | {m} | {t_dense * 1e3:.3f} | "
                       f"{t_unfused * 1e3:.3f} ({t_unfused / t_dense:.2f}) | {t_xla * 1e3:.3f} ({t_xla / t_dense:.2f}) |")
                if on_gpu:
                    t_pallas = _time(pallas, x, qs, iters=iters) / layers
                    row += f" {t_pallas * 1e3:.3f} ({t_pallas / t_dense:.2f}) |"
                row += (f" {dense_bytes / 1e9:.4f} | {q_bytes / 1e9:.4f} | "
                        f"{100 * dense_bytes / t_dense / bandwidth:.0f} | {100 * q_bytes / t_xla / bandwidth:.0f} |")
                print(row, flush=True)
    print("(x) = time / dense time in the same dtype: < 1 is faster than dense. "
          "BW % = minimum bytes moved / time / bandwidth.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="K = N values")
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 256, 2048], help="rows of x")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--layers", type=int, default=1,
                        help="distinct weights per timed call (more than the last-level cache holds: streamed)")
    args = parser.parse_args()
    run(args.sizes, args.ms, args.dtypes, args.iters, args.layers)


if __name__ == "__main__":
    main()
