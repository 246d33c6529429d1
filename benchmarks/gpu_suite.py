"""The whole GPU check in one command: setup, environment, tests/gpu, qmatmul and train-step benchmarks.

    python -m benchmarks.gpu_suite --out DIR               # on the GPU machine, at most 7.5 minutes
    python -m benchmarks.gpu_suite --out DIR --dry-run     # the same code on a CPU: tiny shapes, interpret mode

Run from the repository root. In order of importance, each phase in its own process (so a phase
that hangs is killed at its deadline and the device's peak-memory counter belongs to one
variant), with the time budget (`--budget`, default 450 s) split between them (`DEADLINES`):
  setup     makes `qjax.kernels` importable without network (see `ensure_importable`)
  env       python, jax, device, memory, nvidia-smi
  tests     `pytest tests/gpu` (every kernel and config against the XLA path, gradients, a QLoRA
            Llama step against XLA, compiled memory), junit XML into DIR
  qmatmul   benchmarks/qmatmul.py on issue 20's grid, the K = N rows first, then the Llama-3 rows
            after the train step (`--shapes issue`; dense, pallas and xla backends)
  train     benchmarks/train_step.py: QLoRA vs bf16 LoRA on the Llama-3.2-1B shape
After every phase DIR/summary.md (markdown tables) and DIR/results.json (raw numbers) are
rewritten, so a killed run still leaves tables; the summary is printed last. Exit status 1 when
tests/gpu failed or did not finish, else 0. DIR gets four files:
summary.md, results.json, junit.xml and suite.log (everything the phases printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The goals, checked against the measured rows (see `goals`).
GOALS = ("NF4+DQ >= 3x faster than bf16 dense at M <= 16, K = N = 8192",
         ">= 75% of the measured copy bandwidth on weights of 200 MB or more (M <= 16)",
         ">= 0.9x bf16 dense speed at M >= 256",
         "QLoRA step >= 0.9x bf16 LoRA's tokens/s", "QLoRA step <= 0.5x bf16 LoRA's memory")

# When each phase must end, as fractions of the budget; the rest of the qmatmul rows get what is left.
DEADLINES = dict(tests=0.42, qmatmul=0.6, qlora=0.78, lora=0.95)

_ENV_PROBE = r"""
import json, platform, shutil, subprocess, sys
import jax
d = jax.devices()[0]
env = dict(python=sys.version.split()[0], host=platform.node(), jax=jax.__version__,
           jaxlib=getattr(__import__("jaxlib"), "__version__", "?"), backend=jax.default_backend(),
           devices=[str(x) for x in jax.devices()], device_kind=d.device_kind,
           compute_capability=getattr(d, "compute_capability", None),
           bytes_limit=(d.memory_stats() or {}).get("bytes_limit"))
try:
    import setuptools
    env["setuptools"] = setuptools.__version__
except ImportError:
    env["setuptools"] = None
if shutil.which("nvidia-smi"):
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                        "clocks.max.sm", "--format=csv"], capture_output=True, text=True).stdout
print("ENV_JSON " + json.dumps(env))
"""


class Suite:
    """The run's state: output folder, log, deadline, and everything measured so far."""

    def __init__(self, out: str, budget: float, dry_run: bool):
        os.makedirs(out, exist_ok=True)
        self.out, self.budget, self.dry_run = out, budget, dry_run
        self.start = time.monotonic()
        self.log_file = open(os.path.join(out, "suite.log"), "a")
        self.scratch = tempfile.mkdtemp(prefix="gpu_suite_")  # phase outputs, merged into results.json
        self.results = dict(suite=dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                       dry_run=dry_run, budget_s=budget, phases={}),
                            env={}, tests={}, qmatmul=dict(env={}, rows=[]), train=[])

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def until(self, fraction: float) -> float:
        """Seconds from now to `fraction` of the budget: a phase's time limit (time an earlier phase
        did not use passes on to the next)."""
        return fraction * self.budget - self.elapsed()

    def log(self, *parts):
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        self.log_file.write(text + "\n")
        self.log_file.flush()

    def run(self, name: str, cmd: list[str], timeout: float) -> tuple[int | None, str]:
        """Runs cmd from the repository root, its output streamed to the log; kills it after timeout s.

        Returns (exit code or None if killed, its output). Records the phase's time in results.
        """
        timeout = max(5.0, timeout)
        self.log(f"\n## {name} (t={self.elapsed():.0f}s, limit {timeout:.0f}s): {' '.join(cmd)}")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = []

        def pump():
            for line in proc.stdout:
                lines.append(line)
                self.log(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
            self.log(f"## {name}: killed at its limit of {timeout:.0f}s")
        reader.join(timeout=10)
        self.results["suite"]["phases"][name] = dict(elapsed_s=round(time.monotonic() - t0, 1), rc=rc,
                                                     timed_out=rc is None)
        return rc, "".join(lines)

    def save(self):
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.results, f, indent=1)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(summary(self.results) + "\n")


