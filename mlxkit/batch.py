"""Decoding several generations together, one token each per step, for a server's
continuous batching (`mlxkit.serve.engine`).

A batch step runs every member's last token through the main model in one pass of batch B:
every weight is read once for the B tokens, which is what makes a batch of 8 cost little
more than one sequence where decoding is bound by memory bandwidth (Apple GPUs; on this
project's 2-core CPU it is compute-bound and a batch costs nearly B steps).

How sequences of different lengths share a pass (`Model` layers take a `Batch`'s caches).
While the membership stays the same the members' states are stacked, one row each, and copied
back into each member's own cache when it changes (a member joins or leaves, or decodes alone):
- Gated-DeltaNet layers keep a fixed-size state per sequence: one `LinearAttentionCache` of B
  rows per layer.
- Full-attention layers: one `BatchKVCache` per layer, each row filled to its own offset, new
  positions written and rotated at each row's offset and the rest masked: no left-padding, so
  nobody's positions move when another joins. A quantized KV cache stays each member's own,
  its attention run per sequence (`DecoderLayer._attention_rows`: a row reaching
  `quantized_kv_start` would change the layout of a shared buffer).

Members decode plainly in a batch step (one token each, their own sampling settings, random
keys, penalties, logit_bias, grammar and log-probabilities through `Decoder.pick`); MTP
rounds are left to a generation decoding alone (`Decoder.speculative`). The hidden state of
each step is kept for the member's MTP head (`mtp_pending`), so a member that is alone again
drafts from a complete MTP cache. Greedy tokens are the same as decoding alone; so is a seeded
sampled generation's text, except that a seeded one with MTP must stay out of batches (its
draft schedule decides which random draws it takes: the engine decodes it alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from mlxkit.cache import BatchKVCache, LinearAttentionCache
from mlxkit.errors import MlxkitError
from mlxkit.generate import Generation
from mlxkit.models.qwen3_5 import Rotary
from mlxkit.response import GenerationResponse


@dataclass(eq=False)
class Member:
    """A generation in a batch. Its next token (not yet run through the model) is `y` once its
    value is known, or `picked`, the (token, finite) pair a batch step queued and nobody has
    waited for yet: the next step runs it through the model before reading it."""

    generation: Generation
    y: int | None
    picked: tuple[mx.array, mx.array] | None = None
    hiddens: list[mx.array] = field(default_factory=list)  # for mtp_pending, not yet joined

    def next_token(self) -> int:
        """The next token's value (waits for the step that picked it); the MlxkitError of
        non-finite logits if they were."""
        if self.picked is not None:
            self.y = self.generation.decoder.checked(*self.picked)
            self.picked = None
        return self.y

    def _input(self) -> mx.array:
        return mx.array(self.y) if self.picked is None else self.picked[0]

    def _history(self) -> list[int]:
        """What a pick that reads the tokens before it is given: the cached ones and the next
        (its value read unchecked: the check comes when it is handed out)."""
        cache = self.generation.cache
        y = self.y if self.picked is None else self.picked[0].item()
        return cache.tokens + [y]

    def settle(self) -> None:
        """Joins the hidden states of its batch steps to `mtp_pending`, as decoding alone
        leaves it (before it decodes alone or its cache is kept)."""
        cache = self.generation.cache
        if self.hiddens and cache.mtp is not None:
            cache.mtp_pending = mx.concatenate([cache.mtp_pending, *self.hiddens], axis=1)
        self.hiddens = []


class Batch:
    """The members of the current batch step and their stacked states (see the module
    docstring)."""

    def __init__(self, model) -> None:
        self.model = model
        self.members: list[Member] = []
        self._layers: list | None = None  # per layer: a stacked cache, or the members' KV caches

    def set_members(self, members: list[Member]) -> None:
        """The members of the next steps (their states restacked only when they change)."""
        if [id(m) for m in members] == [id(m) for m in self.members]:
            return
        self.release()
        self.members = list(members)

    def release(self) -> None:
        """Copies the stacked states back into the members' own caches; empties the batch."""
        if self._layers is not None:
            for i, layer in enumerate(self._layers):
                if isinstance(layer, BatchKVCache):
                    layer.release()
                elif isinstance(layer, LinearAttentionCache):
                    for b, m in enumerate(self.members):
                        own, row = m.generation.cache.main[i], mx.array([b])
                        # gathered, not sliced: a row slice would keep the whole stack alive
                        own.conv_state = mx.take(layer.conv_state, row, axis=0)
                        own.recurrent_state = mx.take(layer.recurrent_state, row, axis=0)
                        own.offset += layer.offset
        self._layers, self.members = None, []

    def _stacked(self) -> list:
        if self._layers is None:
            caches = [m.generation.cache.main for m in self.members]
            self._layers = []
            for i, own in enumerate(caches[0]):
                if isinstance(own, LinearAttentionCache):
                    layer = LinearAttentionCache()
                    layer.conv_state = mx.concatenate([c[i].conv_state for c in caches])
                    layer.recurrent_state = mx.concatenate([c[i].recurrent_state for c in caches])
                    self._layers.append(layer)
                elif own.quantization is None:
                    self._layers.append(BatchKVCache([c[i] for c in caches]))
                else:
                    self._layers.append([c[i] for c in caches])
        return self._layers

    def step(self) -> list[GenerationResponse | MlxkitError]:
        """One token for every member: runs each member's next token through the model and
        queues (async_eval) the pick of the one after, then hands out the token it ran: each
        member's response for it, or the error that ends it (non-finite logits). Waiting for
        the token's value after the next pass is queued lets handing tokens out (and the
        server's streaming) overlap with compute, as mlx-lm's batch generator does; a member
        whose pick reads the tokens before it waits for them first."""
        members = self.members
        decoders = [m.generation.decoder for m in members]
        ys = mx.stack([m._input() for m in members]).reshape(-1, 1)
        shifts = mx.array([d.cache.rope_delta for d in decoders], dtype=mx.int32)
        logits, hidden = self.model.logits_and_hidden(ys, self._stacked(), Rotary(shifts))
        picked = []
        for b, (m, d) in enumerate(zip(members, decoders)):
            (key,) = d.keys.take()
            history = m._history() if d.reads_history else []
            picked.append(d.pick(logits[b, -1], history, key))
            if d.cache.mtp is not None:
                m.hiddens.append(hidden[b : b + 1])
        mx.async_eval(picked)
        results: list[GenerationResponse | MlxkitError] = []
        for m, d, pick in zip(members, decoders, picked):
            try:
                y = m.next_token()
            except MlxkitError as e:  # this member's logits broke: it alone ends
                results.append(e)
                continue
            d.cache.tokens.append(y)
            results.append(m.generation.out.push(y, d.scores.take()))
            m.y, m.picked = None, pick
        return results
