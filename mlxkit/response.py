"""What a caller of `stream_generate` receives per token, and the bookkeeping that builds it:
streaming text, stop strings, why generation ends, speeds and draft counts."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class GenerationResponse:
    text: str  # the text this token completed (may be empty mid-character)
    token: int
    prompt_tokens: int
    prompt_cached: int  # prompt tokens taken from the prompt cache instead of being processed
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: int  # bytes: MLX's peak of array memory since the prompt started
    drafted: int
    accepted: int
    finish_reason: str | None  # "stop", "length" or None while generating
    drafting: DraftReport | None = None  # MTP only, on the last response: what k was chosen
    logprobs: TokenLogprobs | None = None  # with stream_generate(logprobs=N) only

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass(frozen=True)
class TokenLogprobs:
    """The model's log-probability of the token, and of its `top` most likely tokens (best
    first): the raw log-softmax of its logits, before temperature, penalties, logit_bias and
    grammar masks (vLLM's default), so the same whatever the sampling. With MTP they are the
    main model's (from its verification pass), never the draft head's."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, log-probability)


@dataclass(frozen=True)
class DraftReport:
    """How a generation drafted (`mlxkit.draft_control`): rounds per k (k = 0 is a plain
    step), their measured milliseconds, the acceptance per draft depth learnt (the chance draft
    j is accepted once drafts 1..j-1 were), where the costs the choices used came from ("tune",
    "default" or "measured") and, for auto, the expected speed of each k against k = 0."""

    auto: bool
    rounds: tuple[int, ...]
    round_ms: tuple[float | None, ...]
    acceptance: tuple[float, ...]
    costs: str
    speedup: tuple[float, ...]

    def as_dict(self) -> dict:
        """The report as JSON values (the server's usage block and /v1/stats)."""
        return {
            "auto": self.auto,
            "rounds_per_k": list(self.rounds),
            "ms_per_round": list(self.round_ms),
            "acceptance_by_depth": list(self.acceptance),
            "costs": self.costs,
            "expected_speedup": list(self.speedup),
        }

    def summary(self) -> str:
        """One line: what was chosen and why."""
        ks = [k for k, n in enumerate(self.rounds) if n]
        chosen = ", ".join(f"k={k} {self.rounds[k]}x" for k in ks)
        measured = ", ".join(f"k={k} {self.round_ms[k]:.2f}" for k in ks)
        depth = " ".join(f"{a:.0%}" for a in self.acceptance[: max(ks + [1])])
        line = f"{'auto' if self.auto else 'fixed'} drafts: rounds {chosen}"
        line += f"; ms per round {measured}; acceptance by depth {depth}"
        if self.auto:
            gains = ", ".join(f"k={k} {s:.2f}x" for k, s in enumerate(self.speedup) if k)
            line += f"; expected vs plain ({self.costs} costs) {gains}"
        return line


@dataclass(frozen=True)
class Limits:
    """When generation ends: a stop token or string, `max_tokens` new tokens, or (with
    `stop_at_context`) the model's context filled; past the context it otherwise warns once."""

    eos: frozenset[int]
    stop: tuple[str, ...]
    max_tokens: int
    context: int  # max_position_embeddings
    stop_at_context: bool


class Responses:
    """Turns generated tokens into GenerationResponses, one `push` per token.

    Text that may be the start of a stop string is held back until it cannot be; the decode
    loop asks `keep` how many of a speculative round's tokens to commit before pushing them.
    """

    def __init__(
        self,
        tokenizer,
        limits: Limits,
        prompt_tokens: int,
        prompt_cached: int,
        prompt_s: float,
        drafting: Callable[[], DraftReport] | None = None,
    ) -> None:
        self.limits = limits
        self._drafting = drafting  # the draft report, asked for at the last response
        self.prompt_tokens, self.prompt_cached = prompt_tokens, prompt_cached
        self.prompt_tps = (prompt_tokens - prompt_cached) / max(prompt_s, 1e-9)
        self.produced = self.drafted = self.accepted = 0
        self._budget = limits.max_tokens
        if limits.stop_at_context:
            self._budget = min(self._budget, limits.context - prompt_tokens)
        self._detok = tokenizer.detokenizer()
        self._held = ""  # decoded text not handed out yet: it may be the start of a stop string
        self._warned = False
        self._t0 = time.perf_counter()

    def keep(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (about to be pushed in order) to commit: up to the first that
        ends generation by a stop token or the token budget (stop strings show only in text)."""
        for i, token in enumerate(tokens):
            if token in self.limits.eos or self.produced + i + 1 >= self._budget:
                return i + 1
        return len(tokens)

    def count_drafts(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted

    def push(self, token: int, logprobs: TokenLogprobs | None = None) -> GenerationResponse:
        self.produced += 1
        self._warn_past_context()
        finish = None
        if token in self.limits.eos:
            finish = "stop"
        else:
            self._held += self._detok.add_token(token)
            if self.produced >= self._budget:
                finish = "length"
                self._held += self._detok.finalize()
        piece, finish = self._release(finish)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        return GenerationResponse(
            text=piece,
            token=token,
            prompt_tokens=self.prompt_tokens,
            prompt_cached=self.prompt_cached,
            prompt_tps=self.prompt_tps,
            generation_tokens=self.produced,
            generation_tps=self.produced / elapsed,
            peak_memory=mx.get_peak_memory(),
            drafted=self.drafted,
            accepted=self.accepted,
            finish_reason=finish,
            drafting=self._drafting() if finish is not None and self._drafting else None,
            logprobs=logprobs,
        )

    def _release(self, finish: str | None) -> tuple[str, str | None]:
        """The held text that can be handed out now, and the finish reason (a stop string
        found in it ends generation there)."""
        held, stop = self._held, self.limits.stop
        cut = min((i for i in (held.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return held[:cut], "stop"
        if finish is not None:
            self._held = ""
            return held, finish
        keep = max((n for s in stop for n in range(1, len(s)) if held.endswith(s[:n])), default=0)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], None

    def _warn_past_context(self) -> None:
        context = self.limits.context
        if not self._warned and self.prompt_tokens + self.produced > context:
            self._warned = True
            warnings.warn(
                f"generation went past this model's context ({context:,} tokens, "
                "max_position_embeddings): later tokens are at positions it was not trained "
                "on; pass stop_at_context=True to stop there",
                stacklevel=3,
            )
