"""Prefill, decode and MTP self-speculative decoding.

A speculative round, with y the last sampled token (not yet run through the main model):
  1. the MTP head drafts d_1..d_k, recursively, from the main model's hidden states;
  2. one main-model pass over [y, d_1..d_k] verifies them, every Gated-DeltaNet layer
     recording its state after each position;
  3. drafts are accepted greedily (argmax equality) or by the speculative-sampling rule, and
     every cache is committed at the last accepted position — KV caches trimmed, recurrent and
     conv states taken from the recorded ones, nothing recomputed.
The MTP head keeps its own KV cache; its entries made from draft (not verified) hidden states
are dropped after each round and rebuilt from the verified hidden states at the next round's
first draft step, so it always equals what an MTP pass over the real sequence would hold.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxkit.errors import MlxkitError
from mlxkit.models.qwen3_5 import Model
from mlxkit.sample import (
    SamplingParams,
    apply_repetition_penalty,
    greedy_accept,
    probs,
    sample,
    speculative_accept,
)

MAX_DRAFT = 8


@dataclass
class GenerationResponse:
    text: str  # the text this token completed (may be empty mid-character)
    token: int
    prompt_tokens: int
    prompt_cached: int  # prompt tokens taken from the prompt cache instead of being processed
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: int  # bytes
    drafted: int
    accepted: int
    finish_reason: str | None  # "stop", "length" or None while generating

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class PromptCache:
    """Everything needed to continue from `tokens` without reprocessing them.

    `mtp_pending` holds the main model's hidden states at the positions the MTP head has not
    consumed yet (it needs the token after each, which is not known for the last one); `mtp` is
    None when the MTP cache is not in step with the main one.
    """

    main: list
    mtp: list | None
    tokens: list[int] = field(default_factory=list)
    mtp_pending: mx.array | None = None

    @classmethod
    def new(cls, model: Model) -> PromptCache:
        return cls(model.make_cache(), model.make_mtp_cache() if model.has_mtp else None)

    def copy(self) -> PromptCache:
        """An independent snapshot (compact copies of the states): decoding on from either one
        leaves the other as it was. A server keeps such snapshots of shared prefixes."""

        def clone(c):
            new = type(c)()
            new.state = {k: mx.contiguous(v) for k, v in c.state.items()}
            return new

        main = [clone(c) for c in self.main]
        mtp = None if self.mtp is None else [clone(c) for c in self.mtp]
        pending = None if self.mtp_pending is None else mx.contiguous(self.mtp_pending)
        mx.eval([c.state for c in main + (mtp or [])], pending)
        return PromptCache(main, mtp, list(self.tokens), pending)

    def save(self, path: str | Path) -> None:
        arrays = {}
        for name, caches in (("main", self.main), ("mtp", self.mtp or [])):
            for i, c in enumerate(caches):
                for key, value in c.state.items():
                    arrays[f"{name}.{i}.{key}"] = value
        if self.mtp_pending is not None:
            arrays["mtp_pending"] = self.mtp_pending
        meta = {"tokens": ",".join(map(str, self.tokens)), "mtp": str(self.mtp is not None)}
        mx.save_safetensors(str(path), arrays, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model: Model) -> PromptCache:
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise MlxkitError(f"{path}: not a prompt cache ({e})") from None
        cache = cls.new(model)
        cache.tokens = [int(t) for t in meta.get("tokens", "").split(",") if t]
        if meta.get("mtp") != "True":
            cache.mtp = None
        for name, caches in (("main", cache.main), ("mtp", cache.mtp or [])):
            for i, c in enumerate(caches):
                prefix = f"{name}.{i}."
                c.state = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        cache.mtp_pending = arrays.get("mtp_pending")
        return cache


def encode_prompt(
    tokenizer, prompt: str | Sequence[int] | Sequence[dict], enable_thinking: bool
) -> list[int]:
    """A string, token ids, or chat messages (rendered with the tokenizer's chat template)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        text = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        return tokenizer.encode(text)
    if all(isinstance(t, int) for t in prompt):
        return prompt
    raise MlxkitError("prompt must be a string, a list of token ids, or a list of chat messages")


def _prefill(model: Model, cache: PromptCache, new_tokens: list[int], chunk: int) -> mx.array:
    """Runs new tokens through the main model in chunks (bounded activations; no logits) and
    feeds the MTP head every position whose next token is known. Returns the last hidden state."""
    all_tokens = cache.tokens + new_tokens
    start = len(cache.tokens)
    hidden = None
    for s in range(0, len(new_tokens), chunk):
        piece = new_tokens[s : s + chunk]
        hidden = model.hidden(mx.array([piece]), cache.main)
        if cache.mtp is not None:
            if cache.mtp_pending is not None:
                hidden_all = mx.concatenate([cache.mtp_pending, hidden], axis=1)
            else:
                hidden_all = hidden
            end = start + s + len(piece)  # positions before `end` are now in the main cache
            n_known = hidden_all.shape[1] - 1
            if n_known > 0:
                nxt = all_tokens[end - n_known : end]
                model.mtp_hidden(hidden_all[:, :-1], mx.array([nxt]), cache.mtp)
            cache.mtp_pending = hidden_all[:, -1:]
        mx.eval(hidden, *[c.state for c in cache.main], *[c.state for c in cache.mtp or []])
    cache.tokens = all_tokens
    return hidden[:, -1:]


def prefill(
    model: Model, prompt_cache: PromptCache, tokens: Sequence[int], prefill_chunk: int = 512
) -> None:
    """Processes `tokens` after those `prompt_cache` holds, generating nothing, so that a later
    `stream_generate` whose prompt extends them starts from there."""
    if tokens:
        _prefill(model, prompt_cache, list(tokens), prefill_chunk)


def _pick(
    logits: mx.array, history: list[int], params: SamplingParams, key: mx.array | None
) -> mx.array:
    logits = apply_repetition_penalty(logits, history, params)
    return logits.argmax(-1) if params.greedy else sample(probs(logits, params), key)


def _validate(tokens: list[int], model: Model, num_draft: int, max_tokens: int) -> None:
    if not tokens:
        raise MlxkitError("the prompt is empty")
    limit = model.config.max_position_embeddings
    if len(tokens) >= limit:
        raise MlxkitError(f"the prompt has {len(tokens)} tokens; this model's context is {limit}")
    if not 1 <= num_draft <= MAX_DRAFT:
        raise MlxkitError(f"num_draft must be between 1 and {MAX_DRAFT}, got {num_draft}")
    if max_tokens < 1:
        raise MlxkitError(f"max_tokens must be >= 1, got {max_tokens}")


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
    stop: Sequence[str] | None = None,
    enable_thinking: bool = True,
    prefill_chunk: int = 512,
    prompt_cache: PromptCache | None = None,
) -> Iterator[GenerationResponse]:
    """Yields one response per new token. With `prompt_cache`, tokens it already holds are not
    processed again; it is left holding the prompt and everything generated."""
    params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty)
    tokens = encode_prompt(tokenizer, prompt, enable_thinking)
    _validate(tokens, model, num_draft, max_tokens)
    if mtp and not model.has_mtp:
        warnings.warn("this model has no MTP weights; decoding without speculation", stacklevel=2)
        mtp = False
    key = mx.random.key(seed if seed is not None else time.time_ns() % 2**32)
    eos = set(tokenizer.eos_token_ids)
    stop = [s for s in (stop or []) if s]

    cache = prompt_cache if prompt_cache is not None else PromptCache.new(model)
    if cache.tokens != tokens[: len(cache.tokens)] or len(cache.tokens) >= len(tokens):
        fresh = PromptCache.new(model)  # the cached states cannot be rewound to a shorter prefix
        cache.main, cache.mtp, cache.tokens, cache.mtp_pending = fresh.main, fresh.mtp, [], None
    if mtp and cache.mtp is None and cache.tokens:
        raise MlxkitError("this prompt cache was filled without MTP; pass mtp=False or a new cache")
    if not mtp:
        cache.mtp, cache.mtp_pending = None, None

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    n_new = len(tokens) - len(cache.tokens)
    hidden = _prefill(model, cache, tokens[len(cache.tokens) :], prefill_chunk)
    key, sub = mx.random.split(key)
    y = _pick(model.logits(hidden)[0, -1], tokens, params, sub)
    mx.eval(y)
    prompt_tps = n_new / (time.perf_counter() - t0)

    detok = tokenizer.detokenizer()
    produced: list[int] = []
    held = ""  # decoded text not handed out yet: it may be the start of a stop string
    counts = _DraftCounts()
    t_gen = time.perf_counter()

    def emit(token: int) -> GenerationResponse:
        nonlocal held
        finish = None
        if token in eos:
            finish = "stop"
        else:
            held += detok.add_token(token)
            if len(produced) >= max_tokens:
                finish = "length"
                held += detok.finalize()
        cut = min((i for i in (held.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            piece, held, finish = held[:cut], "", "stop"
        elif finish is not None:
            piece, held = held, ""
        else:
            keep = max(
                (n for s in stop for n in range(1, len(s)) if held.endswith(s[:n])), default=0
            )
            piece, held = held[: len(held) - keep], held[len(held) - keep :]
        elapsed = max(time.perf_counter() - t_gen, 1e-9)
        return GenerationResponse(
            piece, token, len(tokens), len(tokens) - n_new, prompt_tps, len(produced), len(produced) / elapsed,
            mx.get_peak_memory(), counts.drafted, counts.accepted, finish,
        )  # fmt: skip

    if not mtp:
        yield from _plain_decode(model, cache, y, tokens, produced, params, key, emit)
        return

    yield from _mtp_decode(model, cache, y.item(), tokens, produced, params, key, emit, counts,
                           num_draft, eos, max_tokens)  # fmt: skip


@dataclass
class _DraftCounts:
    drafted: int = 0
    accepted: int = 0


def _mtp_decode(
    model, cache, y, tokens, produced, params, key, emit, counts, num_draft, eos, max_tokens
) -> Iterator[GenerationResponse]:
    """Speculative rounds (see the module docstring). The next round's drafts are queued
    (async_eval) before this round's tokens are handed out, so the caller's time between
    tokens overlaps with drafting."""
    k = num_draft

    def draft(y: int, pending_next: list[int], key: mx.array | None):
        logits_q, h = model.mtp_forward(
            cache.mtp_pending, mx.array([pending_next + [y]]), cache.mtp
        )
        keys = None if params.greedy else mx.random.split(key, k)
        drafts, qs = [], []
        for j in range(k):
            lq = logits_q[0, -1]
            if params.greedy:
                d = lq.argmax(-1)
            else:
                qs.append(probs(lq, params))
                d = sample(qs[-1], keys[j])
            drafts.append(d)
            if j + 1 < k:
                logits_q, h = model.mtp_forward(h[:, -1:], d.reshape(1, 1), cache.mtp)
        drafts = mx.stack(drafts)
        mx.async_eval(drafts)
        return drafts, qs

    def split_key():
        nonlocal key
        if params.greedy:  # greedy rounds draw nothing
            return None, None
        key, k_draft, k_accept = mx.random.split(key, 3)
        return k_draft, k_accept

    k_draft, k_accept = split_key()
    pending = cache.tokens[len(cache.tokens) - cache.mtp_pending.shape[1] + 1 :]
    drafts, qs = draft(y, pending, k_draft)
    while True:
        for c in cache.main:
            c.begin_verify()
        logits_p, hidden = model.logits_and_hidden(mx.concatenate([mx.array([y]), drafts])[None], cache.main)  # fmt: skip
        if params.repetition_penalty != 1.0:
            seq = [y, *drafts.tolist()]
            history = tokens + produced
            logits_p = mx.stack([apply_repetition_penalty(logits_p[0, j], history + seq[: j + 1], params)
                                 for j in range(k + 1)])[None]  # fmt: skip
        if params.greedy:
            n_acc, nxt = greedy_accept(logits_p, drafts[None])
        else:
            n_acc, nxt = speculative_accept(probs(logits_p, params), mx.stack(qs)[None],
                                            drafts[None], k_accept)  # fmt: skip
        mx.eval(n_acc, nxt, drafts)
        a = n_acc.item()
        new = [y, *drafts.tolist()[:a]]
        counts.drafted += k
        counts.accepted += a
        # Stop inside the accepted run: commit only what is emitted.
        keep = len(new)
        for i, t in enumerate(new):
            if t in eos or len(produced) + i + 1 >= max_tokens:
                keep = i + 1
                break
        for c in cache.main:
            c.accept(keep, k + 1)
        for c in cache.mtp:
            c.trim(k - 1)  # entries built from draft hidden states
        cache.tokens += new[:keep]
        cache.mtp_pending = hidden[:, :keep]
        responses = []
        for t in new[:keep]:
            produced.append(t)
            responses.append(emit(t))
            if responses[-1].finish_reason is not None:
                break
        finished = responses[-1].finish_reason is not None
        if not finished:
            y = nxt.item()
            k_draft, k_accept = split_key()
            drafts, qs = draft(y, new[1:keep], k_draft)
        yield from responses
        if finished:
            return


def _plain_decode(
    model, cache, y, tokens, produced, params, key, emit
) -> Iterator[GenerationResponse]:
    """One token per step. The next step's graph is built and queued (async_eval) on the
    still-lazy current token before waiting for its value, so building a graph and handing out a
    token both overlap with compute."""

    def step(y: mx.array, history: list[int], key: mx.array | None) -> mx.array:
        logits = model(y.reshape(1, 1), cache.main)[0, -1]
        return _pick(logits, history, params, key)

    pipelined = params.repetition_penalty == 1.0  # the penalty needs the token's value first
    while True:
        sub = None
        if not params.greedy:
            key, sub = mx.random.split(key)
        if pipelined:
            nxt = step(y, [], sub)
            mx.async_eval(nxt)
            token = y.item()
        else:
            token = y.item()
            nxt = step(y, tokens + produced + [token], sub)
        cache.tokens.append(token)
        produced.append(token)
        response = emit(token)
        yield response
        if response.finish_reason is not None:
            return
        y = nxt


def generate(model: Model, tokenizer, prompt, **kwargs) -> str:
    """The whole completion as one string (see `stream_generate` for the options)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
