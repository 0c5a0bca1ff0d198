"""The decode loop: MTP speculative decoding gives plain decoding's greedy tokens (in float32
exactly; in bfloat16 and 4-bit up to the batch-shape rounding of a near-tie), caches stay
exact, bad input is refused."""

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlxkit.convert import convert

from mlxkit.cli import main
from mlxkit.generate import PromptCache, encode_prompt, generate, stream_generate
from mlxkit.load import load
from tests.helpers import (
    FIXTURES,
    NEAR_TIE_ULPS,
    assert_equal_up_to_a_near_tie,
    bf16_ulp,
    copying_mtp_checkpoint,
    copying_mtp_head,
    reference,
)

PROMPTS = [
    "def add(a, b):",
    "import os\nimport sys\n",
    "class Stack:\n    def push(self, x):",
    "for i in range(10):",
    "# Read a file and count the words\n",
]


def fixture_model(kind: str):
    """The untied fixture with its MTP head rewired so drafts are all rejected, all accepted, or
    a mix (see `copying_mtp_head`)."""
    model, tokenizer = load(FIXTURES / "tiny_untied", dtype=mx.float32)
    H = model.config.hidden_size
    if kind == "rejecting":  # MTP output is 0 → every draft is token 0, which the model avoids
        model.load_weights([("mtp.fc.weight", mx.zeros((H, 2 * H)))], strict=False)
        return model, tokenizer
    scale = {"accepting": 0.0, "mixed": 0.02}[kind]
    weights = dict(tree_flatten(model.parameters()))
    updates = copying_mtp_head(weights, hf_layout=False, mixer_scale=scale)
    model.load_weights(list(updates.items()), strict=False)
    return model, tokenizer


def run(model, tokenizer, prompt, **kw):
    cache = PromptCache.new(model)
    responses = list(stream_generate(model, tokenizer, prompt, prompt_cache=cache, **kw))
    return responses, cache


@pytest.mark.parametrize("kind", ["rejecting", "accepting", "mixed"])
def test_greedy_mtp_equals_plain_greedy(kind):
    """float32: the same tokens, token for token, and the same caches."""
    model, tokenizer = fixture_model(kind)
    accepted = drafted = 0
    for prompt in PROMPTS:
        plain, plain_cache = run(model, tokenizer, prompt, max_tokens=24, mtp=False)
        plain_tokens = [r.token for r in plain]
        for k in (1, 2, 3):
            spec, spec_cache = run(model, tokenizer, prompt, max_tokens=24, mtp=True, num_draft=k)
            assert [r.token for r in spec] == plain_tokens, (prompt, k)
            assert spec_cache.tokens == plain_cache.tokens
            for a, b in zip(spec_cache.main, plain_cache.main):
                for key, value in b.state.items():
                    assert mx.abs(a.state[key] - value).max().item() <= 1e-5, key
            assert_mtp_cache_is_a_pass_over(model, spec_cache)
            accepted += spec[-1].accepted
            drafted += spec[-1].drafted
    rate = accepted / drafted
    if kind == "rejecting":
        assert rate == 0.0
    elif kind == "accepting":
        assert rate == 1.0
    else:
        assert 0.1 < rate < 0.9, rate


@pytest.fixture(scope="module")
def reduced_precision(tmp_path_factory) -> dict[str, object]:
    """tiny_untied with an MTP head right some of the time, in bfloat16 as stored and converted
    to 4-bit (bfloat16 scales and activations)."""
    root = tmp_path_factory.mktemp("reduced")
    src = copying_mtp_checkpoint(root, mixer_scale=0.02)
    convert(src, root / "4bit", quiet=True)
    return {"bfloat16": load(src), "4-bit": load(root / "4bit")}


