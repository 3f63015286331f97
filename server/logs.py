"""What the server says: machine-readable event lines on stdout, the log on stderr.

``event(name, **fields)`` prints one JSON line on stdout: the ``listening`` line is how scripts,
the supervisor and the tests find the ports; ``stopped`` carries the drain's summary. Everything
else is logging, on stderr.
"""

from __future__ import annotations

import json
from typing import Any


def event(name: str, **fields: Any) -> None:
    """One JSON line ``{"event": name, ...}`` on stdout, flushed at once."""
    print(json.dumps({"event": name, **fields}), flush=True)
