"""cnn-serve as a child process: started on 127.0.0.1 with port 0 (gRPC and HTTP), found through
its ``listening`` line, stopped with SIGTERM (the graceful drain), SIGKILL only when that does not end it in time.

cnn-serve prints one JSON line per event on stdout (``listening`` with the bound ports, ``stopped``
with the admission summary) and logs on stderr; both are read by threads here, so the child never
blocks on a full pipe. The pipeline, the tests and bench/serve_bench.py all start it this way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

STDERR_LINES = 2000  # the tail kept in memory (all of it goes to log_file when there is one)


class ServerStartError(RuntimeError):
    """cnn-serve exited, or printed no ``listening`` line in time; the message holds its log's tail."""


class ServerProcess:
    """``python -m server --host 127.0.0.1 --port 0 --http-port 0 [--repository R] ARGS...`` in a
    child process (ARGS come last, so they may override any of these).

    ``launch()`` starts it, ``wait_listening()`` waits for its ``listening`` event; ``start()`` does
    both. ``stop()`` sends SIGTERM and waits; ``kill()`` ends it at once. As a context manager it is
    started on entry and stopped on exit.
    """

    def __init__(
        self,
        *args: str,
        repository: Path | None = None,
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        where = ["--repository", str(repository)] if repository is not None else []
        self.cmd = [
            sys.executable,
            "-m",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
            *where,
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log_file = log_file
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self.events: list[dict[str, Any]] = []
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self._listening = threading.Event()
        self._readers: list[threading.Thread] = []
        self._log: IO[str] | None = None

    # ---- starting

    def launch(self) -> ServerProcess:
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_file, "w")  # noqa: SIM115 (closed in _finish)
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._readers = [
            threading.Thread(target=self._read_events, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._read_log, args=(self.proc.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        return self

    def wait_listening(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """The ``listening`` event; ServerStartError (the child killed) when it does not come."""
        proc = self._started()
        deadline = time.monotonic() + timeout_s
        while not self._listening.wait(0.1):
            exited = proc.poll() is not None
            if exited or time.monotonic() > deadline:
                self.kill()
                why = (
                    f"exited with {proc.returncode}" if exited else f"was not listening after {timeout_s:g} s"
                )
                raise ServerStartError(f"cnn-serve {why}; {self.log_tail()}")
        return self.listening

    def start(self, timeout_s: float = 120.0) -> dict[str, Any]:
        return self.launch().wait_listening(timeout_s)

    # ---- what it said

    def event(self, name: str) -> dict[str, Any]:
        """The last event called ``name`` so far ({} when there was none)."""
        return next((e for e in reversed(self.events) if e.get("event") == name), {})

    @property
    def listening(self) -> dict[str, Any]:
        return self.event("listening")

    @property
    def stopped(self) -> dict[str, Any]:
        return self.event("stopped")

    @property
    def target(self) -> str:
        """HOST:PORT of gRPC."""
        return f"127.0.0.1:{self.listening['port']}"

    @property
    def http_target(self) -> str | None:
        """HOST:PORT of HTTP/REST; None when it was turned off (``--http-port -1``)."""
        port = self.listening.get("http_port")
        return f"127.0.0.1:{port}" if port is not None else None

    @property
    def http_url(self) -> str | None:
        """``http://`` or ``https://`` (the server said it uses TLS) + ``http_target``."""
        target = self.http_target
        if target is None:
            return None
        return f"{'https' if self.listening.get('tls') else 'http'}://{target}"

    @property
    def pid(self) -> int:
        return self._started().pid

    def log_tail(self, chars: int = 3000) -> str:
        where = f"its log is {self.log_file}" if self.log_file is not None else "its log ends"
        return f"{where}:\n{''.join(self.stderr)[-chars:]}"

    # ---- stopping

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (graceful drain), SIGKILL only if it does not exit in time; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._finish()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._finish()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- internals

    def _started(self) -> subprocess.Popen[str]:
        if self.proc is None:
            raise RuntimeError("ServerProcess.launch() was not called")
        return self.proc

    def _read_events(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.append(event)
                if event.get("event") == "listening":
                    self._listening.set()

    def _read_log(self, stream: IO[str]) -> None:
        for line in stream:
            self.stderr.append(line)
            if self._log is not None:
                self._log.write(line)
                self._log.flush()

    def _finish(self) -> None:
        """After the child exited: its last lines read, the log file closed."""
        for reader in self._readers:
            reader.join(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