@pytest.mark.parametrize("weights", ["bfloat16", "4-bit"])
def test_reduced_precision_mtp_equals_plain_up_to_a_near_tie(reduced_precision, weights):
    """bfloat16 and 4-bit: MTP's greedy tokens equal plain decoding's up to the first near-tie,
    no more is promised (on this CPU they have been equal throughout)."""
    model, tokenizer = reduced_precision[weights]
    tokenizer._eos_token_ids = []
    tokens = [int(t) for t in reference("tiny_untied")["tokens"]]
    accepted = drafted = 0
    for start in (0, 5, 10):
        prompt = tokens[start : start + 12]
        plain = [
            r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=24, mtp=False)
        ]
        for k in (1, 2, 3):
            responses = list(stream_generate(model, tokenizer, prompt, max_tokens=24, num_draft=k))
            assert_equal_up_to_a_near_tie(model, prompt, [r.token for r in responses], plain)
            accepted += responses[-1].accepted
            drafted += responses[-1].drafted
    assert 0 < accepted < drafted  # verify passes that kept some drafts and rejected others


def test_a_departure_at_a_clear_margin_is_not_a_near_tie(reduced_precision):
    """The check above is not vacuous: a sequence that leaves plain decoding where the top two
    logits are far apart fails it."""
    assert bf16_ulp(9.0) == bf16_ulp(-15.9) == 0.0625 and bf16_ulp(1.0) == 2**-7
    model, tokenizer = reduced_precision["bfloat16"]
    tokenizer._eos_token_ids = []
    prompt = [int(t) for t in reference("tiny_untied")["tokens"][:12]]
    plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=8, mtp=False)]
    steps = model(mx.array([prompt + plain]))[0, len(prompt) - 1 :].astype(mx.float32)
    top2 = mx.sort(steps, axis=-1)[:, -2:].tolist()
    i = next(j for j, (b, a) in enumerate(top2) if a - b > NEAR_TIE_ULPS * bf16_ulp(a))
    other = [*plain[:i], int(mx.argsort(steps[i])[-2].item()), *plain[i + 1 :]]
    with pytest.raises(AssertionError):
        assert_equal_up_to_a_near_tie(model, prompt, other, plain)


def assert_mtp_cache_is_a_pass_over(model, cache: PromptCache) -> None:
    """The MTP cache holds what one MTP pass over the cached sequence gives, and the pending
    hidden states are the main model's at the positions after it."""
    tokens = mx.array([cache.tokens])
    hidden = model.hidden(tokens)
    n_pending = cache.mtp_pending.shape[1]
    expected = model.make_mtp_cache()
    model.mtp_hidden(
        hidden[:, :-n_pending], tokens[:, 1 : tokens.shape[1] - n_pending + 1], expected
    )
    got, want = cache.mtp[0], expected[0]
    assert got.offset == want.offset == len(cache.tokens) - n_pending
    for key in ("keys", "values"):
        assert mx.abs(got.state[key] - want.state[key]).max().item() <= 1e-5
    assert mx.abs(cache.mtp_pending - hidden[:, -n_pending:]).max().item() <= 1e-5


def test_mtp_cache_matches_a_pass_over_the_sequence():
    model, tokenizer = fixture_model("mixed")
    responses, cache = run(model, tokenizer, PROMPTS[0], max_tokens=20, num_draft=2)
    assert 0 < responses[-1].accepted < responses[-1].drafted
    assert_mtp_cache_is_a_pass_over(model, cache)