def ensure_importable() -> str:
    """Makes `import qjax.kernels` work from the repository root (qjax.kernels is the top-level
    kernels/ directory, mapped by pyproject's package-dir), with no network. Returns what it did.

    1. nothing, if it already imports (qjax installed);
    2. else `pip install --no-index --no-deps --no-build-isolation -e .` with the interpreter's own
       setuptools (pyproject asks for >= 77, the first to take the SPDX `license = "..."` string);
    3. else (older setuptools, no pip) a symlink qjax/kernels -> ../kernels in this working tree.
    """
    def importable():
        return subprocess.run([sys.executable, "-c", "import qjax.kernels.dispatch"], cwd=REPO,
                              capture_output=True).returncode == 0

    if importable():
        return "qjax.kernels already importable: nothing installed"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                          "--no-build-isolation", "-e", REPO], cwd=REPO, capture_output=True, text=True, timeout=300)
    if pip.returncode == 0 and importable():
        return "pip install --no-index --no-deps --no-build-isolation -e . (editable, offline)"
    why = (pip.stderr or pip.stdout).strip().splitlines()[-1:] or ["?"]
    link = os.path.join(REPO, "qjax", "kernels")
    if not os.path.lexists(link):
        os.symlink(os.path.join("..", "kernels"), link)
    if not importable():
        raise RuntimeError("qjax.kernels is not importable after pip and the symlink fallback")
    return f"fallback: symlink qjax/kernels -> ../kernels (pip install -e failed: {why[0]})"


def junit_summary(path: str) -> dict:
    """Counts and failing test ids from a pytest junit XML file ({} if there is none)."""
    if not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def read_jsonl(path: str) -> tuple[dict, list]:
    """(env, rows) from benchmarks/qmatmul.py's --json file (possibly cut short by a kill)."""
    env, rows = {}, []
    if os.path.exists(path):
        for line in open(path):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            env, rows = (obj["env"], rows) if "env" in obj else (env, rows + [obj])
    return env, rows


def goals(results: dict) -> list[tuple[str, str]]:
    """(goal, verdict with the numbers) for each of the issue's goals, from what was measured."""
    rows = [r for r in results["qmatmul"]["rows"] if "pallas_s" in r and "dense_s" in r]
    roof = results["qmatmul"]["env"].get("bandwidth")
    out = []

    def verdict(ok, detail):
        return ("met" if ok else "MISSED") + f": {detail}"

    decode = [r for r in rows if r["k"] == r["n"] == 8192 and r["m"] <= 16]
    out.append((GOALS[0], verdict(all(r["dense_s"] / r["pallas_s"] >= 3 for r in decode),
                                  ", ".join(f"M={r['m']} {r['dense_s'] / r['pallas_s']:.2f}x" for r in decode))
                if decode else "not measured"))
    big = [r for r in rows if r["q_bytes"] >= 200e6 and r["m"] <= 16]
    out.append((GOALS[1], verdict(all(r["q_bytes"] / r["pallas_s"] >= 0.75 * roof for r in big),
                                  ", ".join(f"{r['name']} M={r['m']} {100 * r['q_bytes'] / r['pallas_s'] / roof:.0f}%"
                                            for r in big)) if big and roof else "not measured"))
    prefill = [r for r in rows if r["m"] >= 256]
    worst = min(prefill, key=lambda r: r["dense_s"] / r["pallas_s"], default=None)
    out.append((GOALS[2], verdict(worst["dense_s"] / worst["pallas_s"] >= 0.9,
                                  f"worst {worst['dense_s'] / worst['pallas_s']:.2f}x at {worst['name']} M={worst['m']}")
                if worst else "not measured"))
    train = {r["variant"]: r for r in results["train"]}
    if {"qlora", "lora"} <= set(train):
        speed = train["qlora"]["tokens_per_s"] / train["lora"]["tokens_per_s"]
        out.append((GOALS[3], verdict(speed >= 0.9, f"{speed:.2f}x")))
        mem = [train[v].get("step_bytes") for v in ("qlora", "lora")]
        out.append((GOALS[4], verdict(mem[0] <= 0.5 * mem[1], f"{mem[0] / mem[1]:.2f}x (compiled step bytes)")
                    if all(mem) else "not measured"))
    else:
        out += [(g, "not measured") for g in GOALS[3:]]
    return out


