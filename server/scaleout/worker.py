"""One worker of ``cnn-serve --workers N``: ``python -m server.scaleout.worker SPEC``, started by
server.scaleout.supervisor, never by hand.

A worker is the whole server (``server.app.run``: gRPC and everything else app.py starts, its
own batchers and sessions) bound with SO_REUSEPORT to the port the supervisor reserved, with
``usable_cpus() / N`` cores for its threads and its GPU instances starting at device ``index``
(server.runtime.share). It prints the usual ``listening`` / ``stopped`` lines on its stdout, which the
supervisor reads; its log goes to the supervisor's stderr, each line naming the worker.

SPEC is JSON: ``{"index": i, "count": N, "parent": supervisor pid, "config": {ServerConfig fields}}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from server.config import ServerConfig
from server.logs import configure_logging

PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    count: int
    parent: int  # the supervisor's pid
    config: ServerConfig

    def to_json(self) -> str:
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        return json.dumps({"index": self.index, "count": self.count, "parent": self.parent, "config": fields})

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        d: dict[str, Any] = json.loads(text)
        fields = dict(d["config"])
        for f in dataclasses.fields(ServerConfig):  # the Path fields travel as strings
            if "Path" in str(f.type) and fields.get(f.name) is not None:
                fields[f.name] = Path(fields[f.name])
        return cls(int(d["index"]), int(d["count"]), int(d["parent"]), ServerConfig(**fields))


def watch_parent(parent: int) -> None:
    """Drain and exit (SIGTERM to itself) once the supervisor is gone, e.g. killed with SIGKILL:
    a worker must not serve on without anyone to restart it or to stop it."""

    def loop() -> None:
        while os.getppid() == parent:
            threading.Event().wait(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="watch-supervisor", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print(
            "usage: python -m server.scaleout.worker SPEC_JSON (started by cnn-serve --workers)",
            file=sys.stderr,
        )
        return 2
    spec = WorkerSpec.from_json(args[0])
    cfg = spec.config
    configure_logging(cfg.log_level, cfg.log_format, cfg.access_log, worker=spec.index)
    # Until the server installs its own handlers: the supervisor forwards SIGTERM and SIGHUP; a
    # terminal's Ctrl-C (SIGINT to the whole group) must not kill a worker that is still loading.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watch_parent(spec.parent)

    from server.app import run
    from server.runtime.share import take_share
    from server.scaleout.control import WorkerControl

    take_share(spec.index, spec.count)
    return run(spec.config, reuse_port=True, control=WorkerControl)


if __name__ == "__main__":
    sys.exit(main())
