"""`measure_quality(kv_bits=...)` / `mlxkit eval --kv-bits`: the model runs on a quantized KV
cache and the reference never does, so the KL counts what the cache costs. Checked against an
independent computation (the model's logits through its own quantized cache, the float32
reference without one, KL in float64 numpy) on micro."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxkit.cache import kv_quantization
from mlxkit.cli import main
from mlxkit.load import load_model
from mlxkit.micro import micro_dir
from mlxkit.quality import measure_quality
from mlxkit.tokenizer import load_tokenizer
from tests.badinput import api, cli, run_row

TEXT = (
    "def merge(left, right):\n    out = []\n    i = j = 0\n"
    "    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n            out.append(left[i])\n            i += 1\n"
    "        else:\n            out.append(right[j])\n            j += 1\n"
    "    return out + left[i:] + right[j:]\n\n\ndef split(items):\n    "
) * 3


def _log_probs(logits: mx.array) -> np.ndarray:
    x = np.asarray(logits.astype(mx.float32), dtype=np.float64)[0]
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_is_the_quantized_cache_model_against_the_plain_reference():
    ids = mx.array([load_tokenizer(micro_dir()).encode(TEXT)])
    reference = _log_probs(load_model(micro_dir(), dtype=mx.float32)(ids)[:, :-1])
    model = load_model(micro_dir())
    kls = {}
    for bits in (None, 8):  # (4 bits: test_eval_command_runs_on_a_quantized_cache)
        r = measure_quality(
            micro_dir(),
            micro_dir(),
            text=TEXT,
            window=1024,
            quiet=True,
            kv_bits=bits,
            kv_group_size=32,
        )
        kv = kv_quantization(bits, 32)
        cache = model.make_cache(kv) if kv is not None else None
        m = _log_probs(model(ids, cache)[:, :-1])
        expected = (np.exp(reference) * (reference - m)).sum(-1).mean()
        assert r.kl_mean == pytest.approx(expected, rel=1e-6)
        assert r.kv_cache == (
            None if bits is None else {"bits": bits, "group_size": 32, "start": 0}
        )
        kls[bits] = r.kl_mean
    assert kls[None] < kls[8]  # else the cache would not have been quantized


def test_eval_command_runs_on_a_quantized_cache(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    args = ["eval", str(micro_dir()), "--reference", str(micro_dir()), "--text"]
    args += [str(tmp_path / "t.txt"), "--kv-bits", "4", "--kv-group-size", "32", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "KV cache               4-bit, groups of 32, quantized from position 0" in r.output


# fmt: off
BAD_ROWS = [
    cli("eval: --kv-bits 3", "eval", "{src}", "--reference", "{src}", "--kv-bits", "3",
        message="kv_bits must be 4, 8 or None"),
    cli("eval: group size past the head dim", "eval", "{src}", "--reference", "{src}",
        "--kv-bits", "8", message="kv_group_size 64 does not divide this model's head dim 32"),
    api("measure_quality: quantized_kv_start -1",
        lambda i: measure_quality(i.src, i.src, kv_bits=4, kv_group_size=32,
                                  quantized_kv_start=-1),
        message="quantized_kv_start must be an integer >= 0"),
]
# fmt: on


@pytest.mark.parametrize("row", BAD_ROWS, ids=lambda r: r.id)
def test_bad_kv_option(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, {})
