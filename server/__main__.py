"""``cnn-serve`` / ``python -m server``: serve a model repository over gRPC and HTTP/REST.

``--workers N`` (N > 1) runs N server processes on the same port under a supervisor
(server.scaleout.supervisor); otherwise this process is the server.

Prints one JSON line ``{"event": "listening", "port": ..., "metrics_port": ...}`` on stdout once
ready (ports: gRPC, HTTP, metrics), and ``{"event": "stopped", ...}`` after a graceful shutdown; logs go to stderr.
Exit codes: 0 after SIGTERM/SIGINT, 2 when it cannot start (bad flags, no CUDA for --device cuda,
missing repository).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from server.config import ServerConfig
from server.logs import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    cfg = ServerConfig.from_args(argv)
    configure_logging(cfg.log_level, cfg.log_format, cfg.access_log)
    if cfg.worker_count > 1:
        from server.scaleout.supervisor import supervise

        return supervise(cfg)
    from server.app import run

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
