"""Decode speed: mlxkit plain, MTP (k = 1, 2, 3) and MTP with num_draft="auto" against mlx-lm
and mlx-vlm's MTP path, on the same checkpoint in one run. Prints a markdown table (min / median / max tokens/s over the
repeats, MTP acceptance, ratios to mlx-lm and to plain mlxkit decoding) and what the pieces of
an MTP round cost, with the best speedup they allow.

    python benchmarks/decode.py --model tests/fixtures/tiny_untied --model micro

Each checkpoint is first converted with `mlxkit convert` (4-bit by default, `--no-quantize`
for bf16) into a temporary directory, and every engine loads that same directory: mlx-lm and
mlxkit read the MLX layout, mlx-vlm reads it plus the MTP drafter in its `mtp/`.
Tokens/s is measured the same way for every engine: from the first generated token to the
last, so prompt processing is excluded. Greedy decoding throughout. The auto row is also given
against the best of mlxkit plain and k = 1, 2, 3 within each repeat, with the rounds it chose.

    python benchmarks/decode.py --model micro --mlxkit-only --no-pieces   # the auto question only
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import mlx.core as mx
from machine import machine
from mlx_vlm_mtp import mlx_vlm_mtp_generator
from mlxkit.convert import convert

from mlxkit.load import resolve_model_dir

PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n\ndef main(argv):\n    ",
    "class Stack:\n    def __init__(self):\n        ",
]


def timed(stream: Iterable) -> tuple[int, float, object]:
    """Tokens after the first, the seconds they took, and the last item of the stream."""
    n, t_first, last = 0, None, None
    for last in stream:
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
    return n - 1, time.perf_counter() - t_first, last


def over_prompts(one: Callable[[str], tuple[int, float, int, int, tuple | None]]):
    """A run: every prompt once; tokens/s over all of them, total tokens, acceptance, and the
    rounds per k an mlxkit MTP run made (None for the others)."""

    def run():
        n = seconds = drafted = accepted = 0
        rounds = None
        for prompt in PROMPTS:
            dn, ds, dd, da, dr = one(prompt)
            n, seconds, drafted, accepted = n + dn, seconds + ds, drafted + dd, accepted + da
            if dr is not None:
                rounds = dr if rounds is None else tuple(a + b for a, b in zip(rounds, dr))
        return n / seconds, n + len(PROMPTS), accepted / drafted if drafted else None, rounds

    return run


def bench_mlxkit(path: str, max_tokens: int, mtp: bool, k: int | str, deterministic=False):
    """mlxkit greedy; k = "auto" keeps one model object, so auto learns from the warm-up and
    each repeat as it would in a long-running process (`deterministic`: from the cost table
    or the default shape, never the clock)."""
    import mlxkit

    model, tokenizer = mlxkit.load(path)

    def one(prompt: str):
        stream = mlxkit.stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=max_tokens,
            mtp=mtp,
            num_draft=k,
            deterministic=deterministic,
        )
        n, seconds, last = timed(stream)
        rounds = last.drafting.rounds if last.drafting is not None else None
        return n, seconds, last.drafted, last.accepted, rounds

    return over_prompts(one)


def bench_mlx_lm(path: str, max_tokens: int):
    from mlx_lm import load, stream_generate

    model, tokenizer = load(path)

    def one(prompt: str):
        n, seconds, _ = timed(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))
        return n, seconds, 0, 0, None

    return over_prompts(one)


def bench_mlx_vlm_mtp(path: str, max_tokens: int, k: int):
    """mlx-vlm's speculative path with our converter's MTP drafter (`OUT/mtp`)."""
    stream = mlx_vlm_mtp_generator(path, max_tokens, k)

    def one(prompt: str):
        counts = {}
        n, seconds, _ = timed(stream(prompt, counts))
        return n, seconds, counts["drafted"], counts["accepted"], None

    return over_prompts(one)


def round_costs(path: str, repeats: int = 60) -> dict:
    """Milliseconds of the pieces of an MTP round: main-model passes over 1..4 tokens (keys 1..4;
    1 = a plain decode step), one draft step ("draft"), the lm_head ("lm_head"). Each call is timed alone with a forced
    eval; the pieces take turns and the median is kept, as the machine's speed drifts."""
    import mlxkit

    model, tokenizer = mlxkit.load(path)
    tokens = mx.array([tokenizer.encode(PROMPTS[0])])
    cache = model.make_cache()
    hidden = model.hidden(tokens, cache)
    mx.eval(hidden)
    h1, one = hidden[:, -1:], tokens[:, -1:]

    def main_pass(n: int):
        def f():
            c = [type(ci)() for ci in cache]  # fresh caches: same work as a step at offset 0
            for ci in c if n > 1 else []:
                ci.begin_verify()  # a verify pass records the linear states
            return model(mx.concatenate([one] * n, axis=1), c)

        return f

    pieces = {n: main_pass(n) for n in (1, 2, 3, 4)}
    pieces["draft"] = lambda: model.mtp_forward(h1, one, model.make_mtp_cache())[0].argmax(-1)
    pieces["lm_head"] = lambda: model.logits(h1)
    times = {name: [] for name in pieces}
    for i in range(repeats + 3):
        for name, fn in pieces.items():
            t = time.perf_counter()
            mx.eval(fn())
            if i >= 3:  # the first calls compile
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def round_report(costs: dict) -> list[str]:
    """The pieces, and the speedup MTP could reach if every draft were accepted and accepting
    cost nothing: (k+1) tokens for one (k+1)-token pass plus k draft steps, against k+1 steps."""
    step = costs[1]
    lines = [
        (
            f"Pieces of an MTP round, timed alone: a plain decode step (1 token) {step:.2f} ms; "
            f"one draft step (MTP layer, lm_head, argmax) {costs['draft']:.2f} ms, of which the "
            f"lm_head {costs['lm_head']:.2f} ms."
        ),
        "",
        (
            "| k | verify pass over k+1 tokens | × a decode step | + k draft steps | "
            "best possible MTP ÷ plain (all drafts accepted) |"
        ),
        "|---|---|---|---|---|",
    ]
    for k in (1, 2, 3):
        verify = costs[k + 1]
        round_ms = verify + k * costs["draft"]
        lines.append(
            f"| {k} | {verify:.2f} ms | {verify / step:.2f} | {round_ms:.2f} ms "
            f"| {(k + 1) * step / round_ms:.2f} |"
        )
    return lines


