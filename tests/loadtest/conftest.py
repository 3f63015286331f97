"""Fixtures for the load-test tests (the fake server lives in lt_fakes.py)."""

from lt_fakes import fake_server  # noqa: F401  (pytest fixture)
