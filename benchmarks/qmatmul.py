"""Benchmark: qjax.qmatmul against a dense matmul in the same dtype, in one process.

For each (K, N) and M it times, with the same x:
  dense      x @ W                     (W dense in the compute dtype, as a bf16/f32 layer holds it)
  unfused    x @ dequantize(q)         (two jitted calls: the dense W is written to memory, then read)
  xla        qmatmul(x, q, backend="xla")     (dequant fused into the same jitted computation)
  pallas     qmatmul(x, q, backend="pallas")  (the kernel `qjax.kernels.dispatch` picks; GPU, or
             interpret mode with --interpret)
and prints time, the ratio to dense, the bytes each one must move at least, the achieved GB/s
(those bytes / time) and its fraction of the roof: on a GPU a large device-to-device copy measured
in the same process (bytes read + written), on the CPU a dense float32 GEMV over 64 MiB. q is NF4
with double quantization in torch's `(out, in)` storage, as bitsandbytes/PEFT checkpoints hold it.

    python benchmarks/qmatmul.py                        # K = N in {2048, 4096, 8192}
    python benchmarks/qmatmul.py --sizes 2048 4096 --ms 1 16 256 --dtypes float32 bfloat16
    python benchmarks/qmatmul.py --layers 16 ...    # stream 16 distinct weights per timed call
    python -m benchmarks.qmatmul --shapes issue --backends dense pallas xla --json rows.jsonl --budget 120

Each timed call runs over several distinct weights (unrolled in one jitted call; times are per
weight): at least `--layers`, and enough that their bytes pass `--rotate-mib` (default 256 MiB,
over 4x the 50-60 MB L2 of an H100/H200), so weights stream from memory as a model's layers do.
A time is the median over `--iters` samples, each sample `reps` calls dispatched back to back
(asynchronously) and synchronized once, so launch latency overlaps device work. `--shapes issue`
is issue 20's grid: K = N in {4096, 8192} and the Llama-3-8B / 70B projections, M in
{1, 8, 16, 64, 256, 1024, 4096}, ordered by importance (`issue_rows`); `--budget` stops
starting new rows after that many seconds; `--json` appends one JSON object per row as it is
measured, so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import qjax

BACKENDS = ("dense", "unfused", "xla", "pallas")
ROTATE_BYTES = 256 << 20  # > 4x the L2 of an H100 (50 MB) or H200 (60 MB)
MAX_COPIES = 32

# (name, K, N): Llama-3-8B (d 4096, FFN 14336, 8 KV heads x 128) and 70B (d 8192, FFN 28672) projections.
LLAMA3_SHAPES = [("8B q/o", 4096, 4096), ("8B k/v", 4096, 1024), ("8B gate/up", 4096, 14336),
                 ("8B down", 14336, 4096), ("70B q/o", 8192, 8192), ("70B k/v", 8192, 1024),
                 ("70B gate/up", 8192, 28672), ("70B down", 28672, 8192)]
ISSUE_MS = (1, 8, 16, 64, 256, 1024, 4096)


def issue_rows(ms=ISSUE_MS):
    """Issue 20's (name, K, N, M) rows, most important first: K = N = 8192 and 4096 at M in
    {1, 16, 256, 4096}, then their other M, then the Llama-3 projections likewise."""
    square = [("K=N=8192", 8192, 8192), ("K=N=4096", 4096, 4096)]
    others = [s for s in LLAMA3_SHAPES if s[1] != s[2]]
    key_ms = [m for m in ms if m in (1, 16, 256, 4096)]
    rest_ms = [m for m in ms if m not in key_ms]
    return ([s + (m,) for s in square for m in key_ms] + [s + (m,) for s in square for m in rest_ms]
            + [s + (m,) for s in others for m in key_ms] + [s + (m,) for s in others for m in rest_ms])


def time_call(fn, *args, iters: int, min_time: float = 0.2) -> float:
    """Median seconds per call of fn(*args) (compiled and warmed up first).

    A sample dispatches `reps` calls back to back and synchronizes once; reps is chosen from a
    first timed call so a sample lasts about min_time / iters.
    """
    jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - t0
    reps = max(1, min(1000, int(min_time / iters / max(once, 1e-7))))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(reps)]
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def measure_bandwidth(iters: int = 5) -> tuple[float, str]:
    """(bytes/s, how): the memory roof in this process.

    GPU: a 1 GiB float32 device-to-device copy (`a * 2`), bytes read + written. CPU: the read
    bandwidth of a dense float32 GEMV over a 64 MiB matrix (beyond the caches).
    """
    if jax.default_backend() == "gpu":
        a = jnp.ones((1 << 28,), jnp.float32)
        t = time_call(jax.jit(lambda a: a * 2), a, iters=iters)
        return 2 * a.nbytes / t, "measured: 1 GiB f32 device copy, read + write"
    a = jnp.ones((4096, 4096), jnp.float32)
    v = jnp.ones((1, 4096), jnp.float32)
    t = time_call(jax.jit(lambda v, a: v @ a), v, a, iters=iters)
    return a.nbytes / t, "measured: dense f32 GEMV, 64 MiB"


def _copies(one_bytes: int, layers: int, rotate_bytes: int) -> int:
    return int(min(MAX_COPIES, max(layers, math.ceil(rotate_bytes / one_bytes))))


def _over(fn):
    """fn(x, w) -> one jitted call running fn on every weight of a tuple (unrolled)."""
    return jax.jit(lambda x, ws: [fn(x, w) for w in ws])


class Weights:
    """Rotated copies of one (K, N) weight: NF4 + double quant (torch layout) and dense in dtype."""

    def __init__(self, k, n, dtype, layers, rotate_bytes, seed=0):
        key = jax.random.key(seed)
        one_q = jax.eval_shape(lambda w: qjax.quantize(w, "nf4", double_quant=True, transposed=True),
                               jax.ShapeDtypeStruct((k, n), dtype))
        q_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(one_q))
        n_q = _copies(q_bytes, layers, rotate_bytes)
        n_dense = _copies(k * n * jnp.dtype(dtype).itemsize, layers, rotate_bytes)
        make = jax.jit(lambda key: qjax.quantize((jax.random.normal(key, (k, n), jnp.float32) * 0.02).astype(dtype),
                                                 "nf4", double_quant=True, transposed=True))
        self.qs = tuple(jax.block_until_ready(make(sub)) for sub in jax.random.split(key, n_q))
        self.dense = tuple(jax.block_until_ready(qjax.dequantize(self.qs[i % n_q], dtype)) for i in range(n_dense))
        self.q_bytes, self.k, self.n, self.dtype = q_bytes, k, n, dtype


def measure_row(w: Weights, m: int, backends, iters: int, interpret: bool, seed: int = 1) -> dict:
    """Times one (K, N, M) for each backend; returns a dict of seconds per weight and bytes moved."""
    dtype = w.dtype
    x = (jax.random.normal(jax.random.key(seed), (m, w.k), jnp.float32)).astype(dtype)
    dequant = jax.jit(lambda qs: [qjax.dequantize(qi, dtype) for qi in qs])
    dense = _over(lambda x, d: x @ d)
    calls = {
        "dense": (dense, w.dense),
        "unfused": (lambda x, qs: dense(x, dequant(qs)), w.qs),
        "xla": (_over(lambda x, q: qjax.qmatmul(x, q, backend="xla")), w.qs),
        "pallas": (_over(lambda x, q: qjax.qmatmul(x, q, backend="pallas", interpret=interpret)), w.qs),
    }
    itemsize = jnp.dtype(dtype).itemsize
    io = (m * w.k + m * w.n) * itemsize
    row = dict(k=w.k, n=w.n, m=m, dtype=jnp.dtype(dtype).name, dense_bytes=w.k * w.n * itemsize + io,
               q_bytes=w.q_bytes + io, copies_q=len(w.qs), copies_dense=len(w.dense))
    for b in backends:
        fn, weights = calls[b]
        row[f"{b}_s"] = time_call(fn, x, weights, iters=iters) / len(weights)
    return row


def format_row(row: dict, backends, bandwidth: float) -> str:
    """One markdown table row: times in µs with the ratio to dense, achieved GB/s and % of the roof."""
    cells = [row.get("name", ""), row["dtype"], str(row["k"]), str(row["n"]), str(row["m"])]
    dense = row.get("dense_s")
    for b in backends:
        t = row[f"{b}_s"]
        nbytes = row["dense_bytes"] if b in ("dense", "unfused") else row["q_bytes"]
        ratio = f" ({t / dense:.2f})" if dense and b != "dense" else ""
        cells.append(f"{t * 1e6:.1f}{ratio}")
        cells.append(f"{nbytes / t / 1e9:.0f} ({100 * nbytes / t / bandwidth:.0f}%)")
    return "| " + " | ".join(cells) + " |"


def table_header(backends) -> str:
    cols = ["shape", "dtype", "K", "N", "M"]
    for b in backends:
        cols += [f"{b} µs" + ("" if b == "dense" else " (x dense)"), f"{b} GB/s (% roof)"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def run(rows, dtypes, backends, iters, layers=1, rotate_bytes=ROTATE_BYTES, interpret=False, budget=math.inf,
        json_path=None, log=print):
    """Measures rows (name, K, N, M) in order for each dtype, printing a markdown table as it goes.

    Starts no row after `budget` seconds (but always the first); appends each row to `json_path` (JSON lines) if
    given, after a first line describing the environment and the roof. Returns the rows.
    """
    start = time.perf_counter()
    bandwidth, how = measure_bandwidth()
    env = dict(date=str(datetime.date.today()), host=platform.node(), device=jax.devices()[0].device_kind,
               jax=jax.__version__, bandwidth=bandwidth, bandwidth_how=how, interpret=interpret,
               rotate_bytes=rotate_bytes, backends=list(backends))
    _append(json_path, dict(env=env))
    log(f"# {env['date']} | {env['host']} | {env['device']} | jax {env['jax']} | roof {bandwidth / 1e9:.1f} GB/s "
        f"({how}) | weights rotated through >= {rotate_bytes >> 20} MiB (at most {MAX_COPIES} copies), "
        "times per weight")
    log(table_header(backends))
    out, weights = [], None
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        for name, k, n, m in rows:
            if out and time.perf_counter() - start > budget:  # the first row always runs
                log(f"(budget of {budget:.0f}s spent: rows from {name} M={m} on were not measured)")
                return out
            if weights is None or (weights.k, weights.n, weights.dtype) != (k, n, dtype):
                weights = None  # free the previous shape's copies first
                weights = Weights(k, n, dtype, layers, rotate_bytes)
            row = dict(name=name, **measure_row(weights, m, backends, iters, interpret))
            _append(json_path, row)
            out.append(row)
            log(format_row(row, backends, bandwidth), flush=True)
    log("(x dense) = time / dense time in the same dtype: < 1 is faster than dense. GB/s = the fewest bytes "
        "each must move (dense: W in dtype; others: the stored NF4 + DQ bytes; plus x and y) / time.")
    return out


def _append(path, obj):
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="K = N values")
    parser.add_argument("--ms", type=int, nargs="+", default=None,
                        help=f"rows of x (default: 1 16 256 2048; with --shapes issue: {' '.join(map(str, ISSUE_MS))})")
    parser.add_argument("--shapes", choices=["square", "issue"], default="square",
                        help="square: K = N from --sizes; issue: issue 20's grid (ignores --sizes)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="default: dense unfused xla, and pallas on a GPU")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--layers", type=int, default=1, help="at least this many distinct weights per timed call")
    parser.add_argument("--rotate-mib", type=int, default=ROTATE_BYTES >> 20,
                        help="and enough that their bytes pass this many MiB")
    parser.add_argument("--interpret", action="store_true", help="Pallas kernels in interpret mode (CPU)")
    parser.add_argument("--budget", type=float, default=math.inf, help="seconds after which no new row starts")
    parser.add_argument("--json", default=None, help="append one JSON object per row to this file")
    parser.add_argument("--rows", default=":", help="START:STOP, a slice of the rows in order (e.g. :8, 8:)")
    args = parser.parse_args(argv)
    backends = args.backends or (["dense", "unfused", "xla"] + (["pallas"] if jax.default_backend() == "gpu" else []))
    rows = (issue_rows(args.ms or ISSUE_MS) if args.shapes == "issue"
            else [(f"K=N={s}", s, s, m) for s in args.sizes for m in args.ms or (1, 16, 256, 2048)])
    start, stop = (int(v) if v else None for v in args.rows.split(":"))
    rows = rows[start:stop]
    run(rows, args.dtypes, backends, args.iters, args.layers, args.rotate_mib << 20, args.interpret, args.budget,
        args.json)


if __name__ == "__main__":
    main()
