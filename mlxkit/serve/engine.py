"""The generation loop: one model, one generation at a time, a bounded queue in front.

MLX work stays on the thread that calls `Engine.run` (the main thread: MLX arrays made on a
worker thread can abort the interpreter at exit), while the HTTP server runs its event loop on
another. They meet in `Job`: the HTTP side puts it on the queue and reads its events; the loop
hands back each GenerationResponse (or a `Failed`) through the event loop's thread-safe call,
and watches `cancelled` between tokens, so a client that goes away stops its generation at the
next token. It watches `stop()` there too: shutting down answers the generation in progress
and every request still waiting with a 503 (`close`), so that each ends with an error its
client can read before the HTTP server goes.

When no request is waiting, the loop prepares states for the next turns of the conversations
it has just answered (`prepare`): the prefix the next request will start with, prefilled from
the pool in small chunks and given up at a chunk boundary as soon as a request arrives.

The KV-cache quantization (`mlxkit serve --kv-bits`) is the server's, not a request's: every
state it makes (`new_cache`) is kept that way, so the pool never holds states of two settings
(a state continues only under the settings it was filled with).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from mlxkit.cache import kv_quantization
from mlxkit.errors import MlxkitError
from mlxkit.generate import GenerationResponse, PromptCache, prefill, stream_generate
from mlxkit.response import DraftReport
from mlxkit.serve.pool import PromptPool
from mlxkit.vision import VisionInput

log = logging.getLogger("mlxkit.serve")
PREPARE_CHUNK = 32  # tokens prefilled between looks at the queue while preparing a next turn


@dataclass
class Failed:
    status: int  # 400: the runtime refused the request; 500: generation broke; 503: shutdown
    message: str


SHUTTING_DOWN = Failed(503, "the server is shutting down; retry later")


@dataclass
class Job:
    tokens: list[int]
    options: dict  # stream_generate keyword arguments
    loop: asyncio.AbstractEventLoop
    snapshot_at: int | None = None  # keep a shared snapshot after this many prompt tokens
    images: list[VisionInput] = field(default_factory=list)  # whose pads `tokens` hold
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached: int = 0  # prompt tokens taken from the pool (set before the first event)

    def send(self, event: GenerationResponse | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            self.cancelled.set()


@dataclass
class Counters:
    served: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prepared_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_rounds: list[int] = field(default_factory=list)  # MTP rounds per k (k = 0: plain)
    drafting: DraftReport | None = None  # the last generation's


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_queue: int,
        prompt_cache_bytes: int,
        mtp: bool = True,
        num_draft: int | str = "auto",
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.mtp = mtp and model.has_mtp
        self.num_draft = num_draft
        self.kv = kv_quantization(kv_bits, kv_group_size, quantized_kv_start, model.config.head_dim)
        self._kv_options = {  # stream_generate's, for every request
            "kv_bits": kv_bits,
            "kv_group_size": kv_group_size,
            "quantized_kv_start": quantized_kv_start,
        }
        self.max_in_flight = 1 + max_queue
        self.pool = PromptPool(prompt_cache_bytes)
        self.counters = Counters()
        self.in_flight = 0  # admitted and not yet answered: queued or generating
        self.most_in_flight = 0
        self.busy = False  # a generation is running
        self.preparing = False  # a next turn's state is being prefilled
        self.gauges: dict = {}  # memory and pool figures, refreshed by the loop (MLX thread)
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._next_turns: collections.deque[tuple[list[int], list[str]]] = collections.deque(
            maxlen=8
        )
        self._lock = threading.Lock()
        self._closed = False  # shutting down: jobs are refused, not queued
        self._stop: Callable[[], bool] = lambda: False  # set by run()
        self._seconds_per_job = 1.0  # moving average, for Retry-After

    # ------------------------------------------------------------------ HTTP side (any thread)

    def admit(self) -> bool:
        """Takes a place in the queue; False when it is full."""
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                self.counters.rejected += 1
                return False
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def retry_after(self) -> int:
        """Seconds until a place is likely to be free: about one generation."""
        return max(1, math.ceil(self._seconds_per_job))

    def submit(self, job: Job) -> None:
        """Queues an admitted job; once the engine is closed, answers it with a 503 instead."""
        with self._lock:
            if not self._closed:
                self._jobs.put(job)
                return
        job.send(SHUTTING_DOWN)

    def prepare(self, tokens: list[int], image_keys: list[str] = ()) -> None:
        """Asks for the state of `tokens` (a conversation's next prompt starts with them, holding
        the pads of the images keyed `image_keys`) to be computed when the server is idle."""
        self._next_turns.append((tokens, list(image_keys)))

    # ------------------------------------------------------------------ the loop (MLX thread)

    def run(self, stop: Callable[[], bool]) -> None:
        """Serves jobs until `stop()` is true (read between jobs and between tokens); frees
        MLX's buffer cache when idle. Then `close()`."""
        self._stop = stop
        self._refresh()
        while not stop():
            try:
                job = self._jobs.get(timeout=0 if self._next_turns else 0.1)
            except queue.Empty:
                if self._next_turns:
                    self._prepare(*self._next_turns.popleft())
                elif mx.get_cache_memory():
                    mx.clear_cache()
                    self._refresh()
                continue
            if job.cancelled.is_set():
                self.counters.cancelled += 1
                continue
            self.busy = True
            t0 = time.perf_counter()
            try:
                self._serve(job)
            finally:
                self.busy = False
                seconds = time.perf_counter() - t0
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * seconds
                self._refresh()

    def close(self) -> None:
        """Shutting down: answers the jobs still queued, and from now on every job submitted,
        with a 503."""
        with self._lock:
            self._closed = True
        while not self._jobs.empty():
            self._jobs.get().send(SHUTTING_DOWN)

    def new_cache(self) -> PromptCache:
        cache = PromptCache.new(self.model, self.kv)
        if not self.mtp:
            cache.mtp = None
        return cache

    def _serve(self, job: Job) -> None:
        cache = self.pool.take(job.tokens, [v.key for v in job.images]) or self.new_cache()
        job.cached = len(cache.tokens)
        finished = False
        try:
            self._snapshot(job, cache)
            stream = stream_generate(
                self.model,
                self.tokenizer,
                job.tokens,
                prompt_cache=cache,
                mtp=self.mtp,
                num_draft=self.num_draft,
                images=job.images,
                **self._kv_options,
                **job.options,
            )
            try:
                for r in stream:
                    if r.finish_reason is not None:  # counted before the client can see it
                        finished = True
                        self._count(r, job.cached)
                    job.send(r)
                    if not finished and (job.cancelled.is_set() or self._stop()):
                        self.counters.cancelled += 1
                        job.send(SHUTTING_DOWN)  # read only when shutting down: a client is there
                        break
            finally:
                stream.close()
        except MlxkitError as e:
            self.counters.failed += 1
            job.send(Failed(400, str(e)))
        except Exception as e:  # a broken generation must not take the server down
            log.exception("generation failed")
            self.counters.failed += 1
            job.send(Failed(500, f"generation failed: {type(e).__name__}: {e}"))
        if finished:  # kept compact: the live state may pin buffers of its last verify pass
            self.pool.put(cache.copy())

    def _snapshot(self, job: Job, cache: PromptCache) -> None:
        """Prefills the prompt up to `job.snapshot_at` and keeps a shared copy of that state
        (not when the point would cut an image's pads: the state must hold whole images)."""
        at = job.snapshot_at
        context = self.model.config.max_position_embeddings
        if at is None or not job.cached < at < len(job.tokens) < context or not self.pool.max_bytes:
            return
        piece = job.tokens[job.cached : at]
        images = self._whole_images(piece, job.images[len(cache.image_keys) :])
        if images is not None:
            prefill(self.model, cache, piece, images=images)
            self.pool.put(cache.copy(), shared=True)

    def _whole_images(self, tokens: list[int], images: list[VisionInput]) -> list | None:
        """The first of `images` whose pads `tokens` hold, or None when they hold part of one
        (or pads of images not given)."""
        if not self.model.has_vision:
            return []
        vt = self.model.vision_tokens
        if vt.video in tokens:
            return None
        pads, taken = tokens.count(vt.image), []
        for image in images:
            if pads <= 0:
                break
            taken.append(image)
            pads -= image.num_tokens
        return taken if pads == 0 else None

    def _prepare(self, tokens: list[int], image_keys: list[str]) -> None:
        if not self.pool.max_bytes or len(tokens) >= self.model.config.max_position_embeddings:
            return
        held = self.pool.held(tokens, image_keys)
        if not held or self._whole_images(tokens[held:], []) is None:  # pads past the state
            return
        cache = self.pool.take(tokens, image_keys, count=False)
        self.preparing = True
        try:
            for start in range(len(cache.tokens), len(tokens), PREPARE_CHUNK):
                piece = tokens[start : start + PREPARE_CHUNK]
                prefill(self.model, cache, piece)
                self.counters.prepared_tokens += len(piece)
                if not self._jobs.empty() or self._stop():  # keep what is done
                    break
            self.pool.put(cache.copy(), shared=True)
        except Exception:  # the state is only an optimisation: lose it, keep serving
            log.exception("preparing a next turn failed")
        finally:
            self.preparing = False
            self._refresh()

    def _count(self, r: GenerationResponse, cached: int) -> None:
        c = self.counters
        c.served += 1
        c.prompt_tokens += r.prompt_tokens
        c.cached_tokens += cached
        c.generated_tokens += r.generation_tokens
        c.drafted += r.drafted
        c.accepted += r.accepted
        if r.drafting is not None:
            pairs = itertools.zip_longest(c.draft_rounds, r.drafting.rounds, fillvalue=0)
            c.draft_rounds = [a + b for a, b in pairs]
            c.drafting = r.drafting

    def _refresh(self) -> None:
        self.gauges = {
            "prompt_cache": {
                "entries": len(self.pool),
                "bytes": self.pool.nbytes,
                "max_bytes": self.pool.max_bytes,
                "hits": self.pool.hits,
                "misses": self.pool.misses,
            },
            "memory": {"active": mx.get_active_memory(), "cache": mx.get_cache_memory()},
        }

    def stats(self) -> dict:
        c = self.counters
        return {
            "requests": {
                "served": c.served,
                "failed": c.failed,
                "cancelled": c.cancelled,
                "rejected": c.rejected,
                "in_flight": self.in_flight,
                "most_in_flight": self.most_in_flight,
                "max_in_flight": self.max_in_flight,
            },
            "busy": self.busy,
            "preparing": self.preparing or bool(self._next_turns),
            "tokens": {
                "prompt": c.prompt_tokens,
                "cached": c.cached_tokens,
                "generated": c.generated_tokens,
                "prepared": c.prepared_tokens,
            },
            "mtp": {
                "enabled": self.mtp,
                "num_draft": self.num_draft,
                "drafted": c.drafted,
                "accepted": c.accepted,
                "acceptance": c.accepted / c.drafted if c.drafted else None,
                "rounds_per_k": c.draft_rounds,
                "last": c.drafting.as_dict() if c.drafting is not None else None,
            },
            **self.gauges,
        }