def summary(results: dict) -> str:
    """The markdown report: environment, tests, qmatmul table, train table, goals."""
    from benchmarks import qmatmul as qb
    from benchmarks import train_step as tb

    env, suite = results["env"], results["suite"]
    lines = [f"# GPU suite {suite['started']}{' (dry run: CPU, interpret mode, tiny shapes)' if suite['dry_run'] else ''}",
             "", f"- device: {env.get('device_kind', '?')} ({env.get('backend', '?')}), compute capability "
             f"{env.get('compute_capability')}, memory limit {(env.get('bytes_limit') or 0) / 2**30:.1f} GiB",
             f"- jax {env.get('jax', '?')}, jaxlib {env.get('jaxlib', '?')}, python {env.get('python', '?')}, "
             f"setuptools {env.get('setuptools')}; setup: {suite.get('setup', '?')}",
             "- phases: " + ", ".join(f"{k} {v['elapsed_s']}s" + (" (killed)" if v["timed_out"] else f" (rc {v['rc']})")
                                      for k, v in suite["phases"].items())]
    if env.get("nvidia_smi"):
        lines += ["", "```", env["nvidia_smi"].strip(), "```"]
    tests = results["tests"]
    lines += ["", "## tests/gpu", ""]
    if tests:
        lines.append(f"{tests['tests']} tests: {tests['tests'] - tests['failures'] - tests['errors'] - tests['skipped']} "
                     f"passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
                     f"in {tests['time_s']}s")
        lines += [f"- FAILED {name}" for name in tests["failed"]]
    else:
        lines.append("no junit XML (the run was killed before pytest finished)")
    q = results["qmatmul"]
    lines += ["", "## qmatmul (NF4 + DQ, torch layout) vs dense", ""]
    if q["rows"]:
        backends = q["env"]["backends"]
        lines += [f"roof {q['env']['bandwidth'] / 1e9:.0f} GB/s ({q['env']['bandwidth_how']}); "
                  f"jax {q['env']['jax']}; times per weight, weights rotated through >= "
                  f"{q['env']['rotate_bytes'] >> 20} MiB", "", qb.table_header(backends)]
        lines += [qb.format_row(r, backends, q["env"]["bandwidth"]) for r in q["rows"]]
    else:
        lines.append("not measured")
    lines += ["", "## train step: QLoRA vs bf16 LoRA", "", tb.table(results["train"]) if results["train"]
              else "not measured", "", "## goals (issue 20)", ""]
    if suite["dry_run"]:
        lines += ["(dry run: CPU timings in interpret mode, which say nothing about the goals)", ""]
    lines += ["| goal | result |", "|---|---|"]
    lines += [f"| {g} | {v} |" for g, v in goals(results)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for summary.md, results.json, junit.xml, suite.log")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: interpret mode and tiny shapes")
    args = parser.parse_args(argv)
    suite = Suite(args.out, args.budget, args.dry_run)
    py = sys.executable
    try:
        suite.results["suite"]["setup"] = setup = ensure_importable()
        suite.log(f"setup: {setup}")

        _, text = suite.run("env", [py, "-c", _ENV_PROBE], 60)
        probe = [line for line in text.splitlines() if line.startswith("ENV_JSON ")]
        suite.results["env"] = json.loads(probe[-1][len("ENV_JSON "):]) if probe else {}
        suite.save()

        junit = os.path.join(args.out, "junit.xml")
        suite.run("tests", [py, "-m", "pytest", "tests/gpu", "-q", "-rfEs", "--durations=15", f"--junitxml={junit}"],
                  suite.until(DEADLINES["tests"]))
        suite.results["tests"] = junit_summary(junit)
        suite.save()

        rows = os.path.join(suite.scratch, "qmatmul.jsonl")
        if args.dry_run:
            shape_args = ["--sizes", "256", "--ms", "1", "32", "--interpret", "--rotate-mib", "0", "--layers", "2",
                          "--iters", "1"]
            split = 1
        else:
            shape_args = ["--shapes", "issue"]
            split = 8  # the K = N = 8192 and 4096 rows at M in {1, 16, 256, 4096}

        def qmatmul_phase(name, rows_slice, seconds):
            suite.run(name, [py, "-m", "benchmarks.qmatmul", *shape_args, "--backends", "dense", "pallas", "xla",
                             "--rows", rows_slice, "--json", rows, "--budget", str(max(1.0, seconds - 60))], seconds)
            suite.results["qmatmul"]["env"], suite.results["qmatmul"]["rows"] = read_jsonl(rows)
            suite.save()

        qmatmul_phase("qmatmul (K = N)", f":{split}", suite.until(DEADLINES["qmatmul"]))

        train_args = (["--dry-run", "--batch", "1", "--seq", "8", "--steps", "1"] if args.dry_run
                      else ["--batch", "4", "--seq", "512", "--steps", "10"])
        for variant in ("qlora", "lora"):
            path = os.path.join(suite.scratch, f"train_{variant}.json")
            suite.run(f"train {variant}", [py, "-m", "benchmarks.train_step", "--variant", variant, *train_args,
                                           "--json", path], suite.until(DEADLINES[variant]))
            if os.path.exists(path):
                suite.results["train"].append(json.load(open(path)))
            suite.save()

        if suite.left() > 30:
            qmatmul_phase("qmatmul (Llama-3 shapes, other M)", f"{split}:", suite.left() - 5)
    finally:
        suite.save()
        shutil.rmtree(suite.scratch, ignore_errors=True)
        suite.log(f"\n# summary ({suite.elapsed():.0f}s; files in {args.out}: summary.md, results.json, "
                  "junit.xml, suite.log)\n")
        suite.log(open(os.path.join(args.out, "summary.md")).read())
    tests = suite.results["tests"]
    return 0 if tests and not tests["failures"] and not tests["errors"] else 1  # 1: failed or unfinished tests


if __name__ == "__main__":
    sys.exit(main())
