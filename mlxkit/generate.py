"""`stream_generate` and `generate`: check the arguments, encode the prompt (its images and
videos prepared and their pads expanded: `mlxkit.multimodal`), reuse what a `PromptCache`
holds, then prefill and decode (`mlxkit.decode`) into GenerationResponses (`mlxkit.response`)."""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from mlxkit.cache import kv_quantization
from mlxkit.decode import MAX_DRAFT, Decoder, Keys, run_prompt
from mlxkit.draft_control import (
    DraftControl,
    DraftState,
    cached_table,
    default_costs,
    last_state,
    model_is_quantized,
)
from mlxkit.errors import MlxkitError
from mlxkit.models.qwen3_5 import Model
from mlxkit.multimodal import (
    Video,
    VideoLike,
    chat_media,
    check_pads,
    image_list,
    prepare_images,
    prepare_videos,
    video_list,
)
from mlxkit.prompt_cache import PromptCache
from mlxkit.response import GenerationResponse, Limits, Responses
from mlxkit.sample import SamplingParams
from mlxkit.structured import Constraint, Grammar, grammar_of
from mlxkit.vision import ImageLike, VisionInput, expand_prompt

MAX_LOGPROBS = 20  # OpenAI's most top_logprobs

__all__ = [
    "MAX_DRAFT",
    "GenerationResponse",
    "PromptCache",
    "Video",
    "encode_prompt",
    "generate",
    "prefill",
    "start_generation",
    "stream_generate",
]


@dataclass
class EncodedPrompt:
    """A prompt as the model reads it: token ids (vision pads expanded) and the prepared images
    and videos whose pads they hold, in order."""

    tokens: list[int]
    images: list[VisionInput] = field(default_factory=list)
    videos: list[VisionInput] = field(default_factory=list)


