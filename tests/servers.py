"""A server started exactly as a user starts it (``Run_Service.py --serve ...``) in a subprocess."""

from __future__ import annotations

import importlib.util
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

START_S = 240  # a worker imports torch and opens the pool; Ray starts its own processes (longer on a busy machine)
RAY = importlib.util.find_spec("ray") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Server:
    """``Run_Service.py --serve`` in a subprocess, stopped with Ctrl-C (SIGINT) as a user stops it. Started at once,
    as a script's ``cmd &`` starts it: with SIGINT ignored, which Python then never turns into KeyboardInterrupt
    (the Ray server hung on Ctrl-C so), so the server must handle it itself. ``ready()`` waits for the line with
    its URL. Its output goes to files, never to a pipe nobody reads (a full pipe would block the server while
    another test runs)."""

    def __init__(self, *args: str, data_root, logs: Path) -> None:
        cmd = [sys.executable, "Run_Service.py", "--serve", "--device", "cpu", "--data_root", str(data_root), *args]
        self.out, self.err = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=out,
                stderr=err,
                text=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
            )
        self.url = ""

    def ready(self) -> Server:
        deadline = time.monotonic() + START_S
        while not self.url:
            found = re.search(r"http://127\.0\.0\.1:\d+", self.out.read_text())
            if found is not None:
                self.url = found.group(0)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start: {self.out.read_text()}{self.err.read_text()[-3000:]}")
            else:
                time.sleep(0.1)
        return self

    def get(self, path: str, **kw):
        import httpx  # here, not at the top: test_distributed needs only free_port, and not httpx

        with httpx.Client(timeout=START_S) as c:  # a new connection: any worker may take it
            return c.get(self.url + path, **kw)

    def pids(self, n: int) -> set[int]:
        """The process ids of ``n`` workers, asked on new connections until each has answered. A poll, not a busy
        loop: a loop of requests took a core from the workers still starting."""
        seen: set[int] = set()
        deadline = time.monotonic() + START_S
        while len(seen) < n and time.monotonic() < deadline:
            health = self.get("/healthz")
            if health.status_code == 200:
                seen.add(health.json()["pid"])
            if len(seen) < n:
                time.sleep(0.05)
        return seen

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # did not stop within 2 minutes of Ctrl-C: -9, not None, says so
            self.proc.wait()
        return self.proc.returncode
