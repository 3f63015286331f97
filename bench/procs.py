"""What every benchmark needs of the machine and of its processes: the CPU's name, free ports, a
process tree's CPU time, a baseline server as a child process, and the report files."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtest.client import describe_model

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """``lscpu``'s model name: the line every benchmark report starts with."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    return next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown"
    )


def write_report(out_dir: Path, stem: str, doc: dict, markdown: str) -> None:
    """A benchmark's results: ``stem``.json (everything) and ``stem``.md (the tables) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct ports free now, for servers that take fixed ports from a flag or a file."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """User + system CPU time of a process and its threads (/proc/PID/stat fields 14 and 15), plus
    with ``reaped_children`` that of its children that exited and were waited for (16 and 17)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12])
    if reaped_children:
        used += int(fields[13]) + int(fields[14])
    return used / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (a supervisor's workers; TorchServe's Java front end
    and its Python workers, which Java's threads start: every thread's children count). A child
    that exited between two readings still counts once its parent has waited for it."""
    try:
        total = cpu_seconds(pid, reaped_children=True)
        kids = [
            int(k) for t in Path(f"/proc/{pid}/task").iterdir() for k in (t / "children").read_text().split()
        ]
    except (FileNotFoundError, ProcessLookupError):  # a process that just exited
        return 0.0
    return total + sum(tree_cpu(k) for k in kids)


@contextmanager
def server_process(
    cmd: list[str], target: str, model: str, startup_s: float = 120.0
) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` (a baseline server: no 'listening' line), wait until ``target`` lists ``model``,
    stop it (SIGTERM, then SIGKILL) after. cnn-serve itself runs as a cnnstack.serverproc.ServerProcess."""
    log = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                describe_model(target, "classify", model, 0, timeout=2.0)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"server did not list {model} within {startup_s}s: {' '.join(cmd)}"
                    ) from None
                time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
