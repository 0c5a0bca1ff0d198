"""For the server tests: a real `mlxkit serve` process on a free loopback port, the server's
own loop run in this process, and a time limit on every test.

Every wait here is bounded: a server that does not start, a request that gets no answer, a
test that hangs all end as failures, never as a suite that sits forever.
"""

from __future__ import annotations

import _thread
import faulthandler
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openai import OpenAI

START_TIMEOUT_S = 120  # importing MLX and loading a model on a busy 2-core machine
REQUEST_TIMEOUT_S = 120  # one request, on a busy machine
TEST_LIMIT_S = 300  # a server test takes seconds; this only turns a hang into a failure


@pytest.fixture(autouse=True)
def time_limit() -> Iterator[None]:
    """Fails a test that runs past TEST_LIMIT_S instead of letting it hang (imported by the
    modules whose tests start servers or threads; autouse there). SIGALRM raises on the main
    thread, and again every few seconds in case one lands where Python drops exceptions (a
    finalizer); should even that not end it, faulthandler prints every thread's stack and
    ends the process."""

    def expired(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, 5)
        pytest.fail(f"the test ran past its time limit of {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_LIMIT_S)
    faulthandler.dump_traceback_later(TEST_LIMIT_S + 60, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


class Server:
    """`python -m mlxkit serve --port 0 ARGS`; the port it took is read from its banner.
    `sigint_ignored`: started as a background job of a non-interactive shell is, with SIGINT
    ignored."""

    def __init__(self, *args: str, sigint_ignored: bool = False) -> None:
        cmd = [
            sys.executable,
            "-m",
            "mlxkit",
            "serve",
            "--port",
            "0",
            "--log-level",
            "warning",
            *args,
        ]
        if sigint_ignored:  # the shell ignores it; exec keeps it ignored
            cmd = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *cmd]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._ports: list[int] = []
        self._started = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._started.wait(START_TIMEOUT_S) or not self._ports:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        self.port = self._ports[0]

    def _drain(self) -> None:
        """Reads the server's stderr into `log` (on a thread: a silent server cannot block the
        test), noting the port its banner names."""
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
            if m and not self._ports:
                self._ports.append(int(m.group(1)))
                self._started.set()
        self._started.set()  # the process ended

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> OpenAI:
        return OpenAI(
            base_url=self.url + "/v1",
            api_key=kwargs.pop("api_key", "unused"),
            max_retries=0,
            timeout=kwargs.pop("timeout", REQUEST_TIMEOUT_S),
            **kwargs,
        )

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
    ) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(
            method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        return response.status, dict(response.getheaders()), json.loads(raw) if raw else {}

    def stats(self) -> dict:
        return self.request("GET", "/v1/stats")[2]

    def wait_idle(self, timeout: float = 120.0, prepared_after: int | None = None) -> dict:
        """Stats once nothing is queued, generating or being prepared (and, with
        `prepared_after`, once more than that many next-turn tokens have been prepared); fails
        the test if that does not happen within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            idle = not stats["busy"] and not stats["preparing"]
            idle = idle and stats["requests"]["in_flight"] == 0
            if prepared_after is not None:
                idle = idle and stats["tokens"]["prepared"] > prepared_after
            if idle:
                return stats
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not idle after {timeout} s: {stats}")
            time.sleep(0.05)

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def micro_with_template(tmp: Path, template: Path, source: Path | None = None) -> Path:
    """A copy of the micro model directory (or of `source`) with another chat template."""
    from mlxkit.micro import micro_dir

    out = tmp / "micro"
    out.mkdir()
    for f in (source or micro_dir()).iterdir():
        if f.is_file() and f.name != "chat_template.jinja":
            shutil.copy(f, out / f.name)
    (out / "chat_template.jinja").write_text(template.read_text(encoding="utf-8"))
    return out


def serve_in_process(engine, app, client: Callable[[int], object], ctrl_c: bool = True) -> object:
    """`mlxkit serve`'s own loop (`mlxkit.serve.cli.run`: the engine on this, the main thread,
    uvicorn on another) while `client(port)` runs on a thread of its own; when the client is
    done, a simulated Ctrl-C (`_thread.interrupt_main`) stops the server, as a user stops
    `mlxkit serve` (`ctrl_c=False`: the client stops it itself, unless it fails; a second
    signal would force the stop). Returns what the client returned; raises what it raised."""
    from mlxkit.serve.cli import run

    ports: list[int] = []
    listening = threading.Event()
    outcome: dict = {}

    def banner(port: int) -> str:
        ports.append(port)
        listening.set()
        return ""

    def client_side() -> None:
        try:
            if not listening.wait(START_TIMEOUT_S):
                raise RuntimeError("the server did not start")
            outcome["value"] = client(ports[0])
        except BaseException as e:  # noqa: BLE001 - raised again on the main thread
            outcome["error"] = e
        finally:
            if ctrl_c or "error" in outcome:
                _thread.interrupt_main()

    thread = threading.Thread(target=client_side, daemon=True)
    thread.start()
    run(engine, app, "127.0.0.1", 0, "warning", banner)
    thread.join(REQUEST_TIMEOUT_S)
    assert not thread.is_alive(), "the client side did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def openai_client(port: int):
    """The official client on an in-process server: no retries, each request bounded."""
    import openai

    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="x",
        max_retries=0,
        timeout=REQUEST_TIMEOUT_S,
    )


def sse_lines(port: int, path: str, body: dict) -> Iterator[str]:
    """The `data:` payloads of a streamed response, as they arrive (raw HTTP: what a client
    sees, [DONE] included)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                yield line[len("data: ") :]
    finally:
        conn.close()
