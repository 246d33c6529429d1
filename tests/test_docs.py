"""Every ```python block of docs/*.md runs as written: a file's blocks in order, in one namespace.

The markers (`<!-- no-run: reason -->`, `<!-- docs-test: devices=N -->`) are described in tests/doc_blocks.py.
"""

import os
import pathlib
import subprocess
import sys

import jax
import pytest
from doc_blocks import devices_needed, python_blocks, run_block

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [path for path in sorted((ROOT / "docs").glob("*.md")) if python_blocks(path)]

# The blocks shown but not run, by file: the reasons their `<!-- no-run: ... -->` markers give. Keep it short.
SKIPPED = {
    "sharding.md": ["needs several hosts: jax.distributed.initialize() waits for the other processes"],
}


def test_docs_have_examples():
    assert {path.name for path in DOCS} >= {"checkpoints.md", "lora.md", "sharding.md"}


def test_only_the_listed_blocks_are_skipped():
    skipped = {path.name: [b.skip for b in python_blocks(path) if b.skip] for path in DOCS}
    assert {name: reasons for name, reasons in skipped.items() if reasons} == SKIPPED


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_doc_runs(doc, tmp_path, monkeypatch, capsys):
    devices = devices_needed(doc)
    if jax.device_count() < devices:  # the flag must precede jax: run this test in a fresh interpreter
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::test_doc_runs[{doc.name}]"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        return
    monkeypatch.chdir(tmp_path)  # blocks that write files (checkpoints, adapters) write here
    namespace = {}
    for block in python_blocks(doc):
        if block.skip is None:
            run_block(block, namespace)
