"""Per-device memory and collective bytes of a sharded QLoRA train step, ~7B Llama shapes.

Nothing is allocated: the step is lowered on abstract shapes (ShapeDtypeStructs with
shardings) and compiled for a mesh of simulated CPU devices; the numbers are the compiled
module's `memory_analysis()` (per device) and the collectives in its HLO, with ops inside
`while` bodies (the scan over layers, forward and backward) counted once per iteration.

    python benchmarks/sharding.py                 # 1, 8 and 64 devices, the 7B config
    python benchmarks/sharding.py --devices 8 --layers 2   # one mesh, a quick check

Each mesh size runs in its own subprocess (the device count is fixed when jax starts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

# (data, model). 64 devices as (8, 8) is refused: 11008 / 8 = 1376 is not a whole number of 64-blocks
MESHES = {1: (1, 1), 8: (2, 4), 64: (16, 4)}
LLAMA_7B = dict(vocab=32000, d=4096, ffn=11008, heads=32, layers=32)
PROJ = {  # name: (in, out) in units of the config, and the spec over (in, out)
    "q": ("d", "d", ("data", "model")), "k": ("d", "d", ("data", "model")), "v": ("d", "d", ("data", "model")),
    "o": ("d", "d", ("model", "data")), "gate": ("d", "ffn", ("data", "model")),
    "up": ("d", "ffn", ("data", "model")), "down": ("ffn", "d", ("model", "data")),
}


def _measure(n_devices: int, layers: int, batch: int, seq: int, r: int, gather: str = "codes",
             split_rank: bool = True) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import qjax
    import qjax.sharding

    cfg = dict(LLAMA_7B, layers=layers)
    d, heads, L = cfg["d"], cfg["heads"], cfg["layers"]
    hd = d // heads
    mesh = Mesh(np.array(jax.devices()[:n_devices]).reshape(MESHES[n_devices]), ("data", "model"),
                axis_types=(AxisType.Auto,) * 2)
    qconfig = qjax.QuantConfig(format="nf4", blocksize=64, double_quant=True)

    def sds(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    # abstract stacked layers as qjax.linen.convert makes them for a scanned model: each projection
    # quantized per layer (jax.vmap), adapters (L, in, r) / (L, r, out)
    quantize_stack = jax.vmap(qconfig.quantize)
    layers, specs = {}, {}
    for name, (a, b, spec) in PROJ.items():
        k_in, k_out = cfg[a], cfg[b]
        layers[name] = {"kernel": jax.eval_shape(quantize_stack, jax.ShapeDtypeStruct((L, k_in, k_out), jnp.bfloat16)),
                        "lora_a": jax.ShapeDtypeStruct((L, k_in, r), jnp.float32),
                        "lora_b": jax.ShapeDtypeStruct((L, r, k_out), jnp.float32)}
        specs[name] = {"kernel": P(None, *spec), "lora_a": None, "lora_b": None}  # adapters derived
    shardings = qjax.sharding.params_sharding(layers, mesh, specs, lora="split_rank" if split_rank else True)
    placed = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), layers, shardings)
    frozen_layers = {n: v["kernel"] for n, v in placed.items()}
    lora_layers = {n: {"lora_a": v["lora_a"], "lora_b": v["lora_b"]} for n, v in placed.items()}
    frozen_layers["attn_norm"] = sds((L, d), jnp.bfloat16, P())
    frozen_layers["mlp_norm"] = sds((L, d), jnp.bfloat16, P())
    frozen = {"embed": sds((cfg["vocab"], d), jnp.bfloat16, P("model", "data")),
              "final_norm": sds((d,), jnp.bfloat16, P()),
              "lm_head": sds((d, cfg["vocab"]), jnp.bfloat16, P("data", "model")),
              "layers": frozen_layers}
    lora = lora_layers
    tokens = sds((batch, seq), jnp.int32, P("data"))
    opt = optax.adam(1e-4)
    lora_sh = jax.tree.map(lambda s: s.sharding, lora)
    opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             jax.eval_shape(opt.init, lora), qjax.sharding.optimizer_sharding(opt, lora, lora_sh, mesh))
    scale = 2.0  # alpha / r
    act = NamedSharding(mesh, P("data"))

    def rms(x, w):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (y * w.astype(jnp.float32)).astype(jnp.bfloat16)

    def proj(x, fl, ll, name):
        w = fl[name]
        if gather == "codes":  # FSDP: gather the packed codes over `data` here, then dequantize locally
            tp = tuple(e if e == "model" else None for e in PROJ[name][2])
            w = qjax.sharding.with_sharding_constraint(w, mesh, P(*tp))
        base = qjax.qmatmul(x, w, compute_dtype=jnp.bfloat16)
        a, b = ll[name]["lora_a"].astype(jnp.bfloat16), ll[name]["lora_b"].astype(jnp.bfloat16)
        return base + ((x @ a) @ b) * jnp.bfloat16(scale)

    def layer(h, p):
        fl, ll = p
        h = jax.lax.with_sharding_constraint(h, act)
        x = rms(h, fl["attn_norm"])
        bsz, s, _ = x.shape
        q, k, v = (proj(x, fl, ll, n).reshape(bsz, s, heads, hd) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.float32(np.sqrt(hd))
        mask = jnp.tril(jnp.ones((s, s), bool))
        probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1).astype(jnp.bfloat16)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(bsz, s, d)
        h = h + proj(attn, fl, ll, "o")
        x = rms(h, fl["mlp_norm"])
        h = h + proj(jax.nn.silu(proj(x, fl, ll, "gate")) * proj(x, fl, ll, "up"), fl, ll, "down")
        return h, None

    def loss_fn(lora, frozen, tokens):
        h = jnp.take(frozen["embed"], tokens, axis=0)
        h, _ = jax.lax.scan(jax.checkpoint(layer), h, (frozen["layers"], lora))
        logits = (rms(h, frozen["final_norm"]) @ frozen["lm_head"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    def step(lora, opt_state, frozen, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, tokens)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    fn = jax.jit(step, donate_argnums=(0, 1), out_shardings=(lora_sh, opt_state_sh(opt_state), NamedSharding(mesh, P())))
    compiled = fn.lower(lora, opt_state, frozen, tokens).compile()
    mem = compiled.memory_analysis()
    coll = collective_bytes(compiled.as_text())
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    return {
        "devices": n_devices, "mesh": MESHES[n_devices], "layers": L, "batch": batch, "seq": seq, "r": r,
        "gather": gather, "split_rank": split_rank,
        "global_frozen_bytes": nbytes(frozen), "global_lora_bytes": nbytes(lora),
        "global_opt_bytes": nbytes(opt_state),
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "per_device_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes,
        "collectives": coll,
    }


def opt_state_sh(opt_state):
    import jax
    return jax.tree.map(lambda s: s.sharding, opt_state)


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            n = 1
            for x in filter(None, dims.split(",")):
                n *= int(x)
            total += n * _DTYPE_BYTES[dtype]
    return total


def collective_bytes(hlo: str) -> dict:
    """Bytes per step each collective kind produces on one device, loop bodies times their trip count."""
    comps, current = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                comps["__entry__"] = current
        elif current is not None and line.startswith(" "):
            comps[current].append(line)
    calls = {}  # computation -> [(callee, multiplier)]
    for name, lines in comps.items():
        if name == "__entry__":
            continue
        for ln in lines:
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ln)
            for kind, callee in re.findall(r"\b(body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", ln):
                mult = int(trip.group(1)) if (kind == "body" and trip) else 1
                calls.setdefault(name, []).append((callee, mult))
    mult = {comps["__entry__"]: 1}
    stack = [comps["__entry__"]]
    while stack:
        c = stack.pop()
        for callee, m in calls.get(c, []):
            if callee not in mult:
                mult[callee] = mult[c] * m
                stack.append(callee)
    out = {k: 0 for k in _COLLECTIVES}
    counts = {k: 0 for k in _COLLECTIVES}
    for name, lines in comps.items():
        if name == "__entry__":
            continue
        for ln in lines:
            for k in _COLLECTIVES:
                if re.search(rf"\s{k}(-start)?\(", ln):
                    result = ln.split("=", 1)[1].split(k)[0]
                    out[k] += _shape_bytes(result) * mult.get(name, 1)
                    counts[k] += mult.get(name, 1)
    return {"bytes": out, "ops": counts}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--layers", type=int, default=LLAMA_7B["layers"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--gather", choices=["codes", "auto"], default="codes",
                    help="codes: constrain each kernel to its tensor-parallel layout before the matmul "
                         "(FSDP gathers uint8 codes); auto: leave the choice to XLA")
    ap.add_argument("--no-split-rank", dest="split_rank", action="store_false",
                    help="keep the LoRA rank axis replicated (adapters split over one mesh axis only)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_measure(args.devices[0], args.layers, args.batch, args.seq, args.r, args.gather,
                                  args.split_rank)))
        return
    rows = []
    for n in args.devices:
        cmd = [sys.executable, __file__, "--_child", "--devices", str(n), "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r), "--gather", args.gather]
        cmd += [] if args.split_rank else ["--no-split-rank"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{n} devices failed:\n{res.stderr[-4000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{n} devices done", file=sys.stderr)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def table(rows) -> str:
    gib = lambda b: f"{b / 2**30:.3f}"
    base = rows[0]["per_device_bytes"] * rows[0]["devices"]
    lines = ["| devices | mesh (data, model) | gather | LoRA rank | args GiB | temp GiB | per-device GiB | ideal 1/n GiB | ratio | "
             "all-gather GiB | all-reduce GiB | reduce-scatter GiB | all-to-all GiB | permute GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal = base / r["devices"]
        b = r["collectives"]["bytes"]
        rank = "split" if r["split_rank"] else "replicated"
        lines.append(f"| {r['devices']} | {tuple(r['mesh'])} | {r['gather']} | {rank} | {gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} | "
                     f"{gib(r['per_device_bytes'])} | {gib(ideal)} | {r['per_device_bytes'] / ideal:.2f} | "
                     f"{gib(b['all-gather'])} | {gib(b['all-reduce'])} | {gib(b['reduce-scatter'])} | "
                     f"{gib(b['all-to-all'])} | {gib(b['collective-permute'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
