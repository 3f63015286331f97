"""Fixtures for the load-test tests (the fake server lives in tests.loadtest.fakes)."""

from tests.loadtest.fakes import fake_http_server, fake_server, fake_server_process  # noqa: F401  (pytest fixtures)
