"""What an install costs on this host: the virtualenv's size, its NVIDIA and onnxruntime
distributions, and ``cnn-serve``'s resident memory once it listens, before its first request.

    .venv/bin/python deploy/footprint.py --venv .venv

Run from the checkout with the dev virtualenv (it writes a tiny model with the tests' helper into a
temporary repository); ``--venv`` is the install to measure, its ``cnn-serve`` is the one started
(one process, ``--device auto``). Prints the first lines ``cnn-serve`` wrote (stdout and stderr)
and one JSON line with the figures; docs/deployment.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path`` (symlinks not followed), as ``du -sb`` counts them."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def distributions(venv: Path) -> dict[str, str]:
    """name -> version of every distribution installed in ``venv``."""
    (site,) = venv.glob("lib/python3*/site-packages")
    return {d.metadata["Name"].lower(): d.version for d in metadata.distributions(path=[str(site)])}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def serve_once(venv: Path, repo: Path, env: dict[str, str], settle_s: float) -> tuple[float, list[str]]:
    """(RSS in MiB ``settle_s`` after the listening line, the lines cnn-serve printed by then)."""
    cmd = [str(venv / "bin" / "cnn-serve"), "--repository", str(repo), "--host", "127.0.0.1"]
    cmd += ["--port", "0", "--metrics-port", "0", "--http-port", "0", "--device", "auto"]
    cmd += ["--poll-interval-s", "0"]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            assert proc.stdout is not None
            listening = proc.stdout.readline()
            if not listening:
                err.seek(0)
                raise RuntimeError(f"cnn-serve did not start:\n{err.read()[-3000:]}")
            time.sleep(settle_s)  # background threads finish their start-up allocations
            rss = rss_mib(proc.pid)
            err.seek(0)
            printed = [*err.read().splitlines(), listening.strip()]
        finally:
            proc.terminate()
            proc.wait(60)
        return rss, printed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, required=True, help="the virtualenv to measure")
    p.add_argument("--settle-s", type=float, default=2.0, help="wait after the listening line")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.server.helpers import publish, tiny_model

    dists = distributions(args.venv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        data, model = tiny_model()
        publish(repo, "tiny", 1, data, model.meta)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        rss, lines = serve_once(args.venv.resolve(), repo, env, args.settle_s)
    for line in lines:
        print(line)
    figures = {
        "venv_mb": round(tree_bytes(args.venv) / 1e6),
        "nvidia": sorted(n for n in dists if n.startswith("nvidia")),
        "onnxruntime": {n: v for n, v in dists.items() if n.startswith("onnxruntime")},
        "serve_rss_mib_before_first_request": round(rss, 1),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
