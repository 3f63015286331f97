"""Fixtures of the server tests; the builders they use live in tests.server.helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cnnstack.serverproc import ServerProcess
from server.config import ServerConfig
from tests.server.helpers import RunningServer, TinyModel, publish, server_config, tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, TinyModel]:
    """A repository with model "tiny" version 1 (fashion-mnist shaped, 10 classes)."""
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    return root, tm


@pytest.fixture
def start_server() -> Iterator:
    """``start_server(cfg) -> RunningServer``; every server started is stopped at teardown."""
    started: list[RunningServer] = []

    def start(cfg: ServerConfig) -> RunningServer:
        s = RunningServer(cfg)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop(1.0)


@pytest.fixture
def tiny_server(repo, start_server) -> tuple[RunningServer, TinyModel]:
    root, tm = repo
    return start_server(server_config(root)), tm


@pytest.fixture(scope="module")
def bad_input_server(tmp_path_factory) -> Iterator[RunningServer]:
    """One server per module for the bad-input matrix (tests/server/bad_inputs.py): model "tiny",
    max batch MAX_BATCH, --max-message-bytes MAX_MESSAGE."""
    from tests.server.bad_inputs import MAX_BATCH, MAX_MESSAGE

    root = tmp_path_factory.mktemp("bad") / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    s = RunningServer(server_config(root, max_batch_size=MAX_BATCH, max_message_bytes=MAX_MESSAGE))
    yield s
    s.stop(1.0)


@pytest.fixture
def spawn():
    """``spawn(*args, **kw) -> ServerProcess`` (launched, see cnnstack.serverproc); killed at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, **kw) -> ServerProcess:
        p = ServerProcess(*args, cwd=ROOT, **kw).launch()
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
