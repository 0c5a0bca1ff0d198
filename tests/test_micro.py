"""The embedded `micro` model: a trained Qwen 3.5-architecture checkpoint shipped as package
data (made by benchmarks/train_micro.py). Loaded through `mlxkit.load("micro")`, the same code
path as any Hugging Face checkpoint."""

from __future__ import annotations

import ast
import json
import struct

import mlx.core as mx
import numpy as np
import pytest

import mlxkit
from mlxkit.errors import CheckpointError
from mlxkit.micro import micro_dir

# Prompts for the generation check. The model is small: left to open a docstring it rambles past
# the token budget, so the prompts start the body and let it continue with statements.
PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "def is_prime(n):\n    if n < 2:\n        return False\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n",
    "x = []\nfor i in range(10):\n",
]
NEW_TOKENS = 48

# Held-out text for the MTP check: written for this test, not part of the training corpus.
SNIPPET = '''\
import os
import sys


class Config:
    """A small key/value configuration read from a file."""

    def __init__(self, path=None):
        self.path = path
        self.values = {}
        if path is not None:
            self.load(path)

    def load(self, path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                key, _, value = line.partition("=")
                self.values[key.strip()] = value.strip()
        return self

    def get(self, key, default=None):
        return self.values.get(key, default)

    def __repr__(self):
        return "%s(%r)" % (self.__class__.__name__, self.path)


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if not argv:
        print("usage: config FILE", file=sys.stderr)
        return 2
    for name in argv:
        if not os.path.exists(name):
            raise FileNotFoundError(name)
        config = Config(name)
        for key in sorted(config.values):
            print(key, config.get(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


@pytest.fixture(scope="module")
def micro():
    return mlxkit.load("micro")


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_checkpoint_is_a_real_qwen3_5_layout():
    d = micro_dir()
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and "vision_config" in config
    tc = config["text_config"]
    assert tc["model_type"] == "qwen3_5_text"
    assert tc["num_hidden_layers"] >= 8
    assert tc["layer_types"] == [
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention"
        for i in range(tc["num_hidden_layers"])
    ]
    assert tc["vocab_size"] % 64 == 0 and tc["mtp_num_hidden_layers"] == 1
    assert tc["tie_word_embeddings"] is True
    path = d / "model.safetensors"
    assert path.stat().st_size <= 20_000_000
    header = {k: v for k, v in _header(path).items() if k != "__metadata__"}
    assert "lm_head.weight" not in header  # tied
    assert sum(k.startswith("mtp.") for k in header) == 15
    assert all(k.startswith(("model.language_model.", "model.visual.", "mtp.")) for k in header)
    for name, info in header.items():
        f32 = name.endswith(("linear_attn.A_log", "linear_attn.norm.weight"))
        assert info["dtype"] == ("F32" if f32 else "BF16"), name
    for f in ("tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"):
        assert (d / f).is_file(), f


def test_micro_dir_missing_files_is_a_checkpoint_error(monkeypatch, tmp_path):
    import mlxkit.micro as micro_mod

    monkeypatch.setattr(micro_mod, "__file__", str(tmp_path / "micro.py"))
    with pytest.raises(CheckpointError, match="micro"):
        micro_mod.micro_dir()


def test_loads_with_mtp_and_tokenizer(micro):
    model, tokenizer = micro
    assert model.has_mtp
    assert len(model.layers) >= 8
    ids = tokenizer.encode("def fibonacci(n):")
    assert tokenizer.decode(ids) == "def fibonacci(n):"
    assert tokenizer.eos_token_ids


def _greedy(model, tokens: list[int], n: int) -> list[int]:
    cache = model.make_cache()
    logits = model(mx.array(tokens)[None], cache=cache)
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return out


def _complete_lines(text: str) -> str:
    return text[: text.rfind("\n") + 1]


def test_greedy_generation_is_python(micro):
    model, tokenizer = micro
    parsed = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        text = prompt + tokenizer.decode(_greedy(model, ids, NEW_TOKENS))
        code = _complete_lines(text)
        try:
            ast.parse(code)
            parsed.append(True)
        except SyntaxError:
            parsed.append(False)
    assert sum(parsed) >= 3, parsed


def test_mtp_greedy_acceptance_on_held_out_text(micro):
    model, tokenizer = micro
    tokens = mx.array(tokenizer.encode(SNIPPET))[None]
    logits, hidden = model.logits_and_hidden(tokens)
    draft, _ = model.mtp_forward(hidden[:, :-1], tokens[:, 1:], model.make_mtp_cache())
    # the draft from (h_i, t_{i+1}) predicts t_{i+2}; the main model's greedy choice for it is
    # the argmax of its logits at i+1
    main_next = np.array(mx.argmax(logits[0, 1:-1], axis=-1))
    drafted = np.array(mx.argmax(draft[0, :-1], axis=-1))
    acceptance = float((main_next == drafted).mean())
    assert acceptance >= 0.5, acceptance
