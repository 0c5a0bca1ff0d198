"""Prompt-cache pool: the decoding states of earlier requests, found again by token prefix,
least recently used first out, within a byte budget.

Gated-DeltaNet states cannot be rewound, so an entry serves a new prompt only when its tokens
are a strict prefix of it, and its images (`PromptCache.image_keys`: equal pads do not mean
equal pictures) the prompt's first ones. Two kinds of entry:
- a finished generation's state (prompt + completion): the next request of the conversation
  extends it when the template renders the history as it was generated. It is handed over on
  use (the generation extends it in place and puts the longer state back) and an extension
  replaces it;
- a snapshot (`shared`): the state where a conversation's next turn will part from this
  prompt, or the state of the next turn's predicted prefix, computed while the server is idle
  (see `mlxkit.serve.chat`). It is copied on use and stays, for every later turn that
  branches from there.
A generation that does not finish (client gone, error) does not come back: its state may be
half a speculative round ahead of its tokens. States are put in as compact copies
(`PromptCache.copy`), so that `nbytes` is what they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlxkit.generate import PromptCache


def cache_nbytes(cache: PromptCache) -> int:
    pending = 0 if cache.mtp_pending is None else cache.mtp_pending.nbytes
    return sum(c.nbytes for c in cache.main + (cache.mtp or [])) + pending


@dataclass
class _Entry:
    cache: PromptCache
    nbytes: int
    shared: bool

    @property
    def tokens(self) -> list[int]:
        return self.cache.tokens


class PromptPool:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: list[_Entry] = []  # least recently used first
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def _best(self, tokens: list[int], image_keys: Sequence[str]) -> _Entry | None:
        """The entry holding the longest strict prefix of `tokens` and of its images."""
        best, most = None, 0
        for e in self._entries:
            n = e.cache.reusable(tokens, image_keys)
            if n > most:
                best, most = e, n
        return best

    def held(self, tokens: list[int], image_keys: Sequence[str] = ()) -> int:
        """How many of `tokens` the best entry for them holds (0: none), leaving it in place."""
        best = self._best(tokens, image_keys)
        return 0 if best is None else len(best.tokens)

    def take(
        self, tokens: list[int], image_keys: Sequence[str] = (), count: bool = True
    ) -> PromptCache | None:
        """The state of the longest strict prefix of `tokens` held (with the first of
        `image_keys` as its images), or None; `count`: a request's look-up (counted in hits and
        misses), not the server's own."""
        best = self._best(tokens, image_keys)
        if count:
            self.hits, self.misses = self.hits + (best is not None), self.misses + (best is None)
        if best is None:
            return None
        self._entries.remove(best)
        if best.shared:
            self._entries.append(best)
            return best.cache.copy()
        return best.cache

    def put(self, cache: PromptCache, shared: bool = False) -> None:
        """Keeps a state (one that alone exceeds the budget is not kept)."""
        nbytes = cache_nbytes(cache)
        if not cache.tokens or nbytes > self.max_bytes:
            return
        self._entries = [
            e
            for e in self._entries
            if not _extends(cache, e.cache)
            or (len(e.tokens) < len(cache.tokens) and (shared or e.shared))
        ]
        self._entries.append(_Entry(cache, nbytes, shared))
        total = self.nbytes
        while total > self.max_bytes:
            total -= self._entries.pop(0).nbytes


def _extends(new: PromptCache, old: PromptCache) -> bool:
    """`new` holds `old`'s tokens and images, and perhaps more: an entry it replaces when both
    are a generation's (or they are equal)."""
    k = len(old.image_keys)
    return new.tokens[: len(old.tokens)] == old.tokens and new.image_keys[:k] == old.image_keys
