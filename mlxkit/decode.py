"""Prefill, plain decoding and MTP self-speculative decoding over a `PromptCache`.

`run_prompt` is the one place prompt inputs reach the model (chunked prefill into a cache,
also used alone to prefill a prefix); images and video enter there too, as the embeddings and
M-RoPE positions of the chunks that hold their pads (`mlxkit.multimodal.PromptInputs`). After
the prompt every token is text, placed at its cache slot + the cache's `rope_delta`. `Decoder` is the state of one generation: the model,
the cache it extends, how tokens are picked (sampling parameters and random keys); `plain`
and `speculative` yield GenerationResponses built by `Responses`.

A speculative round (`MTPRound`), with y the last sampled token (not yet run through the main
model):
  1. the MTP head drafts d_1..d_k, recursively, from the main model's hidden states (over
     the model's draft vocabulary when it has one: `mlxkit.draft_vocab`);
  2. one main-model pass over [y, d_1..d_k] verifies them, every Gated-DeltaNet layer
     recording its state after each position;
  3. drafts are accepted greedily (argmax equality) or by the speculative-sampling rule, and
     every cache is committed at the last accepted position — KV caches trimmed, recurrent and
     conv states taken from the recorded ones, nothing recomputed.
The MTP head keeps its own KV cache; its entries made from draft (not verified) hidden states
are dropped after each round and rebuilt from the verified hidden states at the next round's
first draft step, so it always equals what an MTP pass over the real sequence would hold.

How many drafts a round makes is `mlxkit.draft_control`'s choice, made before each round; k = 0
is a plain step, whose hidden state waits in `mtp_pending` for the next round's first draft
step, so the MTP cache stays complete however the rounds alternate.

Non-finite logits end generation with an MlxkitError. The check rides along with the values
each step already waits for (the token, the accepted count), so it adds no wait of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from mlxkit.draft_control import K_MAX, DraftControl
from mlxkit.errors import MlxkitError
from mlxkit.models.qwen3_5 import Model, Rotary
from mlxkit.multimodal import PromptInputs
from mlxkit.prompt_cache import PromptCache
from mlxkit.response import GenerationResponse, Responses, TokenLogprobs
from mlxkit.sample import (
    SamplingParams,
    apply_logit_bias,
    apply_repetition_penalty,
    greedy_accept,
    probs,
    sample,
    speculative_accept,
)
from mlxkit.structured import Constraint, apply_mask
from mlxkit.vision import VisionInput

MAX_DRAFT = 8  # the most tokens an MTP round may draft (num_draft)


class Keys:
    """The random keys of one generation, split off as they are needed; greedy draws none."""

    def __init__(self, seed: int, greedy: bool) -> None:
        self._key = None if greedy else mx.random.key(seed)

    def take(self, n: int = 1) -> list[mx.array | None]:
        if self._key is None:
            return [None] * n
        self._key, *keys = mx.random.split(self._key, n + 1)
        return keys


def run_prompt(
    model: Model,
    cache: PromptCache,
    new_tokens: list[int],
    chunk: int,
    images: Sequence[VisionInput] = (),
    videos: Sequence[VisionInput] = (),
) -> mx.array:
    """Runs new tokens through the main model in chunks (bounded activations; no logits),
    feeding the MTP head every position whose next token is known, and adds them to the cache.
    `images` and `videos` are those whose pads the new tokens hold, in order (encoded here,
    once). Returns the last position's hidden state [1, 1, H].

    Without an MTP cache nothing reads the hidden states before the last, so (as mlx-lm and
    mlx-vlm prefill) only the caches are computed for all but the last token, which then runs
    alone: the last layer's output and the final norm are never computed for the rest."""
    all_tokens = cache.tokens + new_tokens
    start = len(cache.tokens)
    inputs = PromptInputs(model, start, cache.rope_delta, new_tokens, images, videos)
    hidden = None
    for s, e in _chunk_bounds(len(new_tokens), chunk, last_alone=cache.mtp is None):
        piece = new_tokens[s:e]
        rotary = inputs.rotary(start + s, len(piece))
        hidden = model.hidden(mx.array([piece]), cache.main, rotary, inputs.embeddings(s, e))
        if cache.mtp is not None:
            _feed_mtp(model, cache, hidden, all_tokens[: start + e], inputs)
        needed = [hidden] if cache.mtp is not None or e == len(new_tokens) else []
        mx.eval(*needed, *[c.state for c in cache.main], *[c.state for c in cache.mtp or []])
    cache.tokens = all_tokens
    cache.image_keys += [v.key for v in images]
    cache.video_keys += [v.key for v in videos]
    cache.rope_delta = inputs.rope_delta
    return hidden[:, -1:]