AUTO = "mlxkit MTP auto"
AUTO_FIXED = "mlxkit MTP auto, deterministic"
FIXED = ["mlxkit plain", "mlxkit MTP k=1", "mlxkit MTP k=2", "mlxkit MTP k=3"]


def auto_report(results: dict) -> list[str]:
    """Each auto row against the best fixed choice of the same repeat (which one is best can
    change from repeat to repeat), and the rounds per k it chose over all repeats."""
    lines = []
    for name in (AUTO, AUTO_FIXED):
        ratios = sorted(
            auto[0] / max(results[fixed][i][0] for fixed in FIXED)
            for i, auto in enumerate(results[name])
        )
        total = [sum(col) for col in zip(*(r[3] for r in results[name]))]
        chosen = ", ".join(f"k={k} {n}" for k, n in enumerate(total) if n)
        lines += [
            (
                f"{name} ÷ the best of mlxkit plain and k = 1, 2, 3 in the same repeat: median "
                f"{statistics.median(ratios):.2f} (min {ratios[0]:.2f}, max {ratios[-1]:.2f}); "
                f"rounds it chose over the {len(results[name])} repeats: {chosen}."
            ),
            "",
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", action="append", required=True, help="model dir or 'micro' (repeatable)"
    )
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--no-quantize", action="store_true", help="keep every weight in --dtype")
    ap.add_argument("--dtype", default="bfloat16", help="what is not quantized (convert --dtype)")
    ap.add_argument("--out", help="write the markdown report here too")
    ap.add_argument(
        "--mlxkit-only", action="store_true", help="only mlxkit plain, k = 1, 2, 3 and auto"
    )
    ap.add_argument("--no-pieces", action="store_true", help="skip timing the round's pieces")
    ap.add_argument(
        "--draft-vocab",
        type=int,
        help="convert with a shortlist draft head of N tokens (convert --draft-vocab)",
    )
    args = ap.parse_args()

    report = ["Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()), ""]
    for source in args.model:
        tmp = tempfile.TemporaryDirectory()
        path = str(Path(tmp.name) / "converted")
        convert(
            resolve_model_dir(source),
            path,
            bits=None if args.no_quantize else args.bits,
            quantize=not args.no_quantize,
            dtype=args.dtype,
            draft_vocab=args.draft_vocab,
            quiet=True,
        )
        engines = []
        if not args.mlxkit_only:
            engines.append(("mlx-lm stream_generate", bench_mlx_lm(path, args.max_tokens)))
        engines.append(("mlxkit plain", bench_mlxkit(path, args.max_tokens, False, 1)))
        for k in (1, 2, 3):
            engines.append((f"mlxkit MTP k={k}", bench_mlxkit(path, args.max_tokens, True, k)))
        engines.append((AUTO, bench_mlxkit(path, args.max_tokens, True, "auto")))
        engines.append((AUTO_FIXED, bench_mlxkit(path, args.max_tokens, True, "auto", True)))
        if not args.mlxkit_only:
            for k in (1, 2):
                engines.append((f"mlx-vlm MTP k={k}", bench_mlx_vlm_mtp(path, args.max_tokens, k)))
        for _, run in engines:
            run()  # warm-up: compile caches, first-touch of weights
        # Repeats go round-robin over the engines, so a machine that slows down or speeds up
        # during the run (shared CPUs do) shifts every engine alike; each repeat starts one
        # engine further on, so that no engine always runs right after the same other one.
        results = {name: [] for name, _ in engines}
        for i in range(args.repeats):
            for name, run in engines[i % len(engines) :] + engines[: i % len(engines)]:
                results[name].append(run())
        plain = results["mlxkit plain"]
        base = results.get("mlx-lm stream_generate")

        def ratio(runs: list, to: list) -> float:
            """Median over repeats of the ratio within each repeat (robust to drift)."""
            return statistics.median(r[0] / b[0] for r, b in zip(runs, to))

        weights = args.dtype if args.no_quantize else f"{args.bits}-bit"
        if args.draft_vocab:
            weights += f", drafting over a shortlist of {args.draft_vocab:,} tokens"
        report += [
            (
                f"### {source}, converted to {weights} ({len(PROMPTS)} prompts × {args.max_tokens} "
                f"new tokens max, {args.repeats} repeats, greedy)"
            ),
            "",
            "| engine | tokens/s min | median | max | tokens | acceptance | × mlx-lm | × mlxkit plain |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, runs in results.items():
            tps = sorted(r[0] for r in runs)
            n, acc = runs[-1][1], runs[-1][2]
            acc_s = f"{acc:.1%}" if acc is not None else "–"
            to_base = f"{ratio(runs, base):.2f}" if base else "–"
            report.append(
                f"| {name} | {tps[0]:.1f} | {statistics.median(tps):.1f} | {tps[-1]:.1f} | {n} "
                f"| {acc_s} | {to_base} | {ratio(runs, plain):.2f} |"
            )
        report += ["", *auto_report(results)]
        if not args.no_pieces:
            report += [*round_report(round_costs(path)), ""]
        tmp.cleanup()
    report.append("Load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
