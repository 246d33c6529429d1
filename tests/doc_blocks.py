"""The ```python blocks of a Markdown file, to run as tests (README.md, docs/*.md).

Markers, HTML comments that Markdown renders as nothing:
- `<!-- no-run: reason -->` on the line just before a block: the block is shown, never run.
- `<!-- docs-test: devices=N -->` anywhere in a file: its blocks need N devices (tests run the file on N
  simulated CPU devices in a fresh interpreter when this one has fewer).
"""

import dataclasses
import pathlib
import re

BLOCK = re.compile(r"^(?:<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\n)?```python\n(?P<code>.*?)^```", re.S | re.M)
DEVICES = re.compile(r"<!--\s*docs-test:\s*devices=(\d+)\s*-->")


@dataclasses.dataclass(frozen=True)
class Block:
    """One ```python block of the file at `path`: `code`, the 1-based `line` of its fence, `skip` the
    no-run reason (or None)."""

    path: pathlib.Path
    line: int
    code: str
    skip: str | None


def python_blocks(path) -> list[Block]:
    """Every ```python block of the Markdown file at `path`, in order."""
    path = pathlib.Path(path)
    text = path.read_text()
    return [Block(path, text.count("\n", 0, m.start("code")), m.group("code"), m.group("reason"))
            for m in BLOCK.finditer(text)]


def devices_needed(path) -> int:
    """The device count a file's `<!-- docs-test: devices=N -->` marker asks for (1 without one)."""
    m = DEVICES.search(pathlib.Path(path).read_text())
    return int(m.group(1)) if m else 1


def run_block(block: Block, namespace: dict) -> None:
    """exec a block in `namespace`; tracebacks name the Markdown file and its line numbers."""
    code = "\n" * block.line + block.code  # line numbers in tracebacks are the Markdown file's
    exec(compile(code, str(block.path), "exec"), namespace)
