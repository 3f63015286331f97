"""One ``/metrics`` for the workers of ``cnn-serve --workers N``, served by the supervisor.

Each worker runs with ``PROMETHEUS_MULTIPROC_DIR`` pointing at a private temporary folder, so
prometheus_client writes its values to per-process files there (server/metrics.py says how each
metric combines). The supervisor reads them all with ``MultiProcessCollector`` at every scrape,
adds its own two series (workers serving, workers restarted), removes a dead worker's live-gauge
files (``mark_process_dead``) before its replacement starts, and deletes the folder at exit.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from server.metrics import MetricsEndpoint

ENV = "PROMETHEUS_MULTIPROC_DIR"


class SupervisorCollector:
    """``cnn_workers`` and ``cnn_worker_restarts_total``, read from the supervisor at scrape time."""

    def __init__(self, serving: Callable[[], int], restarts: Callable[[], int]) -> None:
        self._serving, self._restarts = serving, restarts

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily("cnn_workers", "Worker processes serving now (cnn-serve --workers).")
        workers.add_metric([], self._serving())
        yield workers
        restarts = CounterMetricFamily(
            "cnn_worker_restarts", "Workers restarted by the supervisor after they died."
        )
        restarts.add_metric([], self._restarts())
        yield restarts


@dataclass
class SharedMetrics:
    """The folder the workers write to and, unless metrics are off, the HTTP endpoint over it."""

    folder: Path
    endpoint: MetricsEndpoint | None = field(default=None, repr=False)

    @classmethod
    def create(cls) -> SharedMetrics:
        return cls(Path(tempfile.mkdtemp(prefix="cnn-serve-metrics-")))

    def serve(self, host: str, port: int, collector: SupervisorCollector) -> int:
        """Start ``/metrics`` on ``host:port`` (0: any free port); returns the bound port."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.folder))
        registry.register(collector)  # type: ignore[arg-type]
        self.endpoint = MetricsEndpoint(registry, host, port)
        return self.endpoint.port

    @property
    def port(self) -> int | None:
        return self.endpoint.port if self.endpoint is not None else None

    def worker_died(self, pid: int) -> None:
        # Its counters and histograms stay (totals never go back); its live gauges go.
        mark_process_dead(pid, str(self.folder))

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        shutil.rmtree(self.folder, ignore_errors=True)