def _chunk_bounds(n: int, chunk: int, last_alone: bool) -> list[tuple[int, int]]:
    """(start, end) of each prefill chunk of n tokens; with `last_alone`, the last token is a
    chunk of its own."""
    body = n - 1 if last_alone and n > 1 else n
    bounds = [(s, min(s + chunk, body)) for s in range(0, body, chunk)]
    return bounds + [(body, n)] if body < n else bounds


def _feed_mtp(
    model: Model, cache: PromptCache, hidden: mx.array, known: list[int], inputs: PromptInputs
) -> None:
    """Runs the MTP head over the pending and new hidden states whose next token is known
    (`known` ends with the last token now in the main cache); the last stays pending. Entry i
    sits where the main model placed token i."""
    if cache.mtp_pending is not None:
        hidden = mx.concatenate([cache.mtp_pending, hidden], axis=1)
    n_known = hidden.shape[1] - 1
    if n_known > 0:
        first = len(known) - 1 - n_known  # the token of the first state fed
        nxt = mx.array([known[len(known) - n_known :]])
        model.mtp_hidden(hidden[:, :-1], nxt, cache.mtp, inputs.rotary(first, n_known))
    cache.mtp_pending = hidden[:, -1:]


def _feed_pending(model: Model, cache: PromptCache, y: int, rotary: Rotary) -> mx.array:
    """Runs the MTP head over the pending hidden states (the tokens after them: the last cached
    ones and y) and returns its output at the last one [1, 1, H], the first draft step's.

    The positions before the last are run on their own and their output is never used, so
    only what their KV entries need (fc, k and v projections) is ever evaluated: MLX computes
    a lazy array only when something evaluated depends on it, and the MTP layer's queries,
    output projection and MLP there depend on nothing. After n plain steps that is n - 1
    positions of a fifth or less of the layer's weights instead of n of all of them. It
    matters with quantized weights on a CPU, where MLX's quantized matmul costs as much per
    row as for a single row (bf16 activations, 384x128 4-bit: 0.35 ms for one row, 44 ms for
    64): a round of one draft after 64 plain steps took 3.4 decode steps instead of 8.4
    (micro; benchmarks/results/decode.md, 2026-12-08).

    After an MTP round at most K_MAX + 1 positions are pending, and they go through in one
    pass: a second pass there costs more than it saves where rows are nearly free (bf16)."""
    n_pending = cache.mtp_pending.shape[1]
    after = cache.tokens[len(cache.tokens) - n_pending + 1 :] + [y]  # the token after each
    if n_pending <= K_MAX + 1:
        return model.mtp_hidden(cache.mtp_pending, mx.array([after]), cache.mtp, rotary)[:, -1:]
    model.mtp_hidden(cache.mtp_pending[:, :-1], mx.array([after[:-1]]), cache.mtp, rotary)
    return model.mtp_hidden(cache.mtp_pending[:, -1:], mx.array([[y]]), cache.mtp, rotary)


