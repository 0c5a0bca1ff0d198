"""Serving speed: `mlxkit serve` (MTP on, and off) against `mlx_lm.server` on the same converted
directory in one run, over HTTP as clients see it. Prints a markdown table of medians over the
repeats with ratios to mlx_lm.server:

- second-turn time to first token: a chat with a long system prompt; the second turn sends the
  first turn's answer back with a new question (each server gets its own first answer) after
  `--pause` seconds (the user reading and typing), and the clock runs from sending the request
  to the first generated text;
- single-client tokens/s: streamed chat answers to three questions, one after another, from
  each answer's first token to its last;
- aggregate tokens/s with 8 clients at once: all tokens over the wall time (mlx_lm.server
  batches them; mlxkit serves one at a time).

    python benchmarks/serve.py --model micro

The model is converted with `mlxkit convert` (4-bit by default, `--no-quantize` for bf16)
into a temporary directory that every server loads. Greedy decoding, thinking off. The
servers run side by side; only one is measured at a time, interleaved per repeat.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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

    def __init__(self, name: str, cmd: list[str], port: int) -> None:
        self.name, self.port = name, port
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
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

    def chat(self, messages: list[dict], max_tokens: int) -> dict:
        """One streamed chat completion: text, seconds to the first text, seconds from the first
        text to the last, completion tokens (from the usage the server reports)."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="micro", help='A model directory or "micro".')
    ap.add_argument("--no-quantize", action="store_true", help="Convert to bf16 instead of 4-bit.")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128, help="Tokens per answer.")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--pause", type=float, default=2.0, help="Seconds between the two turns.")
    ap.add_argument("--out", type=Path, help="Also write the table to this markdown file.")
    args = ap.parse_args()

    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / "model"
        convert(resolve_model_dir(args.model), converted, quantize=not args.no_quantize, quiet=True)
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
        engines = []
        try:
            for name, cmd in commands.items():
                port = free_port()
                engines.append(Engine(name, [*cmd, "--port", str(port)], port))
            runs = {e.name: {"ttft": [], "tps": [], "agg": []} for e in engines}
            for e in engines:  # warm-up: first use compiles and allocates
                single_tps(e, "# warm-up\n", 16)
                aggregate_tps(e, 2, 8)
            for rep in range(args.repeats):
                question = f"# repeat {rep}\n{QUESTIONS[rep % len(QUESTIONS)]}"
                for e in engines:
                    runs[e.name]["ttft"].append(
                        second_turn_ttft(e, question, args.tokens, args.pause)
                    )
                    runs[e.name]["tps"].append(single_tps(e, f"# repeat {rep}\n", args.tokens))
                    runs[e.name]["agg"].append(aggregate_tps(e, args.clients, args.tokens))
                print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        finally:
            for e in engines:
                e.stop()

    base = runs["mlx_lm.server"]

    def ratio(name: str, key: str, faster_is_less: bool = False) -> float:
        """Median over repeats of the ratio within each repeat (robust to drift)."""
        pairs = zip(runs[name][key], base[key])
        return statistics.median(b / x if faster_is_less else x / b for x, b in pairs)

    lines = [
        (
            f"Model: {args.model} ({'bf16' if args.no_quantize else '4-bit'}), {args.tokens} "
            f"tokens per answer, greedy, thinking off, {args.pause:g} s between the two turns; "
            f"medians of {args.repeats} repeats, engines interleaved; ratios are medians of the "
            "per-repeat ratios to mlx_lm.server."
        ),
        "",
        (
            "| server | 2nd-turn TTFT (ms) | speedup vs mlx_lm.server | 1 client tok/s | "
            f"vs mlx_lm.server | {args.clients} clients tok/s | vs mlx_lm.server |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        m = {k: statistics.median(v) for k, v in r.items()}
        lines.append(
            f"| {name} | {m['ttft'] * 1e3:.1f} | {ratio(name, 'ttft', True):.2f}× "
            f"| {m['tps']:.1f} | {ratio(name, 'tps'):.2f}× | {m['agg']:.1f} "
            f"| {ratio(name, 'agg'):.2f}× |"
        )
    spread = [
        f"- {name}: TTFT ms "
        + ", ".join(f"{x * 1e3:.0f}" for x in r["ttft"])
        + "; tok/s "
        + ", ".join(f"{x:.0f}" for x in r["tps"])
        + f"; {args.clients}-client tok/s "
        + ", ".join(f"{x:.0f}" for x in r["agg"])
        for name, r in runs.items()
    ]
    machine_lines = [f"- {k}: {v}" for k, v in info.items()]
    report = "\n".join(
        [*lines, "", "Every repeat:", "", *spread, "", "Machine:", "", *machine_lines]
    )
    print(report)
    if args.out:
        command = " ".join(["python", "benchmarks/serve.py", *sys.argv[1:]])
        command = re.sub(r"--out \S+ ?", "", command).strip()
        args.out.write_text(f"# Serving benchmark\n\n```\n{command}\n```\n\n{report}\n")


if __name__ == "__main__":
    main()
