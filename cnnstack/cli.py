"""The one pattern every tool's configuration follows.

A tool's settings are one frozen dataclass that checks itself in ``__post_init__``: it collects
every problem (a flag's message each) and raises one ``ConfigError`` with all of them
(``require(problems)``). ``main()`` builds it with ``parse_config(Config, parser, argv)``, which is
``Config(**vars(parser.parse_args(argv)))`` with a ``ConfigError`` turned into argparse's usage
error (exit 2). Code that builds a config directly (tests, the pipeline) gets the same checks.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """Settings that cannot work; ``problems`` has one message per flag to change."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def require(problems: Sequence[str]) -> None:
    """Raise one ConfigError naming every problem, or return when there is none."""
    if problems:
        raise ConfigError(problems)


def parse_config(cls: type[T], parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> T:
    """``cls(**vars(args))``; a ConfigError becomes ``parser.error`` (usage on stderr, exit 2)."""
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ConfigError as e:
        _usage_error(parser, e)


def _usage_error(parser: argparse.ArgumentParser, e: ConfigError) -> NoReturn:
    parser.error(str(e))


__all__ = ["ConfigError", "parse_config", "require"]
