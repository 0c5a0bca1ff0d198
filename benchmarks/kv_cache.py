"""Decoding on a quantized KV cache: tokens/s at 1K and 32K tokens of context with the cache
in 16, 8 and 4 bits (ratio to 16 bits), the KL each costs, and MLX's peak memory, on micro
(MLX's CPU backend here). Prints a markdown report.

    python benchmarks/kv_cache.py --repeats 3

Per context, the prompt (held-out code, repeated) is prefilled once, by micro in float32 (MLX's
CPU backend has no fast bfloat16 matmul: a bfloat16 prefill of 16K tokens took 447 s here, a
float32 one 167 s), and the state is cast to bfloat16, micro's dtype, which everything after
runs in. Each setting then decodes from a copy of that state quantized as a whole, as
`quantized_kv_start` converts a cache once it holds that many positions (the layout decoding
reads is then the one a cache quantized from its first token has). A run processes the prompt's last TAIL tokens and
decodes NEW greedily, plainly (no MTP: one main-model pass per token, so the rate is the
cache's read cost and not the drafter's acceptance); tokens/s counts from the first generated
token to the last. Runs go round-robin over the settings (the shared machine's speed drifts),
medians with min–max, and the ratio is the median of the per-repeat ratios.

KL(16-bit ‖ quantized), nats per token, of the next-token distributions at the TAIL positions
after the prefilled state: the same quantized copies ("as a whole"), and at 1K also caches
quantized from the first token through a bfloat16 prefill (every prefill position then
already attends over quantized keys: `quantized_kv_start=0`, the runtime's default) against a
bfloat16 16-bit prefill.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import mlx.core as mx
import numpy as np
from machine import machine

import mlxkit
from mlxkit.cache import KVCache, KVQuantization, kv_quantization
from mlxkit.generate import PromptCache, prefill, stream_generate
from mlxkit.load import load_model
from mlxkit.quality import EVAL_DIR, read_text

GROUP = 32  # micro's head dim: the only group size it takes
CONTEXTS = (1024, 32704)  # 32K less room for the decoded tokens within micro's 32,768 positions
TAIL = 64
NEW = 32
CHUNK = 512
TEXT = EVAL_DIR / "code_json_decoder.txt"


def prompt(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(read_text(TEXT))
    return (ids * (n // len(ids) + 1))[:n]


def prefilled(model32, model, tokens: list[int]) -> PromptCache:
    """`model`'s (bfloat16) state after `tokens`, prefilled by `model32` (the same weights in
    float32) and cast: KV caches and conv windows to bfloat16, the recurrent state stays
    float32 as the model keeps it."""
    state32 = PromptCache.new(model32)
    state32.mtp = None
    prefill(model32, state32, tokens, prefill_chunk=CHUNK)
    state = PromptCache.new(model)
    state.mtp = None
    for dst, src in zip(state.main, state32.main):
        dst.state = {
            k: v if k in ("recurrent_state", "offset") else v.astype(mx.bfloat16)
            for k, v in src.state.items()
        }
    state.tokens = list(state32.tokens)
    return state


def quantized_copy(state: PromptCache, kv: KVQuantization | None) -> PromptCache:
    """A copy of a 16-bit state whose KV caches quantize themselves as a whole at their next
    pass (KVCache quantizes a full-precision buffer once it holds `kv.start` positions)."""
    cache = state.copy()
    if kv is not None:
        cache.kv = kv
        for c in cache.main + (cache.mtp or []):
            if isinstance(c, KVCache):
                c.quantization = kv
    return cache


def tail_log_probs(model, cache: PromptCache, tail: list[int]) -> np.ndarray:
    """[TAIL, vocab] float64 next-token log-probabilities of `tail` after `cache`."""
    logits = model(mx.array([tail]), cache.main).astype(mx.float32)
    x = np.asarray(logits[0], dtype=np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def decode(model, tokenizer, tokens: list[int], state: PromptCache, kv) -> tuple[float, int, int]:
    """Tokens/s from the first generated token to the last, MLX's peak beyond what was
    allocated before (the model and the states kept for the other runs: so the run's cache
    and activations), and the bytes the main model's KV caches hold after it."""
    mx.clear_cache()
    base = mx.get_active_memory()
    cache = quantized_copy(state, kv)
    options = {"kv_bits": None} if kv is None else {"kv_bits": kv.bits, "kv_group_size": GROUP}
    stream = stream_generate(
        model, tokenizer, tokens, max_tokens=NEW, mtp=False, prompt_cache=cache, **options
    )
    n, t_first, last = 0, None, None
    for last in stream:
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
    tps = (n - 1) / (time.perf_counter() - t_first)
    kv_bytes = sum(c.nbytes for c in cache.main if isinstance(c, KVCache))
    return tps, last.peak_memory - base, kv_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    info = machine()
    model, tokenizer = mlxkit.load("micro")
    model32 = load_model("micro", dtype=mx.float32)
    settings = {16: None, 8: kv_quantization(8, GROUP), 4: kv_quantization(4, GROUP)}
    prompts, states, prefill_s = {}, {}, {}
    for n in args.contexts:
        prompts[n] = prompt(tokenizer, n)
        t0 = time.perf_counter()
        states[n] = prefilled(model32, model, prompts[n][:-TAIL])
        prefill_s[n] = time.perf_counter() - t0
    del model32
    rows = []
    for n in args.contexts:
        tokens, state = prompts[n], states[n]
        reference = tail_log_probs(model, state.copy(), tokens[-TAIL:])
        kls = {
            b: kl(reference, tail_log_probs(model, quantized_copy(state, kv), tokens[-TAIL:]))
            for b, kv in settings.items()
            if kv is not None
        }
        from_start = {}
        if n <= 4096:  # a bfloat16 prefill is slow on this CPU past a few K tokens
            caches = {b: PromptCache.new(model, kv) for b, kv in settings.items()}
            for cache in caches.values():
                prefill(model, cache, tokens[:-TAIL], prefill_chunk=CHUNK)
            direct = tail_log_probs(model, caches[16], tokens[-TAIL:])
            for b in (8, 4):
                from_start[b] = kl(direct, tail_log_probs(model, caches[b], tokens[-TAIL:]))
        speeds: dict[int, list[float]] = {b: [] for b in settings}
        peaks: dict[int, int] = {}
        kv_bytes: dict[int, int] = {}
        for _ in range(args.repeats):
            for b, kv in settings.items():
                tps, peak, nbytes = decode(model, tokenizer, tokens, state, kv)
                speeds[b].append(tps)
                peaks[b], kv_bytes[b] = max(peaks.get(b, 0), peak), nbytes
        for b in settings:
            ratios = [s / s16 for s, s16 in zip(speeds[b], speeds[16])]
            rows.append(
                (
                    n,
                    b,
                    speeds[b],
                    statistics.median(ratios),
                    kls.get(b),
                    from_start.get(b),
                    peaks[b],
                    kv_bytes[b],
                    prefill_s[n],
                )
            )
    print(report(started, info, args.repeats, rows))


def report(started, info: dict, repeats: int, rows: list) -> str:
    lines = [
        "# KV cache benchmark: decoding on a 16-, 8- and 4-bit cache (micro, MLX CPU backend)",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC: `python benchmarks/kv_cache.py --repeats {repeats}`.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        "",
        (
            "| context | cache | decode tokens/s min | median | max | × 16-bit | KL as a whole "
            "| KL from the first token | MLX peak beyond the model | KV cache bytes |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, b, speeds, ratio, k, k0, peak, kv_bytes, _ in rows:
        lines.append(
            f"| {n:,} | {b}-bit | {min(speeds):.1f} | {statistics.median(speeds):.1f} | "
            f"{max(speeds):.1f} | {ratio:.2f} | {'–' if k is None else f'{k:.6f}'} | "
            f"{'–' if k0 is None else f'{k0:.6f}'} | {peak / 2**20:.1f} MiB | "
            f"{kv_bytes / 2**20:.2f} MiB |"
        )
    prefills = {n: s for n, *_, s in rows}
    lines += [
        "",
        "float32 prefill of the prompt (chunk 512, one run): "
        + ", ".join(
            f"{n:,} tokens {s:.1f} s ({s / n * 1024:.2f} s per 1K)" for n, s in prefills.items()
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