def test_sampling_is_reproducible_with_a_seed():
    model, tokenizer = fixture_model("mixed")
    kw = {"max_tokens": 16, "temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 7}
    for mtp in (False, True):
        a = [r.token for r in stream_generate(model, tokenizer, PROMPTS[1], mtp=mtp, **kw)]
        b = [r.token for r in stream_generate(model, tokenizer, PROMPTS[1], mtp=mtp, **kw)]
        assert a == b and len(a) == 16


def test_prompt_cache_two_turn_chat():
    model, tokenizer = load(FIXTURES / "tiny_tied", dtype=mx.float32)
    turn1 = [{"role": "user", "content": "def f(x):"}]
    cache = PromptCache.new(model)
    reply = generate(
        model, tokenizer, turn1, max_tokens=12, prompt_cache=cache, enable_thinking=False
    )
    cache_after_turn1 = list(cache.tokens)
    # The second turn continues the token sequence the cache holds.
    follow = tokenizer.encode(
        "<|im_end|>\n<|im_start|>user\nand g?<|im_end|>\n<|im_start|>assistant\n"
    )
    turn2 = cache.tokens + follow
    reused = list(stream_generate(model, tokenizer, turn2, max_tokens=12, prompt_cache=cache))
    fresh = list(stream_generate(model, tokenizer, turn2, max_tokens=12))
    assert [r.token for r in reused] == [r.token for r in fresh]
    assert reused[0].prompt_tokens - reused[0].prompt_cached == len(follow)
    assert fresh[0].prompt_cached == 0
    # the first turn's text is what its tokens decode to (up to a stop token)
    first_turn = encode_prompt(tokenizer, turn1, enable_thinking=False).tokens
    replied = cache_after_turn1[len(first_turn) :]
    assert 1 <= len(replied) <= 12
    eos = set(tokenizer.eos_token_ids)
    assert reply == tokenizer.decode([t for t in replied if t not in eos])


def test_prompt_cache_save_and_load(tmp_path):
    model, tokenizer = load(FIXTURES / "tiny_tied", dtype=mx.float32)
    cache = PromptCache.new(model)
    list(stream_generate(model, tokenizer, PROMPTS[2], max_tokens=8, prompt_cache=cache))
    cache.save(tmp_path / "cache.safetensors")
    restored = PromptCache.load(tmp_path / "cache.safetensors", model)
    assert restored.tokens == cache.tokens
    more = cache.tokens + tokenizer.encode("\n    return")
    a = [r.token for r in stream_generate(model, tokenizer, more, max_tokens=8, prompt_cache=cache)]
    b = [
        r.token
        for r in stream_generate(model, tokenizer, more, max_tokens=8, prompt_cache=restored)
    ]
    assert a == b


def test_stop_string_truncates_text():
    model, tokenizer = load(FIXTURES / "tiny_tied", dtype=mx.float32)
    full = generate(model, tokenizer, PROMPTS[0], max_tokens=20, mtp=False)
    stop = full[3:6]
    cut = generate(model, tokenizer, PROMPTS[0], max_tokens=20, stop=[stop])
    assert cut == full[: full.find(stop)]


def test_model_without_mtp_warns_and_decodes_plainly():
    model, tokenizer = load(FIXTURES / "tiny_tied", dtype=mx.float32)
    plain = generate(model, tokenizer, PROMPTS[0], max_tokens=10, mtp=False)
    del model.mtp
    with pytest.warns(UserWarning, match="no MTP"):
        assert generate(model, tokenizer, PROMPTS[0], max_tokens=10, mtp=True) == plain


def test_cli_streams_and_reports_stats():
    args = ["generate", "--model", str(FIXTURES / "tiny_tied"), "--prompt", "def f(x):"]
    result = CliRunner().invoke(main, args + ["--max-tokens", "6", "--verbose"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "MTP acceptance" in result.output
    assert "MLX array peak" in result.stderr and "bundle's plan" not in result.stderr


def test_cli_on_a_bundle_names_both_peaks(tmp_path):
    """MLX's array peak of this run beside the whole-app peak the bundle was planned for, in
    the units `plan` and `convert --target` print it."""
    import json

    bundle = tmp_path / "b"
    args = ["convert", "--size", "micro", "--target", "iphone15", "-o", str(bundle)]
    assert CliRunner().invoke(main, args).exit_code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    args = ["generate", "--model", str(bundle), "--prompt", "def f(x):", "--max-tokens", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    planned = f"{manifest['memory']['peak_bytes'] / 1e9:.2f} GB"
    context = f"{manifest['max_context']:,} tokens"
    expected = f"(the bundle's plan: {planned} for the whole app at {context})"
    assert "MLX array peak " in result.stderr and expected in result.stderr


def test_cli_generate_size_micro_is_the_embedded_model():
    args = ["generate", "--size", "micro", "--prompt", "def f(x):", "--max-tokens", "8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "8 tokens" in result.output


@pytest.mark.parametrize(
    "source", [[], ["--size", "micro", "--model", str(FIXTURES / "tiny_tied")], ["--size", "7b"]]
)
def test_cli_generate_needs_one_known_source(source):
    result = CliRunner().invoke(main, ["generate", *source, "--prompt", "hi", "--max-tokens", "2"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
