"""`stream_generate` and `generate`: check the arguments, encode the prompt, reuse what a
`PromptCache` holds, then prefill and decode (`mlxkit.decode`) into GenerationResponses
(`mlxkit.response`)."""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Iterator, Sequence

import mlx.core as mx

from mlxkit.decode import MAX_DRAFT, Decoder, Keys, run_prompt
from mlxkit.errors import MlxkitError
from mlxkit.models.qwen3_5 import Model
from mlxkit.prompt_cache import PromptCache
from mlxkit.response import GenerationResponse, Limits, Responses
from mlxkit.sample import SamplingParams

__all__ = [
    "MAX_DRAFT",
    "GenerationResponse",
    "PromptCache",
    "generate",
    "prefill",
    "stream_generate",
]


def encode_prompt(
    tokenizer, prompt: str | Sequence[int] | Sequence[dict], enable_thinking: bool
) -> list[int]:
    """A string, token ids, or chat messages (rendered with the tokenizer's chat template)."""
    if isinstance(prompt, str):
        return tokenizer.encode(_utf8(prompt))
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        if not all(_is_message(m) for m in prompt):
            raise MlxkitError('every chat message needs a "role" and a "content" string')
        text = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        return tokenizer.encode(_utf8(text))
    if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    raise MlxkitError("prompt must be a string, a list of token ids, or a list of chat messages")


def _is_message(message: dict) -> bool:
    return isinstance(message.get("role"), str) and isinstance(message.get("content"), str)


def _utf8(text: str) -> str:
    """Text that can be encoded: lone surrogates (how Python reads bytes that are not UTF-8,
    e.g. from a command line) cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MlxkitError(
            f"the prompt is not valid UTF-8 (undecodable byte at character {e.start})"
        ) from None
    return text


def _check_prompt(tokens: list[int], model: Model) -> None:
    if not tokens:
        raise MlxkitError("the prompt is empty")
    cfg = model.config
    if len(tokens) >= cfg.max_position_embeddings:
        raise MlxkitError(
            f"the prompt has {len(tokens)} tokens; this model's context is "
            f"{cfg.max_position_embeddings}"
        )
    bad = next((t for t in tokens if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        raise MlxkitError(f"token id {bad} is outside this model's vocabulary of {cfg.vocab_size}")


def _int(name: str, value: object, low: int, high: int | None = None) -> int:
    """An int in [low, high] (no bound above when high is None), else one clear error."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise MlxkitError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise MlxkitError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Stop strings; a single string is one stop string, not a list of characters."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stop):
        raise MlxkitError("stop must be a string or a list of strings")
    return tuple(s for s in stop if s)


def _seed(seed: int | None) -> int:
    if seed is None:
        return time.time_ns() % 2**32
    return _int("seed", seed, 0, 2**64 - 1)


def _use_mtp(model: Model, mtp: bool) -> bool:
    if mtp and not model.has_mtp:
        warnings.warn("this model has no MTP weights; decoding without speculation", stacklevel=3)
        return False
    return bool(mtp)


def stream_generate(
    model: Model,
    tokenizer,
    prompt: str | Sequence[int] | Sequence[dict],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    mtp: bool = True,
    num_draft: int = 2,
    stop: str | Sequence[str] | None = None,
    enable_thinking: bool = True,
    prefill_chunk: int = 512,
    prompt_cache: PromptCache | None = None,
    stop_at_context: bool = False,
) -> Iterator[GenerationResponse]:
    """Yields one response per new token. With `prompt_cache`, tokens it already holds are not
    processed again; it is left holding the prompt and everything generated. Past the model's
    context (max_position_embeddings) generation warns once, or ends with `stop_at_context`."""
    params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty)
    max_tokens = _int("max_tokens", max_tokens, 1)
    num_draft = _int("num_draft", num_draft, 1, MAX_DRAFT)
    prefill_chunk = _int("prefill_chunk", prefill_chunk, 1)
    keys = Keys(_seed(seed), params.greedy)
    limits = Limits(
        eos=frozenset(tokenizer.eos_token_ids),
        stop=_stop_strings(stop),
        max_tokens=max_tokens,
        context=model.config.max_position_embeddings,
        stop_at_context=bool(stop_at_context),
    )
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise MlxkitError("prompt_cache must be a PromptCache (PromptCache.new(model))")
    tokens = encode_prompt(tokenizer, prompt, enable_thinking)
    _check_prompt(tokens, model)
    mtp = _use_mtp(model, mtp)
    cache = prompt_cache if prompt_cache is not None else PromptCache.new(model)
    n_cached = cache.start(model, tokens, mtp)
    decoder = Decoder(model, cache, params, keys)

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    first = decoder.prefill(tokens[n_cached:], prefill_chunk)
    out = Responses(tokenizer, limits, len(tokens), n_cached, time.perf_counter() - t0)
    if mtp:
        yield from decoder.speculative(first, num_draft, out)
    else:
        yield from decoder.plain(first, out)


def generate(model: Model, tokenizer, prompt, **kwargs) -> str:
    """The whole completion as one string (see `stream_generate` for the options)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def prefill(
    model: Model, prompt_cache: PromptCache, tokens: Sequence[int], prefill_chunk: int = 512
) -> None:
    """Processes `tokens` after those `prompt_cache` holds, generating nothing, so that a later
    `stream_generate` whose prompt extends them starts from there."""
    if tokens:
        run_prompt(model, prompt_cache, list(tokens), prefill_chunk)