class Decoder:
    """The decoding state of one generation (see the module docstring)."""

    def __init__(
        self,
        model: Model,
        cache: PromptCache,
        params: SamplingParams,
        keys: Keys,
        logprobs: int | None = None,
        constraint: Constraint | None = None,
    ):
        self.model, self.cache, self.params, self.keys = model, cache, params, keys
        self.rotary = Rotary.text(cache.rope_delta)  # every token after the prompt is text
        self.scores = Scores(logprobs)
        self.constraint = constraint
        # asked between tokens: true when a server wants this generation back at the next
        # clean point (`plain` and `speculative` then return the token to go on from)
        self.pause: Callable[[], bool] = lambda: False

    @property
    def reads_history(self) -> bool:
        """Whether picking a token reads the tokens before it (the repetition penalty and the
        grammar do): then their values must be known first, and `pick` is given them."""
        return self.params.repetition_penalty != 1.0 or self.constraint is not None

    def _adjusted(self, logits: mx.array, history: list[int]) -> mx.array:
        """Logits [..., V] as the token is picked from them: penalties, logit_bias and the
        grammar's mask (`history`: the prompt and every token decided, up to the last)."""
        logits = apply_repetition_penalty(logits, history, self.params)
        logits = apply_logit_bias(logits, self.params)
        if self.constraint is None:
            return logits
        self.constraint.sync(history)
        return apply_mask(logits, self.constraint.mask())

    def pick(
        self, logits: mx.array, history: list[int], key: mx.array | None
    ) -> tuple[mx.array, mx.array]:
        """The next token from logits [V] (lazy), and whether those logits are all finite."""
        finite = mx.isfinite(logits).all()
        raw, logits = logits, self._adjusted(logits, history)
        if self.params.greedy:
            token = logits.argmax(-1)
        else:
            token = sample(probs(logits, self.params), key)
        self.scores.add(raw[None], token[None])
        return token, finite

    def checked(self, token: mx.array, finite: mx.array) -> int:
        """The token's value, once the logits it came from are known to be finite."""
        value = token.item()
        if not finite.item():
            raise MlxkitError(
                f"the model produced non-finite logits (NaN or inf) at position "
                f"{len(self.cache.tokens)}: its weights are broken (check the checkpoint "
                "with `mlxkit info`, or convert it again)"
            )
        return value

    def prefill(
        self,
        new_tokens: list[int],
        chunk: int,
        images: Sequence[VisionInput] = (),
        videos: Sequence[VisionInput] = (),
    ) -> int:
        """Runs the new prompt tokens (`run_prompt`) and returns the first generated token."""
        hidden = run_prompt(self.model, self.cache, new_tokens, chunk, images, videos)
        self.rotary = Rotary.text(self.cache.rope_delta)
        (key,) = self.keys.take()
        token, finite = self.pick(self.model.logits(hidden)[0, -1], self.cache.tokens, key)
        return self.checked(token, finite)

    def _step(
        self, y: mx.array, history: list[int], key: mx.array | None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """A plain step on y: the next token, whether its logits are finite, y's hidden state."""
        logits, hidden = self.model.logits_and_hidden(y.reshape(1, 1), self.cache.main, self.rotary)
        return (*self.pick(logits[0, -1], history, key), hidden)

    def plain(
        self, first: int, out: Responses, control: DraftControl | None = None
    ) -> Generator[GenerationResponse, None, tuple[int | None, int]]:
        """One token per step. The next step's graph is built and queued (async_eval) on the
        still-lazy current token before waiting for its value, so building a graph and handing
        out a token both overlap with compute.

        With `control` (MTP on) these are its k = 0 rounds: each step's hidden state is kept for
        the MTP head (consumed at the next draft), and the steps end when `control` chooses to
        draft, returning the token that round starts from and its k ((None, 0) once generation
        has ended). They end the same way, with k = 0, when `pause()` turns true."""
        y, finite = mx.array(first), mx.array(True)
        pipelined = not self.reads_history
        hiddens = [] if control is None else [self.cache.mtp_pending]
        # the round on `first` is plain: the caller chose it
        k, first_round, paused = 0, True, False
        while True:
            if k > 0 or paused:
                token = self.checked(y, finite)
                if control is not None:
                    control.observe(0, 0)
                    self.cache.mtp_pending = mx.concatenate(hiddens, axis=1)
                return token, k
            (key,) = self.keys.take()
            if pipelined:
                *nxt, hidden = self._step(y, [], key)
                mx.async_eval(*nxt)
                token = self.checked(y, finite)
            else:
                token = self.checked(y, finite)
                *nxt, hidden = self._step(y, self.cache.tokens + [token], key)
            if control is not None:
                hiddens.append(hidden)
                if not first_round:
                    control.observe(0, 0)  # the step that made `token` has ended
            first_round = False
            self.cache.tokens.append(token)
            response = out.push(token, self.scores.take())
            yield response
            if response.finish_reason is not None:
                if control is not None:
                    self.cache.mtp_pending = mx.concatenate(hiddens, axis=1)
                return None, 0
            y, finite = nxt
            paused = self.pause()
            k = 0 if control is None or paused else control.choose()

    def speculative(
        self, first: int, control: DraftControl, out: Responses
    ) -> Generator[GenerationResponse, None, int | None]:
        """Rounds of the k drafts `control` chooses before each: plain steps while it chooses
        0, MTP rounds otherwise. Returns the token to go on from when `pause()` turned true
        (None once generation has ended)."""
        y, k = first, control.choose()
        while y is not None:
            if k == 0:
                y, k = yield from self.plain(y, out, control)
            else:
                y, k = yield from self._rounds(y, k, control, out)
            if y is not None and k == 0 and self.pause():
                return y
        return None

    def _rounds(
        self, y: int, k: int, control: DraftControl, out: Responses
    ) -> Generator[GenerationResponse, None, tuple[int | None, int]]:
        """MTP rounds (see the module docstring) while `control` chooses k > 0; returns the
        token to go on from and its k ((None, 0) once generation has ended). The next round's
        drafts are queued (async_eval) before this round's tokens are handed out, so the
        caller's time between tokens overlaps with drafting."""
        round_ = MTPRound.draft(self, y, k)
        while True:
            new, nxt, hidden = round_.verify(self)
            keep = out.keep(new)  # stop inside the accepted run: commit only what is emitted
            self._commit(new[:keep], hidden, k)
            out.count_drafts(k, len(new) - 1)
            control.observe(k, len(new) - 1)
            responses = []
            for token in new[:keep]:
                responses.append(out.push(token, self.scores.take()))
                if responses[-1].finish_reason is not None:
                    break
            if responses[-1].finish_reason is not None:
                yield from responses
                return None, 0
            k = 0 if self.pause() else control.choose()
            if k > 0:
                round_ = MTPRound.draft(self, nxt, k)
            yield from responses
            if k == 0:
                return nxt, 0

    def _commit(self, kept: list[int], hidden: mx.array, k: int) -> None:
        """Every cache at the last kept position of a verified round of k drafts."""
        for c in self.cache.main:
            c.accept(len(kept), k + 1)
        for c in self.cache.mtp:
            c.trim(k - 1)  # entries built from draft hidden states
        self.cache.tokens += kept
        self.cache.mtp_pending = hidden[:, : len(kept)]


class Scores:
    """The log-probabilities of the tokens decided, handed out in the order the tokens are
    (`take`, one per pushed token): recorded where a token is decided (a plain step's pick, a
    verification pass's accepted drafts and next token) from the main model's raw logits,
    evaluated alongside the token and read only when handed out. Off (`n` None) it records
    nothing and hands out None."""

    def __init__(self, n: int | None) -> None:
        self.n = n  # how many of the most likely tokens to list (the chosen one may be among them)
        self._queued: deque[tuple[mx.array, ...]] = deque()  # lazy, one entry per decision
        self._ready: deque[TokenLogprobs] = deque()

    def add(self, logits: mx.array, tokens: mx.array) -> None:
        """Records the log-probabilities of `tokens` [n] under `logits` [n, V]."""
        if self.n is None:
            return
        lp = logits.astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(lp, tokens.reshape(-1, 1).astype(mx.int32), axis=-1)[:, 0]
        top = mx.argpartition(-lp, self.n, axis=-1)[:, : self.n] if self.n else lp[:, :0]
        top_lp = mx.take_along_axis(lp, top.astype(mx.int32), axis=-1)
        order = mx.argsort(-top_lp, axis=-1)
        entry = (
            chosen,
            mx.take_along_axis(top, order, axis=-1),
            mx.take_along_axis(top_lp, order, axis=-1),
        )
        mx.async_eval(*entry)
        self._queued.append(entry)

    def take(self) -> TokenLogprobs | None:
        """The next pushed token's log-probabilities."""
        if self.n is None:
            return None
        if not self._ready:
            chosen, top, top_lp = (a.tolist() for a in self._queued.popleft())
            for c, ids, values in zip(chosen, top, top_lp):
                self._ready.append(TokenLogprobs(c, tuple(zip(ids, values))))
        return self._ready.popleft()


@dataclass
class MTPRound:
    """One speculative round: y (sampled, not yet run through the main model), the k drafts
    the MTP head made after it, the distributions they were drawn from (sampling only) and the
    key of the acceptance draw."""

    y: int
    drafts: mx.array  # [k], queued
    draft_probs: list[mx.array]
    accept_key: mx.array | None
    masks: list[mx.array | None] | None = None  # with a grammar: after y and after each draft

    @classmethod
    def draft(cls, dec: Decoder, y: int, k: int) -> MTPRound:
        """Drafts k tokens after y: the first step consumes the pending hidden states (the
        tokens after them are the last cached ones and y; only the last needs logits:
        `_feed_pending`), later steps the MTP's own output. Logits come from the draft
        vocabulary when the model has one, except under a grammar, which may allow only tokens
        outside it."""
        params, cache, model = dec.params, dec.cache, dec.model
        draft_key, accept_key = dec.keys.take(2)
        keys = None if params.greedy else mx.random.split(draft_key, k)
        h = _feed_pending(model, cache, y, dec.rotary)
        constraint, masks = dec.constraint, None
        head = model.draft_logits if constraint is None else model.logits
        logits = head(h)
        drafts, draft_probs = [], []
        if constraint is not None:  # drafts only where the grammar allows, taken back after
            constraint.sync(cache.tokens + [y])
            masks = [constraint.mask()]
        for j in range(k):
            row = apply_logit_bias(logits[0, -1], params)
            if masks is not None:
                row = apply_mask(row, masks[-1])
            if params.greedy:
                d = row.argmax(-1)
            else:
                draft_probs.append(probs(row, params))
                d = sample(draft_probs[-1], keys[j])
            drafts.append(d)
            if masks is not None:
                constraint.push(d.item())
                masks.append(constraint.mask())
            if j + 1 < k:
                h = model.mtp_hidden(h[:, -1:], d.reshape(1, 1), cache.mtp, dec.rotary)
                logits = head(h)
        if constraint is not None:
            constraint.rollback(k)
        drafts = mx.stack(drafts)
        mx.async_eval(drafts)
        return cls(y, drafts, draft_probs, accept_key, masks)

    def verify(self, dec: Decoder) -> tuple[list[int], int, mx.array]:
        """One main-model pass over [y, drafts]: y and the accepted drafts, the token that
        follows them, and the pass's hidden states."""
        params, k = dec.params, self.drafts.shape[0]
        for c in dec.cache.main:
            c.begin_verify()
        tokens = mx.concatenate([mx.array([self.y]), self.drafts])
        raw, hidden = dec.model.logits_and_hidden(tokens[None], dec.cache.main, dec.rotary)
        finite = mx.isfinite(raw).all()
        logits = raw
        if params.repetition_penalty != 1.0:
            seq, history = [self.y, *self.drafts.tolist()], dec.cache.tokens
            rows = [
                apply_repetition_penalty(logits[0, j], history + seq[: j + 1], params)
                for j in range(k + 1)
            ]
            logits = mx.stack(rows)[None]
        logits = apply_logit_bias(logits, params)
        if self.masks is not None:  # the target masked as plain constrained decoding masks it
            logits = mx.stack([apply_mask(logits[0, j], m) for j, m in enumerate(self.masks)])[None]
        if params.greedy:
            n_accepted, nxt = greedy_accept(logits, self.drafts[None])
        else:
            target, draft = probs(logits, params), mx.stack(self.draft_probs)[None]
            n_accepted, nxt = speculative_accept(target, draft, self.drafts[None], self.accept_key)
        mx.eval(n_accepted, nxt, self.drafts, finite)
        n = n_accepted.item()
        dec.scores.add(raw[0, : n + 1], mx.concatenate([self.drafts[:n], nxt]))
        accepted = self.drafts.tolist()[:n]
        return [self.y, *accepted], dec.checked(nxt, finite), hidden
