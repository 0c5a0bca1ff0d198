"""Bad input to generation — API arguments, `mlxkit generate` values, prompt-cache files,
broken numbers — ends in one MlxkitError (one line on stderr and exit 2 from the CLI), never
a traceback or text made from NaNs."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxkit.cli import main
from mlxkit.errors import MlxkitError
from mlxkit.generate import PromptCache, generate, stream_generate
from mlxkit.load import load
from tests.helpers import FIXTURES

MODEL = FIXTURES / "tiny_tied"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def tiny():
    return load(MODEL, dtype=mx.float32)


API_CASES = [
    ({"temperature": NAN}, "temperature must be a finite number"),
    ({"temperature": INF}, "temperature must be a finite number"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": "0.7"}, "temperature must be a number"),
    ({"top_p": NAN}, "top_p must be a finite number"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"min_p": NAN}, "min_p must be a finite number"),
    ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\)"),
    ({"repetition_penalty": NAN}, "repetition_penalty must be a finite number"),
    ({"repetition_penalty": INF}, "repetition_penalty must be a finite number"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"seed": -1}, "seed must be between 0 and 18446744073709551615, got -1"),
    ({"seed": 2**64}, "seed must be between 0 and"),
    ({"seed": 2**70}, "seed must be between 0 and"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": "7"}, "seed must be an integer"),
    ({"prefill_chunk": 0}, "prefill_chunk must be >= 1, got 0"),
    ({"prefill_chunk": -3}, "prefill_chunk must be >= 1"),
    ({"prefill_chunk": 1.5}, "prefill_chunk must be an integer"),
    ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ({"max_tokens": -5}, "max_tokens must be >= 1"),
    ({"max_tokens": None}, "max_tokens must be an integer"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"num_draft": 0}, "num_draft must be between 1 and 8"),
    ({"num_draft": 9}, "num_draft must be between 1 and 8"),
    ({"num_draft": 2.0}, "num_draft must be an integer"),
    ({"stop": [3]}, "stop must be a string or a list of strings"),
    ({"prompt_cache": "cache.safetensors"}, "prompt_cache must be a PromptCache"),
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": []}, "the prompt is empty"),
    ({"prompt": [1, -1]}, "token id -1 is outside this model's vocabulary of 512"),
    ({"prompt": [512]}, "token id 512 is outside"),
    ({"prompt": [1, 2.5]}, "prompt must be a string, a list of token ids"),
    ({"prompt": "caf\udce9"}, "the prompt is not valid UTF-8"),
    ({"prompt": [{"role": "user"}]}, 'every chat message needs a "role" and a "content"'),
    ({"prompt": [{"role": "user", "content": 3}]}, "every chat message needs"),
    ({"prompt": [{"role": "user", "content": "caf\udce9"}]}, "not valid UTF-8"),
]


@pytest.mark.parametrize("kw, message", API_CASES, ids=[repr(c[0])[:40] for c in API_CASES])
def test_api_bad_argument(tiny, kw, message):
    model, tokenizer = tiny
    kw = {"prompt": "def f(x):", **kw}
    with pytest.raises(MlxkitError, match=message):
        generate(model, tokenizer, kw.pop("prompt"), max_tokens=kw.pop("max_tokens", 2), **kw)


def test_prompt_longer_than_context():
    model, tokenizer = load(MODEL)
    too_long = [1] * model.config.max_position_embeddings
    with pytest.raises(MlxkitError, match="context"):
        generate(model, tokenizer, too_long, max_tokens=2)


def test_numpy_numbers_are_numbers(tiny):
    import numpy as np

    model, tokenizer = tiny
    kw = {"temperature": np.float32(0.5), "top_k": np.int64(5), "seed": np.int64(3)}
    a = generate(model, tokenizer, "def f(x):", max_tokens=np.int64(4), **kw)
    b = generate(model, tokenizer, "def f(x):", max_tokens=4, temperature=0.5, top_k=5, seed=3)
    assert a == b


def assert_one_line_error(stderr: str, exit_code: int, message: str) -> None:
    assert exit_code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


CLI_CASES = [
    (["--temp", "nan"], "temperature must be a finite number"),
    (["--temp", "inf"], "temperature must be a finite number"),
    (["--temp", "-1"], "temperature must be >= 0"),
    (["--top-p", "nan"], "top_p must be a finite number"),
    (["--top-p", "2"], "top_p must be in (0, 1]"),
    (["--min-p", "nan"], "min_p must be a finite number"),
    (["--repetition-penalty", "nan"], "repetition_penalty must be a finite number"),
    (["--repetition-penalty", "-inf"], "repetition_penalty must be a finite number"),
    (["--top-k", "-2"], "top_k must be >= 0"),
    (["--seed", "-1"], "seed must be between 0 and"),
    (["--seed", str(2**70)], "seed must be between 0 and"),
    (["--max-tokens", "0"], "max_tokens must be >= 1"),
    (["--num-draft", "0"], "num_draft must be between 1 and 8"),
    (["--num-draft", "9"], "num_draft must be between 1 and 8"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "caf\udce9"], "the prompt is not valid UTF-8"),
    (["--chat", "--prompt", "caf\udce9"], "the prompt is not valid UTF-8"),
]


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_bad_value(args, message):
    base = ["generate", "--model", str(MODEL), "--prompt", "hi", "--max-tokens", "2"]
    result = CliRunner().invoke(main, base + args)
    assert_one_line_error(result.stderr, result.exit_code, message)
    assert result.stdout == ""


def test_cli_prompt_bytes_that_are_not_utf8():
    """Through a real command line: Python hands undecodable bytes on as lone surrogates."""
    cmd = [sys.executable, "-m", "mlxkit", "generate", "--model", str(MODEL), "--prompt"]
    proc = subprocess.run(
        [*cmd, b"def f(\xff\xfe):"], capture_output=True, text=True, timeout=300, check=False
    )
    assert_one_line_error(proc.stderr, proc.returncode, "the prompt is not valid UTF-8")


# --------------------------------------------------------------------------- broken numbers


def nan_model(tiny):
    """The fixture with an all-NaN final norm: every logit is NaN."""
    model, tokenizer = load(MODEL, dtype=mx.float32)
    norm = model.language_model.model.norm.weight
    model.load_weights(
        [("language_model.model.norm.weight", mx.full(norm.shape, NAN))], strict=False
    )
    return model, tokenizer


@pytest.mark.parametrize("kw", [{"mtp": False}, {"mtp": True}, {"temperature": 0.8, "seed": 1}])
def test_non_finite_logits_end_generation_before_any_text(tiny, kw):
    model, tokenizer = nan_model(tiny)
    stream = stream_generate(model, tokenizer, "def f(x):", max_tokens=8, **kw)
    with pytest.raises(MlxkitError, match=r"non-finite logits \(NaN or inf\) at position"):
        next(stream)


@pytest.mark.parametrize("mtp", [False, True])
def test_non_finite_logits_mid_generation(tiny, mtp):
    """States turned NaN after the first token: the loop stops within a step or round,
    without handing out a token made from them."""
    model, tokenizer = tiny
    cache = PromptCache.new(model)
    kw = {"max_tokens": 20, "mtp": mtp}
    stream = stream_generate(model, tokenizer, "def f(x):", prompt_cache=cache, **kw)
    good = [next(stream).token]
    linear = next(c for c in cache.main if hasattr(c, "recurrent_state"))
    linear.recurrent_state = mx.full(linear.recurrent_state.shape, NAN)
    with pytest.raises(MlxkitError, match="non-finite logits"):
        good += [r.token for r in stream]
    clean = [r.token for r in stream_generate(model, tokenizer, "def f(x):", **kw)]
    assert len(good) <= 4 and good == clean[: len(good)]


def test_cli_nan_weights_one_line(tmp_path):
    from tests.helpers import copy_fixture

    d = copy_fixture(tmp_path)
    weights = mx.load(str(d / "model.safetensors"))
    name = "model.language_model.norm.weight"
    weights[name] = mx.full(weights[name].shape, NAN, dtype=weights[name].dtype)
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    args = ["generate", "--model", str(d), "--prompt", "def f(x):", "--max-tokens", "4"]
    result = CliRunner().invoke(main, args)
    assert_one_line_error(result.stderr, result.exit_code, "")
    assert "!" not in result.stdout


# --------------------------------------------------------------------------- the context limit


def short_context(tiny, n: int):
    model, tokenizer = load(MODEL, dtype=mx.float32)
    model.config.max_position_embeddings = n
    return model, tokenizer


@pytest.mark.parametrize("mtp", [False, True])
def test_past_the_context_warns_once(tiny, mtp):
    model, tokenizer = short_context(tiny, 12)
    prompt = tokenizer.encode("def f(x):")  # 8 tokens or so
    n_free = 12 - len(prompt)
    assert n_free > 0
    with pytest.warns(UserWarning, match="went past this model's context") as caught:
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=12, mtp=mtp))
    assert len([w for w in caught if "context" in str(w.message)]) == 1
    assert len(responses) == 12  # it warns, it does not stop


@pytest.mark.parametrize("mtp", [False, True])
def test_stop_at_context(tiny, mtp):
    model, tokenizer = short_context(tiny, 12)
    prompt = tokenizer.encode("def f(x):")
    kw = {"max_tokens": 12, "mtp": mtp, "stop_at_context": True}
    responses = list(stream_generate(model, tokenizer, prompt, **kw))
    assert len(prompt) + len(responses) == 12
    assert responses[-1].finish_reason == "length"


# --------------------------------------------------------------------------- prompt-cache files


@pytest.fixture(scope="module")
def saved_cache(tiny, tmp_path_factory):
    model, tokenizer = tiny
    cache = PromptCache.new(model)
    list(stream_generate(model, tokenizer, "def f(x):", max_tokens=6, prompt_cache=cache))
    path = tmp_path_factory.mktemp("cache") / "cache.safetensors"
    cache.save(path)
    arrays, meta = mx.load(str(path), return_metadata=True)
    return arrays, meta, len(cache.tokens)


CACHE_CASES = {
    "tokens not ids": (lambda a, m: (a, {**m, "tokens": "1,x,3"}), "comma-separated list of ids"),
    "token outside vocab": (lambda a, m: (a, {**m, "tokens": "1,99999"}), "outside this model"),
    "negative token": (lambda a, m: (a, {**m, "tokens": "-4,1"}), "outside this model"),
    "one token too many": (lambda a, m: (a, {**m, "tokens": m["tokens"] + ",5"}), "expected"),
    "one token too few": (
        lambda a, m: (a, {**m, "tokens": m["tokens"].rsplit(",", 1)[0]}),
        "expected",
    ),
    "no tokens but states": (lambda a, m: (a, {**m, "tokens": ""}), "mtp_pending without"),
    "mtp flag not a bool": (lambda a, m: (a, {**m, "mtp": "yes"}), "metadata mtp is 'yes'"),
    "mtp flag missing": (lambda a, m: (a, {"tokens": m["tokens"]}), "metadata mtp is None"),
    "mtp off but states": (lambda a, m: (a, {**m, "mtp": "False"}), "mtp_pending without"),
    "layer missing": (
        lambda a, m: ({k: v for k, v in a.items() if not k.startswith("main.0.")}, m),
        "main.0 holds []",
    ),
    "keys missing": (
        lambda a, m: ({k: v for k, v in a.items() if k != "main.3.keys"}, m),
        "main.3 holds ['values']",
    ),
    "extra array": (lambda a, m: ({**a, "main.99.keys": a["main.3.keys"]}, m), "unexpected"),
    "wrong shape": (
        lambda a, m: ({**a, "main.3.keys": a["main.3.keys"][:, :, :2]}, m),
        "main.3.keys has shape",
    ),
    "wrong dtype": (
        lambda a, m: ({**a, "main.3.keys": a["main.3.keys"].astype(mx.int32)}, m),
        "main.3.keys has dtype",
    ),
    "wrong offset": (
        lambda a, m: ({**a, "main.0.offset": mx.array(1)}, m),
        "main.0.offset is 1",
    ),
    "pending wrong width": (
        lambda a, m: ({**a, "mtp_pending": a["mtp_pending"][..., :3]}, m),
        "mtp_pending has shape",
    ),
    "pending missing": (
        lambda a, m: ({k: v for k, v in a.items() if k != "mtp_pending"}, m),
        "mtp_pending is missing",
    ),
}


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_prompt_cache_load_refuses(tiny, saved_cache, tmp_path, case):
    model, _ = tiny
    edit, message = CACHE_CASES[case]
    arrays, meta, _n = saved_cache
    arrays, meta = edit(dict(arrays), dict(meta))
    path = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(path), arrays, metadata=meta)
    with pytest.raises(MlxkitError, match="not a prompt cache of this model") as e:
        PromptCache.load(path, model)
    assert message in str(e.value)


def test_prompt_cache_load_refuses_another_models_cache(tiny, tmp_path):
    model, _ = tiny
    other, tokenizer = load("micro")
    cache = PromptCache.new(other)
    list(stream_generate(other, tokenizer, "def f(x):", max_tokens=3, prompt_cache=cache))
    cache.save(tmp_path / "other.safetensors")
    with pytest.raises(MlxkitError, match="not a prompt cache of this model"):
        PromptCache.load(tmp_path / "other.safetensors", model)


def test_prompt_cache_load_of_a_file_that_is_not_one(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "text.safetensors"
    path.write_text("hello")
    with pytest.raises(MlxkitError, match="not a prompt cache"):
        PromptCache.load(path, model)
