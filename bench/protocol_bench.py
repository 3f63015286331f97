"""gRPC against KServe v2 over HTTP/REST (binary extension and JSON), and what TLS costs, in one run.

One exported model (LeNet by default), one image per request, closed loop at each
``--concurrency``. Two cnn-serve processes are started on 127.0.0.1: plain text, and TLS (a
throwaway certificate from trustme). Every wire is driven by cnn-loadtest itself, the command
a user runs (``--api kserve --protocol grpc|http [--json] [--tls-ca]``), and, where h2load is
installed, also by h2load (C: HTTP/2 frames for gRPC, ``--h1`` for HTTP/1.1), which takes most
of the client's cost off the cores it shares with the server. Rounds alternate the wires
(grpc, http binary, http json, ...) so that other work on a shared machine weighs on each alike;
each figure is its median round.

Ratios printed: HTTP binary / gRPC and HTTP JSON / gRPC requests/s at the highest concurrency,
and TLS / plain at the same concurrency for gRPC and HTTP binary.

    .venv/bin/python -m bench.protocol_bench --repository artifacts/repository --model lenet
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import h2load_client
from bench.procs import cpu_model, write_report
from cnnstack.serverproc import ServerProcess
from loadtest import metrics_scrape
from loadtest.client import describe_model
from loadtest.payload import KSERVE_METHOD, build_payloads, infer_path, load_images

ROOT = Path(__file__).resolve().parents[1]
# (name, protocol, json, tls)
WIRES = [
    ("grpc", "grpc", False, False),
    ("http binary", "http", False, False),
    ("http json", "http", True, False),
    ("grpc + TLS", "grpc", False, True),
    ("http binary + TLS", "http", False, True),
]


@dataclass(frozen=True)
class ProtocolBench:
    repository: Path
    model: str
    concurrency: tuple[int, ...]
    duration_s: float
    warmup_s: float
    rounds: int
    h2load: bool
    out_dir: Path


def _pki(d: Path) -> dict[str, Path]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    return files


def _start(cfg: ProtocolBench, *extra: str) -> ServerProcess:
    args = [
        "--metrics-port",
        "0",
        "--poll-interval-s",
        "0",
        "--log-level",
        "WARNING",
        "--device",
        "cpu",
        *extra,
    ]
    server = ServerProcess(*args, repository=cfg.repository, cwd=ROOT)
    server.start()
    return server


def loadtest_step(
    cfg: ProtocolBench, server: ServerProcess, wire: tuple, c: int, ca: Path, tmp: Path
) -> dict:
    """One cnn-loadtest run (a subprocess, as a user runs it): requests/s, p50, p99."""
    _, protocol, as_json, tls = wire
    port = server.listening["port"] if protocol == "grpc" else server.listening["http_port"]
    out = tmp / "step.json"
    cmd = [
        sys.executable,
        "-m",
        "loadtest",
        "--target",
        f"127.0.0.1:{port}",
        "--model",
        cfg.model,
        "--api",
        "kserve",
        "--protocol",
        protocol,
        "--concurrency",
        str(c),
        "--duration",
        str(cfg.duration_s),
        "--warmup",
        str(cfg.warmup_s),
        "--window",
        str(cfg.duration_s / 4),
        "--stability-windows",
        "100",
        "--out",
        str(out),
        "--quiet",
        *(["--json"] if as_json else []),
        *(["--tls-ca", str(ca)] if tls else []),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=cfg.duration_s * 3 + 120)
    (step,) = json.loads(out.read_text())["steps"]
    if step["errors_total"]:
        raise RuntimeError(f"{wire[0]} c={c}: errors {step['errors_total']}")
    lat = step["latency_ms"]
    return {"requests_per_s": step["requests_per_s"], "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"]}


def h2load_step(cfg: ProtocolBench, server: ServerProcess, wire: tuple, c: int, shape: tuple) -> dict:
    _, protocol, as_json, _ = wire
    images = load_images("synthetic", shape, 1, seed=0)  # (1, C, H, W)
    if protocol == "grpc":
        murl = f"http://127.0.0.1:{server.listening['metrics_port']}/metrics"
        before = metrics_scrape.scrape(murl, cfg.model).get(f"{metrics_scrape.REQUESTS}:OK", 0.0)
        message = build_payloads("kserve", images, 1, cfg.model, 0)[0]
        r = h2load_client.run_h2load(
            f"127.0.0.1:{server.listening['port']}",
            KSERVE_METHOD,
            message,
            concurrency=c,
            duration_s=cfg.duration_s,
            warmup_s=cfg.warmup_s,
        )
        ok = metrics_scrape.scrape(murl, cfg.model).get(f"{metrics_scrape.REQUESTS}:OK", 0.0) - before
        if ok < r.requests:  # h2load cannot read gRPC statuses (trailers): the server's count must cover it
            raise RuntimeError(f"h2load counted {r.requests} responses but the server answered {ok:.0f} OK")
    else:
        payload = build_payloads(
            "kserve", images, 1, cfg.model, 0, encoding="json" if as_json else "binary", protocol="http"
        )[0]
        url = f"http://127.0.0.1:{server.listening['http_port']}{infer_path(cfg.model, 0)}"
        r = h2load_client.run_h2load_http1(
            url,
            payload.body,
            payload.headers,
            concurrency=c,
            duration_s=cfg.duration_s,
            warmup_s=cfg.warmup_s,
        )
    if r.failed:
        raise RuntimeError(f"h2load {wire[0]} c={c}: {r.failed} failed requests")
    return {
        "requests_per_s": r.requests_per_s,
        "p50_ms": r.latency_ms["p50_ms"],
        "p99_ms": r.latency_ms["p99_ms"],
    }


def run(cfg: ProtocolBench) -> dict[str, Any]:
    runs: dict[tuple[str, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="protocol-bench-") as tmp_name:
        tmp = Path(tmp_name)
        pki = _pki(tmp)
        plain = _start(cfg)
        secure = _start(cfg, "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]))
        try:
            shape = describe_model(plain.target, "kserve", cfg.model, 0).shape
            assert shape is not None, f"{cfg.model}: the server's metadata gives no input shape"
            for rnd in range(cfg.rounds):
                for c in cfg.concurrency:
                    for wire in WIRES:
                        if wire[3] and c != max(cfg.concurrency):
                            continue  # TLS: at the highest concurrency only
                        server = secure if wire[3] else plain
                        r = loadtest_step(cfg, server, wire, c, pki["ca"], tmp)
                        runs.setdefault(("cnn-loadtest", wire[0], c), []).append(r)
                        print(
                            f"round {rnd + 1} cnn-loadtest {wire[0]:>18} c={c:<3} {r['requests_per_s']:8.0f} req/s "
                            f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms",
                            flush=True,
                        )
                        if cfg.h2load and not wire[3]:
                            r = h2load_step(cfg, server, wire, c, shape)
                            runs.setdefault(("h2load", wire[0], c), []).append(r)
                            print(
                                f"round {rnd + 1} h2load       {wire[0]:>18} c={c:<3} {r['requests_per_s']:8.0f} "
                                f"req/s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms",
                                flush=True,
                            )
        finally:
            plain.stop()
            secure.stop()
    rows = [
        {
            "client": k[0],
            "wire": k[1],
            "concurrency": k[2],
            "rounds": len(v),
            **{m: statistics.median(x[m] for x in v) for m in ("requests_per_s", "p50_ms", "p99_ms")},
        }
        for k, v in runs.items()
    ]
    return {
        "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
        "model": cfg.model,
        "rows": rows,
        "ratios": ratios(rows, max(cfg.concurrency)),
    }


def ratios(rows: list[dict], c: int) -> dict[str, float]:
    rps = {(r["client"], r["wire"]): r["requests_per_s"] for r in rows if r["concurrency"] == c}
    out = {}
    for client in ("cnn-loadtest", "h2load"):
        for num, den in (
            ("http binary", "grpc"),
            ("http json", "grpc"),
            ("grpc + TLS", "grpc"),
            ("http binary + TLS", "http binary"),
        ):
            if (client, num) in rps and (client, den) in rps:
                out[f"{client}: {num} / {den} at c={c}"] = rps[(client, num)] / rps[(client, den)]
    return out


def markdown(doc: dict) -> str:
    lines = [
        f"{doc['model']}, 1 image per request; CPU {doc['cpu']}, {doc['date']}",
        "",
        "| client | wire | concurrency | req/s | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['client']} | {r['wire']} | {r['concurrency']} | {r['requests_per_s']:,.0f} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    return "\n".join(lines + ratio_lines(doc["ratios"])) + "\n"


def ratio_lines(ratios: dict[str, float]) -> list[str]:
    """The ratios as a markdown table, after a blank line."""
    return ["", "| ratio | value |", "|---|---:|", *(f"| {k} | {v:.2f}x |" for k, v in ratios.items())]


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of a serving benchmark's runs: which model, how long, how many rounds, where to."""
    p.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "repository")
    p.add_argument("--model", default="lenet")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-h2load", action="store_true", help="cnn-loadtest only")
    p.add_argument("--out-dir", type=Path, default=ROOT / "artifacts" / "bench")


def parse_run_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    a = p.parse_args(argv)
    if not (a.repository / a.model).is_dir():
        p.error(f"no model {a.model!r} in {a.repository}: run cnn-pipeline (or cnn-export) first")
    return a


def parse_args(argv: list[str] | None) -> ProtocolBench:
    p = argparse.ArgumentParser(prog="python -m bench.protocol_bench", description=__doc__.split("\n")[0])
    add_run_args(p)
    p.add_argument("--concurrency", default="1,64", help="closed-loop steps, e.g. 1,64")
    a = parse_run_args(p, argv)
    conc = tuple(int(v) for v in a.concurrency.split(","))
    return ProtocolBench(
        a.repository,
        a.model,
        conc,
        a.duration,
        a.warmup,
        a.rounds,
        not a.no_h2load and h2load_client.available(),
        a.out_dir,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    doc = run(cfg)
    write_report(cfg.out_dir, "protocol_bench", doc, markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
