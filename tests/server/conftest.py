"""Fixtures of the server tests; the builders they use live in tests.server.helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import ServerConfig
from tests.server.helpers import RunningServer, TinyModel, publish, server_config, tiny_model


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
