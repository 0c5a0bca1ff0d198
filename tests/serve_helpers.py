"""A real `mlxkit serve` process on a free loopback port, for the server tests."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from openai import OpenAI

START_TIMEOUT_S = 120  # importing MLX and loading a model on a busy 2-core machine


class Server:
    """`python -m mlxkit serve --port 0 ARGS`; the port it took is read from its banner."""

    def __init__(self, *args: str) -> None:
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
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.port = self._read_port()
        threading.Thread(target=self._drain, daemon=True).start()

    def _read_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                return int(m.group(1))
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise RuntimeError("the server did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> OpenAI:
        return OpenAI(
            base_url=self.url + "/v1",
            api_key=kwargs.pop("api_key", "unused"),
            max_retries=0,
            **kwargs,
        )

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
    ) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
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

    def wait_idle(self, timeout: float = 30.0, prepared_after: int | None = None) -> dict:
        """Stats once nothing is queued, generating or being prepared (and, with
        `prepared_after`, once more than that many next-turn tokens have been prepared)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            idle = not stats["busy"] and not stats["preparing"]
            idle = idle and stats["requests"]["in_flight"] == 0
            if prepared_after is not None:
                idle = idle and stats["tokens"]["prepared"] > prepared_after
            if idle or time.monotonic() > deadline:
                return stats
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


def micro_with_template(tmp: Path, template: Path) -> Path:
    """A copy of the micro model directory with another chat template."""
    from mlxkit.micro import micro_dir

    out = tmp / "micro"
    out.mkdir()
    for f in micro_dir().iterdir():
        if f.is_file() and f.name != "chat_template.jinja":
            shutil.copy(f, out / f.name)
    (out / "chat_template.jinja").write_text(template.read_text(encoding="utf-8"))
    return out
