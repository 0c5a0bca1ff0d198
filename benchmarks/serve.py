"""Serving speed: `mlxkit serve` (MTP on, and off) against `mlx_lm.server` on the same converted
directory in one run, over HTTP as clients see it (optionally also `mlxkit serve` as it was at
an earlier git revision, `--baseline-rev`, run from a worktree). Prints a markdown table of
medians over the repeats with ratios to mlx_lm.server:

- second-turn time to first token: a chat with a long system prompt; the second turn sends the
  first turn's answer back with a new question (each server gets its own first answer) after
  `--pause` seconds (the user reading and typing), and the clock runs from sending the request
  to the first generated text;
- single-client tokens/s: streamed chat answers to three questions, one after another, from
  each answer's first token to its last;
- aggregate tokens/s with N clients at once (`--clients 4 8`): all tokens over the wall time;
- a long prompt arriving mid-stream: one answer streams; after its 10th chunk a request with a
  `--long-prompt`-token prompt arrives; reported are the running stream's longest gap between
  two chunks while that prompt is served, its median gap before, and the long request's time
  to first token.

- the ceiling of batching (`--step-ceiling`, before the servers start): in this process, with
  no HTTP, the tokens/s of batch steps of 1 and of each `--clients` count on the same directory:
  mlxkit's `Batch.step` against mlx-lm's `BatchGenerator` (what mlx_lm.server runs), taking
  turns. No server can stream more than its batch step makes, so this bounds what batching can
  reach over HTTP on this machine.

    python benchmarks/serve.py --model micro --no-quantize --baseline-rev 8ad0ea2 --step-ceiling

The model is converted with `mlxkit convert` (4-bit by default, `--no-quantize` for bf16)
into a temporary directory that every server loads. Greedy decoding, thinking off. The
servers run side by side; only one is measured at a time, interleaved per repeat.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from machine import machine
from mlxkit.convert import convert

from mlxkit.load import resolve_model_dir

SYSTEM = (
    "You are a careful Python programmer. Here is the module we are working on:\n\n"
    + (Path(__file__).resolve().parent / "decode.py").read_text()[:3000]
)
QUESTIONS = [
    "def parse_args(argv):\n    ",
    "class Cache:\n    def __init__(self):\n        ",
    "def main():\n    ",
]
NO_THINK = {"enable_thinking": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engine:
    """A server process and how to talk to it."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None) -> None:
        self.name, self.port = name, port
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        deadline = time.monotonic() + 300
        while True:
            try:
                if self._get("/v1/models")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.2)

    def _get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()

    def chat(
        self, messages: list[dict], max_tokens: int, on_chunk: Callable[[], None] = lambda: None
    ) -> dict:
        """One streamed chat completion: text, seconds to the first text, seconds from the first
        text to the last, completion tokens (from the usage the server reports). `on_chunk` is
        called as each chunk with choices arrives (not the usage chunk)."""
        body = {
            "model": "default_model",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": NO_THINK,
        }
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        r = conn.getresponse()
        assert r.status == 200, r.read()
        text, first, last, tokens = "", None, None, 0
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices"):
                on_chunk()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                piece = "".join(
                    delta.get(k) or "" for k in ("content", "reasoning_content", "reasoning")
                )
                if piece:
                    text += piece
                    last = time.perf_counter()
                    first = first or last
        conn.close()
        if first is None:  # no text at all (an end token first): the answer's end
            first = last = time.perf_counter()
        return {"text": text, "ttft": first - t0, "decode_s": last - first, "tokens": tokens}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def second_turn_ttft(engine: Engine, question: str, tokens: int, pause: float) -> float:
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    answer = engine.chat(first, tokens)["text"]
    time.sleep(pause)
    second = [
        *first,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "def test():\n    "},
    ]
    return engine.chat(second, 8)["ttft"]


def single_tps(engine: Engine, tag: str, tokens: int) -> float:
    """Over one answer to each question: tokens after the first / the time they took."""
    runs = [engine.chat([{"role": "user", "content": f"{tag}{q}"}], tokens) for q in QUESTIONS]
    return sum(r["tokens"] - 1 for r in runs) / sum(r["decode_s"] for r in runs)