def encode_prompt(
    tokenizer,
    prompt: str | Sequence[int] | Sequence[dict],
    enable_thinking: bool,
    model: Model | None = None,
    images: Sequence[ImageLike | VisionInput] = (),
    videos: Sequence[VideoLike | VisionInput] = (),
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> EncodedPrompt:
    """A string, token ids, or chat messages (rendered with the tokenizer's chat template; a
    message's content a string or a list of text / image / video parts). With a vision `model`
    the images and videos are prepared and each pad of a string or chat prompt expanded; token
    ids are taken as they are, pads already expanded."""
    vision = model is not None and model.has_vision
    images, videos = image_list(images), video_list(videos)  # one alone is a list of one
    if isinstance(prompt, str):
        text = _utf8(prompt)
    else:
        prompt = list(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            if not all(_is_message(m) for m in prompt):
                raise MlxkitError(
                    'every chat message needs a "role" and a "content" (a string or a list of '
                    "parts)"
                )
            messages, images, videos = chat_media(prompt, images, videos)
            text = _utf8(
                tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, enable_thinking=enable_thinking
                )
            )
        elif all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            tokens = [int(t) for t in prompt]
            images, videos = _prepare(model, images, videos, min_pixels, max_pixels)
            if vision:
                check_pads(tokens, model, images, videos)
            return EncodedPrompt(tokens, images, videos)
        else:
            raise MlxkitError(
                "prompt must be a string, a list of token ids, or a list of chat messages"
            )
    images, videos = _prepare(model, images, videos, min_pixels, max_pixels)
    if vision:
        text = expand_prompt(text, images, videos)
    return EncodedPrompt(tokenizer.encode(text), images, videos)


def _prepare(model, images, videos, min_pixels, max_pixels):
    if (images or videos) and model is None:
        raise MlxkitError("encoding images or videos needs the model (its preprocessor)")
    if model is None:
        return [], []
    images = prepare_images(model, images, min_pixels=min_pixels, max_pixels=max_pixels)
    return images, prepare_videos(model, videos)


def _is_message(message: dict) -> bool:
    return isinstance(message.get("role"), str) and isinstance(
        message.get("content"), (str, list, tuple)
    )


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


def _logit_bias(bias: Mapping[int, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    """logit_bias as (token, bias) pairs; every key a token id of this vocabulary."""
    if bias is None:
        return ()
    if not isinstance(bias, Mapping):
        raise MlxkitError("logit_bias must be a mapping of token ids to biases")
    for token in bias:
        _int("a logit_bias token id", token, 0, vocab - 1)
    return tuple(sorted((int(t), b) for t, b in bias.items()))


def _seed(seed: int | None) -> int:
    if seed is None:
        return time.time_ns() % 2**32
    return _int("seed", seed, 0, 2**64 - 1)


def _use_mtp(model: Model, mtp: bool) -> bool:
    if mtp and not model.has_mtp:
        warnings.warn("this model has no MTP weights; decoding without speculation", stacklevel=4)
        return False
    return bool(mtp)


def stream_generate(
    model: Model, tokenizer, prompt: str | Sequence[int] | Sequence[dict], **options
) -> Iterator[GenerationResponse]:
    """Yields one response per new token (the options: `start_generation`'s)."""
    yield from start_generation(model, tokenizer, prompt, **options).run()


def start_generation(
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
    num_draft: int | str = "auto",
    deterministic: bool = False,
    stop: str | Sequence[str] | None = None,
    enable_thinking: bool = True,
    prefill_chunk: int = 512,
    prompt_cache: PromptCache | None = None,
    stop_at_context: bool = False,
    images: Sequence[ImageLike | VisionInput] | None = None,
    videos: Sequence[VideoLike | VisionInput] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    logprobs: int | None = None,
    logit_bias: Mapping[int, float] | None = None,
    response_format: Mapping | None = None,
    grammar: Grammar | str | None = None,
) -> Generation:
    """A generation set up (every option checked, the prompt encoded, what `prompt_cache`
    holds of it taken) and not yet run: `stream_generate` runs it whole; a server advances
    several, token by token, in a batch (`mlxkit.batch`).

    With `prompt_cache`, tokens it already holds are not
    processed again; it is left holding the prompt and everything generated. Past the model's
    context (max_position_embeddings) generation warns once, or ends with `stop_at_context`.

    `images` (paths, PIL images, H×W×3 uint8 arrays) go to the prompt's image parts in order:
    the `<|image_pad|>`s of a string, the {"type": "image"} parts of a chat (a part
    {"type": "image", "image": X} brings its own). `videos` likewise: file paths (PyAV),
    `Video(frames, fps)`, or lists of frames at 2 fps. Each image is capped at 1,280 vision
    tokens (DEFAULT_MAX_IMAGE_TOKENS) unless `max_pixels` / `min_pixels` bound its resized
    pixel count. An image the prompt cache already holds is not encoded again.

    With `mtp`, `num_draft` tokens are drafted per round; "auto" chooses 0..3 before each round
    from the costs and the acceptance seen (`mlxkit.draft_control`). With a `seed`, or
    `deterministic`, that choice ignores the clock (it uses `mlxkit tune`'s table or a default),
    so the same seed gives the same text however busy the machine is. The last response's
    `drafting` says what was chosen and why.

    `kv_bits` (4 or 8) keeps the full-attention layers' KV cache (and the MTP head's) quantized
    in groups of `kv_group_size`, once it holds `quantized_kv_start` positions (mlx-lm's
    --kv-bits, --kv-group-size, --quantized-kv-start); a `prompt_cache` continues only under
    the settings it was filled with.

    `logprobs=N` (0..20) gives each response the model's log-probability of its token and of
    the N most likely tokens (`response.logprobs`): the raw log-softmax, before temperature,
    penalties and logit_bias. `logit_bias` ({token id: bias in [-100, 100]}) is added to those
    tokens' logits before sampling (OpenAI's).

    `response_format` (OpenAI's: {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"schema": {...}}}) or `grammar` (a `mlxkit.structured.Grammar`: JSON
    Schema, any JSON, a regular expression or a Lark grammar; a string is a Lark grammar)
    constrain the output (`mlxkit.structured`; needs llguidance): with thinking on, from the
    token after `</think>`; with MTP, drafts are made within the grammar and verification masks
    the main model as plain constrained decoding does, so the output is the same."""
    bias = _logit_bias(logit_bias, model.config.vocab_size)
    params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty, logit_bias=bias)
    options = _checked_options(
        model, tokenizer, params, max_tokens, num_draft, prefill_chunk, seed, stop, stop_at_context
    )
    n_logprobs = None if logprobs is None else _int("logprobs", logprobs, 0, MAX_LOGPROBS)
    wanted = grammar_of(response_format, grammar)
    constraint = None if wanted is None else Constraint(tokenizer, wanted, model.config.vocab_size)
    reproducible = seed is not None or bool(deterministic)
    kv = kv_quantization(kv_bits, kv_group_size, quantized_kv_start, model.config.head_dim)
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise MlxkitError("prompt_cache must be a PromptCache (PromptCache.new(model))")
    encoded = encode_prompt(
        tokenizer, prompt, enable_thinking, model, images, videos, min_pixels, max_pixels
    )
    _check_prompt(encoded.tokens, model)
    mtp = _use_mtp(model, mtp)  # from here, under stream_generate: its stacklevel counts on it
    cache = prompt_cache if prompt_cache is not None else PromptCache.new(model, kv)
    control = _draft_control(model, options.num_draft, reproducible) if mtp else None
    image_keys = [v.key for v in encoded.images]
    video_keys = [v.key for v in encoded.videos]
    n_cached = cache.start(model, encoded.tokens, mtp, image_keys, video_keys, kv)
    decoder = Decoder(model, cache, options.params, options.keys, n_logprobs, constraint)
    return Generation(tokenizer, encoded, decoder, control, options, n_cached)


@dataclass(frozen=True)
class _Options:
    """stream_generate's options once checked, all before the prompt is encoded: a bad
    option fails at once, not after the prompt's images and videos are read."""

    params: SamplingParams
    keys: Keys
    limits: Limits
    num_draft: int | str  # "auto" or 1..MAX_DRAFT
    prefill_chunk: int


def _checked_options(
    model: Model,
    tokenizer,
    params: SamplingParams,
    max_tokens: int,
    num_draft: int | str,
    prefill_chunk: int,
    seed: int | None,
    stop: str | Sequence[str] | None,
    stop_at_context: bool,
) -> _Options:
    max_tokens = _int("max_tokens", max_tokens, 1)
    if isinstance(num_draft, str):
        if num_draft != "auto":
            raise MlxkitError(f'num_draft must be "auto" or an integer, got {num_draft!r}')
    else:
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
    return _Options(params, keys, limits, num_draft, prefill_chunk)


def _draft_control(model: Model, num_draft: int | str, reproducible: bool) -> DraftControl:
    """A fixed k, or auto: costs from `mlxkit tune`'s table (else the default shape), timed
    rounds correcting them unless `reproducible`; acceptance from the model's last timed run
    (`reproducible`: from the table's, else the default)."""
    if num_draft != "auto":
        return DraftControl.fixed_k(num_draft)
    table = cached_table(model) or default_costs(quantized=model_is_quantized(model))
    if reproducible:
        return DraftControl(table, DraftState.new(table), timed=False)
    return DraftControl(table, last_state(model, table), timed=True)


@dataclass
class Generation:
    """One generation between `start_generation` and its last response: its prompt is
    prefilled (`prefill_part` for a piece of it, `finish_prefill` for the rest and the first
    token), then `run` decodes it alone, speculatively with the MTP head when there is a
    `control`. A batch (`mlxkit.batch`) takes it over after `finish_prefill` instead."""

    tokenizer: object
    encoded: EncodedPrompt
    decoder: Decoder
    control: DraftControl | None
    options: _Options
    n_cached: int  # prompt tokens the prompt cache already held
    out: Responses | None = None  # set by finish_prefill
    _t0: float = field(default_factory=time.perf_counter)

    @property
    def cache(self) -> PromptCache:
        return self.decoder.cache

    @property
    def remaining(self) -> list[int]:
        """The prompt tokens not yet prefilled."""
        return self.encoded.tokens[len(self.cache.tokens) :]

    def images_within(self, n: int) -> tuple[list[VisionInput], list[VisionInput]] | None:
        """The images and videos whose pads the next n prompt tokens hold, or None when those
        tokens hold part of one (a prefill piece must hold whole ones)."""
        model, piece = self.decoder.model, self.remaining[:n]
        if not model.has_vision:
            return [], []
        vt, taken = model.vision_tokens, []
        for pad, media, held in (
            (vt.image, self.encoded.images, self.cache.image_keys),
            (vt.video, self.encoded.videos, self.cache.video_keys),
        ):
            pads, chosen = piece.count(pad), []
            for v in media[len(held) :]:
                if pads <= 0:
                    break
                chosen.append(v)
                pads -= v.num_tokens
            if pads != 0:
                return None
            taken.append(chosen)
        return taken[0], taken[1]

    def prefill_part(self, n: int) -> None:
        """Prefills the next n prompt tokens (fewer than remain; whole images only)."""
        images, videos = self.images_within(n)
        run_prompt(
            self.decoder.model,
            self.cache,
            self.remaining[:n],
            self.options.prefill_chunk,
            images,
            videos,
        )

    def finish_prefill(self) -> int:
        """Prefills the rest of the prompt and returns the first generated token."""
        n = len(self.remaining)
        images, videos = self.images_within(n)
        mx.reset_peak_memory()
        first = self.decoder.prefill(self.remaining, self.options.prefill_chunk, images, videos)
        prompt_s = time.perf_counter() - self._t0
        report = self.control.report if self.control is not None else None
        self.out = Responses(
            self.tokenizer,
            self.options.limits,
            len(self.encoded.tokens),
            self.n_cached,
            prompt_s,
            report,
        )
        return first

    def run(self) -> Iterator[GenerationResponse]:
        """Prefills what remains of the prompt, then decodes to the end."""
        self._t0 = time.perf_counter()
        yield from self.decode(self.finish_prefill())

    def decode(self, y: int) -> Generator[GenerationResponse, None, int | None]:
        """Decodes alone from y (the next token, not yet run), speculatively when there is a
        `control`, until the end, or until the decoder's `pause()` turns true: then returns the
        token to go on from."""
        if self.control is not None:
            return (yield from self.decoder.speculative(y, self.control, self.out))
        y, _ = yield from self.decoder.plain(y, self.out)
        return y


def generate(model: Model, tokenizer, prompt, **kwargs) -> str:
    """The whole completion as one string (see `stream_generate` for the options)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def prefill(
    model: Model,
    prompt_cache: PromptCache,
    tokens: Sequence[int],
    prefill_chunk: int = 512,
    images: Sequence[ImageLike | VisionInput] = (),
    videos: Sequence[VideoLike | VisionInput] = (),
) -> None:
    """Processes `tokens` after those `prompt_cache` holds, generating nothing, so that a later
    `stream_generate` whose prompt extends them starts from there. `images` and `videos` are
    those whose (expanded) pads `tokens` hold, in order."""
    if tokens:
        images = prepare_images(model, images)
        videos = prepare_videos(model, videos)
        run_prompt(model, prompt_cache, list(tokens), prefill_chunk, images, videos)
