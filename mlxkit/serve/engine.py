"""The generation loop: continuous batching of concurrent requests, a bounded queue in front.

MLX work stays on the thread that calls `Engine.run` (the main thread: MLX arrays made on a
worker thread can abort the interpreter at exit), while the HTTP server runs its event loop on
another. They meet in `Job`: the HTTP side puts it on the queue and reads its events; the loop
hands back each GenerationResponse (or a `Failed`) through the event loop's thread-safe call,
and watches `cancelled` between tokens, so a client that goes away stops its generation at the
next token. It watches `stop()` there too: shutting down answers every generation in progress
and every request still waiting with a 503 (`close`), so that each ends with an error its
client can read before the HTTP server goes.

Up to `max_batch` requests are served at once (`Active`). A new one is set up at once
(`start_generation`: a pool state it extends is taken) and its prompt prefilled in pieces of
`PREFILL_PIECE` tokens, one piece between two decode steps of the others, so that running
streams keep flowing while a long prompt arrives. Then it decodes:
- alone, when it is the only one (`Generation.decode`: MTP rounds as `stream_generate` runs
  them), until something else arrives (its decoder's `pause`);
- in a batch step with the others otherwise (`mlxkit.batch`: one token each per pass, plain
  decoding, lossless per sequence), except a seeded sampled request with MTP, which keeps
  decoding alone, a token per step, so that its text is the one its seed gives it served
  alone (its draft schedule decides which random draws it makes).
Whether MTP rounds in a batch would pay, measured on micro on this project's 2-core CPU
(`benchmarks/serve.py --step-ceiling`, results in benchmarks/results/serve.md): a pass of 2
positions per row costs 1.43× a batch step of 4 rows and 1.54× one of 8 (3 positions: 1.95×,
2.24×), so with the drafts' own cost a round of one draft breaks even at best at micro's
acceptance; plain steps are the faster choice here, and drafts per sequence with a shared
verify pass are not built. (Where decoding is bound by memory bandwidth, as on Apple GPUs, a
pass of k+1 positions costs about one step and they would pay.)

When no request is waiting, the loop prepares states for the next turns of the conversations
it has just answered (`prepare`): the prefix the next request will start with, prefilled from
the pool in small chunks and given up at a chunk boundary as soon as a request arrives.

The KV-cache quantization (`mlxkit serve --kv-bits`) is the server's, not a request's: every
state it makes is kept that way, so the pool never holds states of two settings (a state
continues only under the settings it was filled with).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import mlx.core as mx

from mlxkit.batch import Batch, Member
from mlxkit.cache import kv_quantization
from mlxkit.errors import MlxkitError
from mlxkit.generate import (
    Generation,
    GenerationResponse,
    PromptCache,
    prefill,
    start_generation,
)
from mlxkit.response import DraftReport
from mlxkit.serve import MAX_BATCH
from mlxkit.serve.pool import PromptPool
from mlxkit.vision import VisionInput

log = logging.getLogger("mlxkit.serve")
PREPARE_CHUNK = 32  # tokens prefilled between looks at the queue while preparing a next turn
PREFILL_PIECE = 256  # prompt tokens prefilled between two decode steps of running requests
RECENT = 64  # requests whose timings /v1/stats lists


@dataclass
class Failed:
    status: int  # 400: the runtime refused the request; 500: generation broke; 503: shutdown
    message: str


SHUTTING_DOWN = Failed(503, "the server is shutting down; retry later")


@dataclass
class Job:
    tokens: list[int]
    options: dict  # start_generation keyword arguments
    loop: asyncio.AbstractEventLoop
    snapshot_at: int | None = None  # keep a shared snapshot after this many prompt tokens
    images: list[VisionInput] = field(default_factory=list)  # whose pads `tokens` hold
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached: int = 0  # prompt tokens taken from the pool (set before the first event)
    created: float = field(default_factory=time.perf_counter)

    def send(self, event: GenerationResponse | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            self.cancelled.set()


@dataclass(eq=False)
class Active:
    """A request being served: its prompt prefilled, then decoding (`member`), alone through
    `alone` (a `Generation.decode` generator) or in the batch."""

    job: Job
    generation: Generation
    started: float  # taken from the queue
    member: Member | None = None  # set once the prompt is prefilled
    alone: Generator | None = None
    batchable: bool = True  # False: a seeded sampled request with MTP (see the docstring)
    first_at: float | None = None
    last_at: float | None = None
    gaps: list[float] = field(default_factory=list)  # seconds between its tokens

    def timing(self) -> dict:
        return {
            "queue_wait_s": self.started - self.job.created,
            "time_to_first_token_s": None
            if self.first_at is None
            else self.first_at - self.job.created,
            "between_tokens_s": {
                "mean": sum(self.gaps) / len(self.gaps) if self.gaps else None,
                "max": max(self.gaps, default=None),
            },
            "tokens": len(self.gaps) + (self.first_at is not None),
        }


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
    steps_by_batch: dict[int, int] = field(default_factory=dict)  # decode steps per batch size
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_queue: int,
        prompt_cache_bytes: int,
        max_batch: int = MAX_BATCH,
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
        self._kv_options = {  # start_generation's, for every request
            "kv_bits": kv_bits,
            "kv_group_size": kv_group_size,
            "quantized_kv_start": quantized_kv_start,
        }
        self.max_batch = max_batch
        self.max_in_flight = max_batch + max_queue
        self.pool = PromptPool(prompt_cache_bytes)
        self.counters = Counters()
        self.in_flight = 0  # admitted and not yet answered: queued or generating
        self.most_in_flight = 0
        self.busy = False  # a request is being served
        self.preparing = False  # a next turn's state is being prefilled
        self.gauges: dict = {}  # memory and pool figures, refreshed by the loop (MLX thread)
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._active: list[Active] = []
        self._batch = Batch(model)
        self._next_turns: collections.deque[tuple[list[int], list[str]]] = collections.deque(
            maxlen=8
        )
        self._lock = threading.Lock()
        self._closed = False  # shutting down: jobs are refused, not queued
        self._stop: Callable[[], bool] = lambda: False  # set by run()
        self._seconds_per_job = 1.0  # moving average, for Retry-After

    # ------------------------------------------------------------------ HTTP side (any thread)

    def admit(self) -> bool:
        """Takes a place (in the batch or the queue); False when they are all taken."""
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
        """Serves jobs until `stop()` is true (read between steps and between tokens); frees
        MLX's buffer cache when idle. Then `close()`."""
        self._stop = stop
        self._refresh()
        while not stop():
            self._take_jobs()
            if not self._active:
                self.busy = False
                self._idle()
                continue
            self.busy = True
            self._drop_cancelled()
            prefilling = [a for a in self._active if a.member is None]
            if prefilling:
                self._prefill(prefilling[0])
            self._step()
        for a in list(self._active):  # shutting down: every request in progress gets its 503
            self._end(a, SHUTTING_DOWN)
        self.busy = False

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

    def _idle(self) -> None:
        """Waits a little for a job; meanwhile prepares a next turn or frees MLX's cache."""
        if self._next_turns:
            self._prepare(*self._next_turns.popleft())
            return
        if mx.get_cache_memory():
            mx.clear_cache()
            self._refresh()
        try:
            self._start(self._jobs.get(timeout=0.1))
        except queue.Empty:
            pass

    def _take_jobs(self) -> None:
        """Starts queued jobs while there are places in the batch."""
        while len(self._active) < self.max_batch:
            try:
                self._start(self._jobs.get_nowait())
            except queue.Empty:
                return

    def _start(self, job: Job) -> None:
        """Sets job's generation up (from a pool state its prompt extends) to be prefilled."""
        if job.cancelled.is_set():
            self.counters.cancelled += 1
            return
        started = time.perf_counter()
        cache = self.pool.take(job.tokens, [v.key for v in job.images]) or self.new_cache()
        job.cached = len(cache.tokens)
        try:
            generation = start_generation(
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
        except Exception as e:  # noqa: BLE001 - _fail logs what is not a refusal
            self._fail(job, e)
            return
        seeded = job.options.get("seed") is not None
        batchable = not (generation.control and seeded and not generation.options.params.greedy)
        self._active.append(Active(job, generation, started, batchable=batchable))

    def _drop_cancelled(self) -> None:
        for a in [a for a in self._active if a.job.cancelled.is_set()]:
            self.counters.cancelled += 1
            self._leave(a)

    def _prefill(self, a: Active) -> None:
        """One piece of a's prompt, or all the rest when nothing else is decoding (then, or
        at its last piece, the first token: a is ready to decode)."""
        g, job = a.generation, a.job
        try:
            done, remaining = len(g.cache.tokens), len(g.remaining)
            snapshot = self._snapshot_point(job, g)
            others = any(b.member is not None for b in self._active)
            n = min(PREFILL_PIECE, remaining - 1) if others else 0  # 0: the rest at once
            if snapshot is not None:
                n = min(n, snapshot - done) if n else snapshot - done
            if n > 0 and g.images_within(n) is not None:
                g.prefill_part(n)
                if len(g.cache.tokens) == snapshot:
                    self.pool.put(g.cache.copy(), shared=True)
                return
            a.member = Member(g, g.finish_prefill())
            self._refresh()
            if a.batchable:  # (given the job, not `a`: no reference cycle to keep states alive)
                g.decoder.pause = functools.partial(self._wanted, job)
            else:  # never paused: it decodes alone to its end
                a.alone = g.decode(a.member.y)
        except Exception as e:  # noqa: BLE001 - _fail logs what is not a refusal
            self._active.remove(a)
            self._fail(job, e)

    def _snapshot_point(self, job: Job, g: Generation) -> int | None:
        """Where to keep a shared snapshot of job's prompt (`job.snapshot_at`) if it is still
        ahead and can be kept (not inside an image's pads: a state holds whole images)."""
        at, done = job.snapshot_at, len(g.cache.tokens)
        context = self.model.config.max_position_embeddings
        if at is None or not done < at < len(job.tokens) < context or not self.pool.max_bytes:
            return None
        return at if g.images_within(at - done) is not None else None

    def _wanted(self, job: Job) -> bool:
        """Whether job's request, decoding alone, must come back: others to serve, or it must
        stop."""
        return (
            len(self._active) > 1
            or not self._jobs.empty()
            or job.cancelled.is_set()
            or self._stop()
        )

    def _step(self) -> None:
        """A token (or an MTP round's tokens, one at a time) for every decoding request."""
        decoding = [a for a in self._active if a.member is not None]
        batched = [a for a in decoding if a.batchable and a.alone is None]
        if len(batched) == 1 and not self._wanted(batched[0].job):
            a = batched[0]
            self._batch.release()  # its states back in its own cache
            a.member.settle()
            batched = []
            try:
                a.alone = a.generation.decode(a.member.next_token())
            except MlxkitError as e:  # the last batch step's logits broke
                self._leave(a)
                self._fail(a.job, e)
        for a in [a for a in decoding if a.alone is not None]:
            self._advance_alone(a)
        if batched:
            self._batch.set_members([a.member for a in batched])
            self.counters.steps_by_batch[len(batched)] = (
                self.counters.steps_by_batch.get(len(batched), 0) + 1
            )
            try:
                results = self._batch.step()
            except Exception as e:  # noqa: BLE001 - a broken step: its members' states are lost
                self._batch = Batch(self.model)
                for a in batched:
                    self._active.remove(a)
                    self._fail(a.job, e)
                return
            for a, r in zip(batched, results):
                if isinstance(r, MlxkitError):
                    self._leave(a)
                    self._fail(a.job, r)
                else:
                    self._emit(a, r)

    def _advance_alone(self, a: Active) -> None:
        try:
            r = next(a.alone)
        except StopIteration as paused:  # back to the batch, from the token it returned
            a.alone, a.member.y = None, paused.value
            return
        except Exception as e:  # noqa: BLE001 - _fail logs what is not a refusal
            a.alone = None
            self._active.remove(a)
            self._fail(a.job, e)
            return
        self._emit(a, r)

    def _emit(self, a: Active, r: GenerationResponse) -> None:
        now = time.perf_counter()
        if a.first_at is None:
            a.first_at = now
        else:
            a.gaps.append(now - a.last_at)
        a.last_at = now
        if r.finish_reason is not None:  # counted before the client can see it
            self._count(r, a.job.cached)
        a.job.send(r)
        if r.finish_reason is not None:
            self._leave(a, keep=True)

    def _leave(self, a: Active, keep: bool = False) -> None:
        """a stops being served; `keep`: it finished, and its state goes to the pool."""
        self._active.remove(a)
        if a.alone is not None:
            a.alone.close()
            a.alone = None
        if a.member is not None and a.member in self._batch.members:
            self._batch.release()
        self.counters.recent.append(a.timing())
        seconds = time.perf_counter() - a.started
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * seconds
        if keep:  # kept compact: the live state may pin buffers of its last verify pass
            a.member.settle()
            self.pool.put(a.generation.cache.copy())
        self._refresh()

    def _end(self, a: Active, event: Failed) -> None:
        self.counters.cancelled += 1
        a.job.send(event)
        self._leave(a)

    def _fail(self, job: Job, e: Exception) -> None:
        self.counters.failed += 1
        if isinstance(e, MlxkitError):
            job.send(Failed(400, str(e)))
            return
        # a broken generation must not take the server down
        log.error("generation failed", exc_info=e)
        job.send(Failed(500, f"generation failed: {type(e).__name__}: {e}"))

    def _prepare(self, tokens: list[int], image_keys: list[str]) -> None:
        if not self.pool.max_bytes or len(tokens) >= self.model.config.max_position_embeddings:
            return
        held = self.pool.held(tokens, image_keys)
        vt = self.model.vision_tokens
        pads = (vt.image, vt.video) if self.model.has_vision else ()
        if not held or any(t in pads for t in tokens[held:]):  # pads past the state
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
            "batch": {
                "decoding": sum(a.member is not None for a in self._active),
                "prefilling": sum(a.member is None for a in self._active),
                "max_batch": self.max_batch,
                "steps_by_size": dict(sorted(self.counters.steps_by_batch.items())),
            },
            "recent_requests": list(self.counters.recent),  # queue wait, first token, gaps
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
