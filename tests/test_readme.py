"""README.md's Python examples run as written."""

import pathlib

import pytest
from doc_blocks import python_blocks, run_block

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = python_blocks(README)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2 and not any(block.skip for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    run_block(BLOCKS[index], {})