def long_prompt_arrival(engine: Engine, prompt_tokens: int, tokens: int, tag: str) -> dict:
    """The running stream's gaps around a long prompt's arrival (see the module docstring);
    `tag` starts the long prompt, so that no server has it cached from an earlier repeat."""
    chunks: list[float] = []
    sent = threading.Event()

    def arrived() -> None:
        chunks.append(time.perf_counter())
        if len(chunks) == 10:
            sent.set()

    question = [{"role": "user", "content": QUESTIONS[0]}]
    thread = threading.Thread(target=engine.chat, args=(question, tokens, arrived))
    thread.start()
    sent.wait(300)
    code = (Path(__file__).resolve().parent / "decode.py").read_text()
    long_text = tag + (code * (prompt_tokens // 1000 + 2))[: prompt_tokens * 3]  # ~3 chars/token
    t0 = time.perf_counter()
    r = engine.chat([{"role": "user", "content": long_text}], 8)
    done = time.perf_counter()
    thread.join()
    before = [b - a for a, b in itertools.pairwise(chunks) if b <= t0]
    during = [b - a for a, b in itertools.pairwise(chunks) if t0 < b and a < done]
    return {
        "gap_before": statistics.median(before),
        "gap_during": max(during, default=float("nan")),
        "long_ttft": r["ttft"],
    }


def aggregate_tps(engine: Engine, clients: int, tokens: int) -> float:
    results = [None] * clients

    def one(i: int) -> None:
        question = f"# client {i}\n{QUESTIONS[i % len(QUESTIONS)]}"
        results[i] = engine.chat([{"role": "user", "content": question}], tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(r["tokens"] for r in results) / (time.perf_counter() - t0)


def batch_step_tps(directory: Path, sizes: list[int], repeats: int, steps: int = 60) -> dict:
    """{(engine, batch size): [tokens/s of each repeat]}: `steps` decode steps of a batch of
    greedy sequences (after 20 unmeasured ones), mlxkit's and mlx-lm's taking turns."""
    import mlx_lm
    from mlx_lm.generate import BatchGenerator

    import mlxkit
    from mlxkit.batch import Batch, Member
    from mlxkit.generate import start_generation

    ours, tok = mlxkit.load(str(directory))
    theirs, their_tok = mlx_lm.load(str(directory))
    prompts = [f"# sequence {i}\n{QUESTIONS[i % len(QUESTIONS)]}" for i in range(max(sizes))]
    budget = 20 + steps + 1

    def mlxkit_tps(n: int) -> float:
        gens = [
            start_generation(ours, tok, p, max_tokens=budget, temperature=0.0, mtp=False)
            for p in prompts[:n]
        ]
        batch = Batch(ours)
        batch.set_members([Member(g, g.finish_prefill()) for g in gens])
        for _ in range(20):
            batch.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            _ = [r.text for r in batch.step()]  # what a server reads of each
        return n * steps / (time.perf_counter() - t0)

    def mlx_lm_tps(n: int) -> float:
        gen = BatchGenerator(theirs, max_tokens=budget, stop_tokens=[])
        gen.insert([their_tok.encode(p) for p in prompts[:n]], max_tokens=[budget] * n)
        done = 0
        while done < 20:  # prefill, then unmeasured steps
            done += bool(gen.next_generated())
        t0 = time.perf_counter()
        for _ in range(steps):
            while not gen.next_generated():
                pass
        tps = n * steps / (time.perf_counter() - t0)
        gen.close()
        return tps

    out: dict = {}
    for _ in range(repeats):
        for n in sizes:
            for name, fn in (
                ("mlxkit Batch.step", mlxkit_tps),
                ("mlx-lm BatchGenerator", mlx_lm_tps),
            ):
                out.setdefault((name, n), []).append(fn(n))
    return out


def verify_cost_table(directory: Path, sizes: list[int], repeats: int) -> list[str]:
    """What MTP rounds in a batch would cost: one pass of B rows × (k+1) positions (a shared
    verify pass) against a batch step (k = 0), the ks taking turns, each row 96 tokens in."""
    import mlxkit
    from mlxkit.cache import LinearAttentionCache
    from mlxkit.models.qwen3_5 import Rotary

    model, _ = mlxkit.load(str(directory))
    lines = [
        (
            "A pass of k+1 positions per row (a shared verify pass of k drafts) ÷ a batch "
            "step, median of 20 × repeats:"
        ),
        "",
        "| batch | k = 1 | k = 2 | k = 3 | batch step (ms) |",
        "|---|---|---|---|---|",
    ]
    for n in sizes:
        caches = model.make_cache()
        context = mx.random.randint(0, 2000, (n, 96), key=mx.random.key(0))
        mx.eval(model.hidden(context, caches, Rotary.text()), *[c.state for c in caches])
        linear = {i: c.state for i, c in enumerate(caches) if isinstance(c, LinearAttentionCache)}
        times: dict[int, list[float]] = {t: [] for t in (1, 2, 3, 4)}
        for _ in range(20 * repeats):
            for t, spent in times.items():
                x = mx.zeros((n, t), dtype=mx.int32)
                t0 = time.perf_counter()
                logits, hidden = model.logits_and_hidden(x, caches, Rotary.text())
                mx.eval(logits.argmax(-1), hidden)
                spent.append(time.perf_counter() - t0)
                for i, c in enumerate(caches):  # back to the context
                    if i in linear:
                        c.state = linear[i]
                    else:
                        c.trim(t)
        m = {t: statistics.median(v) for t, v in times.items()}
        cells = " | ".join(f"{m[t] / m[1]:.2f}×" for t in (2, 3, 4))
        lines.append(f"| {n} | {cells} | {m[1] * 1e3:.2f} |")
    return lines


def ceiling_table(runs: dict, sizes: list[int]) -> list[str]:
    names = list(dict.fromkeys(name for name, _ in runs))
    lines = [
        (
            "Batch steps in one process, no HTTP (tokens/s, median (min–max) of the repeats, "
            "greedy, the same directory):"
        ),
        "",
        "| engine | " + " | ".join(f"batch of {n}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in names:
        cells = [runs[(name, n)] for n in sizes]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{statistics.median(v):.0f} ({min(v):.0f}–{max(v):.0f})" for v in cells)
            + " |"
        )
    ratios = [
        statistics.median(a / b for a, b in zip(runs[(names[0], n)], runs[(names[1], n)]))
        for n in sizes
    ]
    lines.append(
        f"| {names[0]} ÷ {names[1]} (median of per-repeat ratios) | "
        + " | ".join(f"{r:.2f}×" for r in ratios)
        + " |"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="micro", help='A model directory or "micro".')
    ap.add_argument("--no-quantize", action="store_true", help="Convert to bf16 instead of 4-bit.")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128, help="Tokens per answer.")
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--long-prompt", type=int, default=4096, help="Tokens of the late prompt.")
    ap.add_argument(
        "--baseline-rev", help="Also run mlxkit serve as it was at this git revision (MTP on)."
    )
    ap.add_argument("--pause", type=float, default=2.0, help="Seconds between the two turns.")
    ap.add_argument("--out", type=Path, help="Also write the table to this markdown file.")
    ap.add_argument(
        "--step-ceiling",
        action="store_true",
        help="Also time batch steps in this process (mlxkit vs mlx-lm, no HTTP) first.",
    )
    ap.add_argument(
        "--ceiling-only", action="store_true", help="Only the --step-ceiling table; no servers."
    )
    args = ap.parse_args()

    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        env = None
        if args.baseline_rev:
            tree = Path(tmp) / "baseline"
            root = Path(__file__).resolve().parent.parent
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(root),
                    "worktree",
                    "add",
                    "--detach",
                    str(tree),
                    args.baseline_rev,
                ],
                check=True,
                capture_output=True,
            )
            env = {**os.environ, "PYTHONPATH": str(tree)}
        converted = Path(tmp) / "model"
        convert(resolve_model_dir(args.model), converted, quantize=not args.no_quantize, quiet=True)
        sizes = [1, *args.clients]
        ceiling = []
        if args.step_ceiling or args.ceiling_only:
            ceiling = ceiling_table(batch_step_tps(converted, sizes, args.repeats), sizes)
            ceiling += ["", *verify_cost_table(converted, sizes, args.repeats)]
            if args.ceiling_only:
                print(
                    "\n".join(
                        [*ceiling, "", "Machine:", "", *(f"- {k}: {v}" for k, v in info.items())]
                    )
                )
                return
        python = sys.executable
        commands = {
            "mlx_lm.server": [
                python,
                "-m",
                "mlx_lm",
                "server",
                "--model",
                str(converted),
                "--max-tokens",
                "4096",
            ],
            "mlxkit serve (MTP)": [python, "-m", "mlxkit", "serve", "--model", str(converted)],
            "mlxkit serve (no MTP)": [
                python,
                "-m",
                "mlxkit",
                "serve",
                "--model",
                str(converted),
                "--no-mtp",
            ],
        }
        if args.baseline_rev:
            commands[f"mlxkit serve @{args.baseline_rev} (MTP)"] = commands["mlxkit serve (MTP)"]
        engines = []
        keys = ["ttft", "tps", *(f"agg{c}" for c in args.clients), "gap_before", "gap_during"]
        keys.append("long_ttft")
        try:
            for name, cmd in commands.items():
                port = free_port()
                base_env = env if "@" in name else None
                engines.append(Engine(name, [*cmd, "--port", str(port)], port, base_env))
            runs = {e.name: {k: [] for k in keys} for e in engines}
            for e in engines:  # warm-up: first use compiles and allocates
                single_tps(e, "# warm-up\n", 16)
                aggregate_tps(e, 2, 8)
            for rep in range(args.repeats):
                question = f"# repeat {rep}\n{QUESTIONS[rep % len(QUESTIONS)]}"
                for e in engines:
                    r = runs[e.name]
                    r["ttft"].append(second_turn_ttft(e, question, args.tokens, args.pause))
                    r["tps"].append(single_tps(e, f"# repeat {rep}\n", args.tokens))
                    for c in args.clients:
                        r[f"agg{c}"].append(aggregate_tps(e, c, args.tokens))
                    for k, v in long_prompt_arrival(
                        e, args.long_prompt, args.tokens * 3, f"# repeat {rep}\n"
                    ).items():
                        r[k].append(v)
                print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        finally:
            for e in engines:
                e.stop()
            if args.baseline_rev:
                subprocess.run(
                    ["git", "-C", str(root), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )

    base = runs["mlx_lm.server"]

    def ratio(name: str, key: str, faster_is_less: bool = False) -> float:
        """Median over repeats of the ratio within each repeat (robust to drift)."""
        pairs = zip(runs[name][key], base[key])
        return statistics.median(b / x if faster_is_less else x / b for x, b in pairs)

    agg_head = "".join(f" {c} clients tok/s | vs mlx_lm.server |" for c in args.clients)
    lines = [
        (
            f"Model: {args.model} ({'bf16' if args.no_quantize else '4-bit'}), {args.tokens} "
            f"tokens per answer, greedy, thinking off, {args.pause:g} s between the two turns; "
            f"medians of {args.repeats} repeats, engines interleaved; ratios are medians of the "
            "per-repeat ratios to mlx_lm.server. MLX's CPU backend."
        ),
        "",
        (
            "| server | 2nd-turn TTFT (ms) | speedup vs mlx_lm.server | 1 client tok/s | "
            f"vs mlx_lm.server |{agg_head}"
        ),
        "|---|---|---|---|---|" + "---|---|" * len(args.clients),
    ]
    for name, r in runs.items():
        m = {k: statistics.median(v) for k, v in r.items()}
        aggs = "".join(
            f" {m[f'agg{c}']:.1f} | {ratio(name, f'agg{c}'):.2f}× |" for c in args.clients
        )
        lines.append(
            f"| {name} | {m['ttft'] * 1e3:.1f} | {ratio(name, 'ttft', True):.2f}× "
            f"| {m['tps']:.1f} | {ratio(name, 'tps'):.2f}× |{aggs}"
        )
    lines += [
        "",
        f"A {args.long_prompt:,}-token prompt arriving while an answer streams (medians):",
        "",
        "| server | stream's gap before (ms) | its longest gap meanwhile (ms) | long prompt's TTFT (s) |",
        "|---|---|---|---|",
    ]
    for name, r in runs.items():
        m = {k: statistics.median(v) for k, v in r.items()}
        lines.append(
            f"| {name} | {m['gap_before'] * 1e3:.1f} | {m['gap_during'] * 1e3:.0f} "
            f"| {m['long_ttft']:.2f} |"
        )
    spread = [
        f"- {name}: "
        + "; ".join(
            f"{k} "
            + ", ".join(f"{x * 1e3:.0f}" if "ttft" in k or "gap" in k else f"{x:.0f}" for x in v)
            for k, v in r.items()
        )
        for name, r in runs.items()
    ]
    machine_lines = [f"- {k}: {v}" for k, v in info.items()]
    report = "\n".join(
        [*lines, "", *ceiling, "", "Every repeat:", "", *spread, "", "Machine:", "", *machine_lines]
    )
    print(report)
    if args.out:
        command = " ".join(["python", "benchmarks/serve.py", *sys.argv[1:]])
        command = re.sub(r"--out \S+ ?", "", command).strip()
        args.out.write_text(f"# Serving benchmark\n\n```\n{command}\n```\n\n{report}\n")


if __name__ == "__main__":
    main()
