"""Fixtures for the load-test tests (the fake server lives in lt_fakes.py)."""

from lt_fakes import fake_server, fake_server_process  # noqa: F401  (pytest fixtures)
