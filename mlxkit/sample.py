"""Turning logits into a next-token distribution, sampling from it, and the speculative-sampling
acceptance rule.

Speculative decoding needs whole distributions (target p and draft q), not just samples, so
the filters (temperature, top-k, top-p, min-p) are expressed as `probs(logits)`; greedy is the
temperature-0 limit and is handled by argmax everywhere.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import mlx.core as mx

from mlxkit.errors import MlxkitError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit), OpenAI's

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise MlxkitError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise MlxkitError(f"{name} must be a finite number, got {value}")
        if not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, bool):
            raise MlxkitError(f"top_k must be an integer, got {self.top_k!r}")
        if self.temperature < 0:
            raise MlxkitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MlxkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MlxkitError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise MlxkitError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise MlxkitError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if not isinstance(token, numbers.Integral) or isinstance(token, bool) or token < 0:
                raise MlxkitError(f"logit_bias keys must be token ids, got {token!r}")
            if not isinstance(bias, numbers.Real) or isinstance(bias, bool):
                raise MlxkitError(f"logit_bias values must be numbers, got {bias!r}")
            if not -100 <= bias <= 100:
                raise MlxkitError(f"logit_bias values must be in [-100, 100], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(
    logits: mx.array, history: list[int], params: SamplingParams
) -> mx.array:
    """CTRL-style penalty on tokens seen in the last `repetition_context` tokens. logits: [V]."""
    if params.repetition_penalty == 1.0 or not history:
        return logits
    seen = mx.zeros((logits.shape[-1],), mx.bool_)
    seen[mx.array(sorted(set(history[-params.repetition_context :])))] = True
    p = params.repetition_penalty
    return mx.where(seen, mx.where(logits > 0, logits / p, logits * p), logits)  # a new array


def apply_logit_bias(logits: mx.array, params: SamplingParams) -> mx.array:
    """Adds each biased token's bias to its logit (last axis), as OpenAI's logit_bias: -100
    all but bans a token, +100 all but forces it."""
    if not params.logit_bias:
        return logits
    tokens, values = zip(*params.logit_bias)
    bias = mx.zeros((logits.shape[-1],), mx.float32).at[mx.array(tokens)].add(mx.array(values))
    return logits + bias


def probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """The distribution a token is drawn from (float32, last axis), after all filters."""
    logits = logits.astype(mx.float32) / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[..., -params.top_k][..., None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    p = mx.softmax(logits, axis=-1)
    if params.min_p > 0:
        p = mx.where(p < params.min_p * p.max(axis=-1, keepdims=True), 0.0, p)
    if params.top_p < 1:
        order = mx.argsort(-p, axis=-1)
        sorted_p = mx.take_along_axis(p, order, axis=-1)
        before = mx.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly ahead of each token
        keep_sorted = before < params.top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        p = mx.where(keep, p, 0.0)
    return p / p.sum(axis=-1, keepdims=True)


def sample(p: mx.array, key: mx.array) -> mx.array:
    """Draw from a distribution over the last axis."""
    return mx.random.categorical(mx.log(p), key=key)


def speculative_accept(
    target: mx.array, draft: mx.array, drafts: mx.array, key: mx.array
) -> tuple[mx.array, mx.array]:
    """The standard speculative-sampling rule (Leviathan et al.; Chen et al.).

    target: [B, k+1, V] the main model's distributions at the k+1 verified positions;
    draft: [B, k, V] the distributions the k drafts were drawn from; drafts: [B, k].
    Draft j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the
    next token is drawn from normalise(max(0, p_j − q_j)); if all k are accepted it is drawn from
    p_{k+1}. The output tokens are then distributed exactly as sampling from the target alone.
    Returns (number accepted [B], the token that follows the accepted drafts [B]).
    """
    B, k = drafts.shape
    k_accept, k_next = mx.random.split(key)
    idx = drafts[..., None]
    p_d = mx.take_along_axis(target[:, :k], idx, axis=-1)[..., 0]
    q_d = mx.take_along_axis(draft, idx, axis=-1)[..., 0]
    u = mx.random.uniform(shape=(B, k), key=k_accept)
    ok = u * q_d < p_d  # u < p/q without dividing by a zero q
    n_accepted = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)  # length of accepted prefix

    # Distribution of the next token: residual at the first rejection, else the bonus position.
    residual = mx.maximum(target[:, :k] - draft, 0.0)
    residual = mx.concatenate([residual, target[:, k:]], axis=1)  # [B, k+1, V]
    pick = mx.take_along_axis(residual, n_accepted[:, None, None], axis=1)[:, 0]
    mass = pick.sum(axis=-1, keepdims=True)
    # p == q makes the residual empty, but then rejection has probability zero; guard anyway.
    fallback = mx.take_along_axis(target, n_accepted[:, None, None], axis=1)[:, 0]
    pick = mx.where(mass > 0, pick / mx.maximum(mass, 1e-30), fallback)
    return n_accepted, sample(pick, k_next)


def greedy_accept(target_logits: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    """Greedy verification: keep drafts while they equal the main model's argmax; the next
    token is the argmax at the first mismatch (or after the last draft)."""
    best = target_logits.argmax(axis=-1)  # [B, k+1]
    k = drafts.shape[1]
    n_accepted = mx.cumprod((best[:, :k] == drafts).astype(mx.int32), axis=1).sum(axis=1)
    return n_accepted, mx.take_along_axis(best, n_accepted[:, None], axis=1)[:, 0]
