"""`python -m benchmarks.gpu_suite --dry-run` on the CPU: the GPU suite's code path end to end (setup,
environment, tests/gpu collected and skipped, qmatmul rows in interpret mode, both train-step
variants), producing the same files and tables a GPU run does."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_dry_run_writes_tables_and_json(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--out", str(out), "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["junit.xml", "results.json", "suite.log", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert all(p["rc"] == 0 for p in results["suite"]["phases"].values()), results["suite"]["phases"]
    assert results["env"]["jax"] and results["suite"]["setup"]
    tests = results["tests"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"] and not tests["failed"]  # no GPU here
    rows = results["qmatmul"]["rows"]
    assert [r["m"] for r in rows] == [1, 32] and all(r[f"{b}_s"] > 0 for r in rows for b in ("dense", "pallas", "xla"))
    assert results["qmatmul"]["env"]["interpret"] is True
    train = {r["variant"]: r for r in results["train"]}
    assert set(train) == {"qlora", "lora"} and all(r["tokens_per_s"] > 0 for r in train.values())
    assert train["qlora"]["base_bytes"] < train["lora"]["base_bytes"]  # NF4 + DQ base vs bf16
    summary = (out / "summary.md").read_text()
    assert summary.count("| K=N=256 | bfloat16 | 256 | 256 |") == 2
    assert "| qlora | 1 |" in summary and "| lora | 1 |" in summary and "## goals" in summary
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last
