"""The core the tools share: ``cnnstack.contract`` (what one tool hands the next: model metadata,
the model repository, the export report), ``cnnstack.cli`` (the one config pattern) and the
end-to-end driver ``cnnstack.pipeline`` with ``cnnstack.serverproc`` (cnn-serve as a child
process). Importing the package does no work.

The version is the installed distribution's, read once when asked (``version()``): pyproject.toml
is the one place it is written. The server image installs the same code as ``cnnstack-server``.
"""

from __future__ import annotations

import functools
from importlib import metadata

DISTRIBUTIONS = ("cnnstack", "cnnstack-server")


@functools.cache
def version() -> str:
    """The version of the installed distribution of this code."""
    for name in DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError(
        f"none of the distributions {DISTRIBUTIONS} is installed: install the project (pip install -e .)"
    )


def __getattr__(name: str) -> str:
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
