"""TorchServe beside cnn-serve, at the front door's loads: ``bench.front_door_bench --torchserve
VENV`` measures it in every round with this module, so the ratios against the fastest peer compare
two servers on one CPU in one run instead of against figures from another machine.

TorchServe runs the same ONNX files as cnn-serve through bench/torchserve_handler.py (onnxruntime,
one thread per Python worker, raw float32 bodies, TorchServe's own batching: ``batchSize`` 64,
``maxBatchDelay`` 2 ms), with 1 and 2 workers per model, over gRPC (``Predictions``) and REST
(``POST /predictions/MODEL``), driven by the same h2load loads as cnn-serve. Before each load one
request on each protocol must answer the ONNX file's own top-1 for a real test image. TorchServe
lives in a virtual environment of its own (it pulls torch, and its Java front end needs a JDK):

    python3 -m venv /opt/torchserve && /opt/torchserve/bin/pip install torchserve==0.12.0 \\
        torch-model-archiver==0.12.0 torch onnxruntime numpy pyyaml   # + a JDK: openjdk-17-jre-headless

Its logs are quiet by default (``logs="quiet"``: warnings only, metrics in Prometheus mode): with
its own log4j2.xml it writes several lines per request, a cost no tuned deployment keeps
(docs/performance.md has both). h2load reads HTTP statuses, not gRPC's trailers: a gRPC request
TorchServe failed would count as answered, which can only flatter TorchServe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.front_door_loads import LOADS, MODELS, Wires, drive, test_images
from bench.procs import free_ports
from cnnstack.contract import scan_model

ROOT = Path(__file__).resolve().parents[1]
HANDLER = Path(__file__).with_name("torchserve_handler.py")
METHOD = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
PORTS = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
# logs="quiet": TorchServe's own log4j2.xml writes a line per request to four files (access, ts
# debug, model and frontend metrics); a benchmark of its best keeps warnings only, in one file.
QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <File name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Root level="warn"><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""


@dataclass(frozen=True)
class PeerBench:
    venv: Path
    repository: Path
    duration_s: float
    warmup_s: float
    grpc_connections: int
    workers: tuple[int, ...]
    batch_size: int
    max_batch_delay_ms: int
    logs: str  # "quiet" (warnings only, metrics in Prometheus mode) or "default" (TorchServe's own)
    out_dir: Path


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def predictions_request(model: str, body: bytes) -> bytes:
    """TorchServe's ``PredictionsRequest{model_name = 1; map<string, bytes> input = 3}`` with one
    input ``data``, serialized by hand: two fields do not need TorchServe's .proto files here."""
    return _field(1, model.encode()) + _field(3, _field(1, b"data") + _field(2, body))


def prediction_of(response: bytes) -> bytes:
    """``PredictionResponse.prediction`` (field 1, bytes): the handler's JSON answer."""
    if not response.startswith(b"\x0a"):
        raise ValueError(f"not a PredictionResponse: {response[:40]!r}")
    length, shift, i = 0, 0, 1
    while True:
        length |= (response[i] & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if not response[i - 1] & 0x80:
            return response[i : i + length]


def model_file(repository: Path, model: str) -> Path:
    """The newest version's model file of ``model`` in the repository, as cnn-serve reads it."""
    versions = scan_model(repository / model).versions
    if not versions:
        raise RuntimeError(f"{repository / model} has no version with a model file")
    return versions[max(versions)].model_path


def archive(cfg: PeerBench, model: str, store: Path) -> None:
    """``MODEL.mar`` in ``store``: the newest ONNX file of ``model`` with the handler."""
    cmd = [str(cfg.venv / "bin/torch-model-archiver"), "--model-name", model, "--version", "1.0"]
    cmd += ["--serialized-file", str(model_file(cfg.repository, model)), "--handler", str(HANDLER)]
    subprocess.run([*cmd, "--export-path", str(store), "--force"], check=True)


def write_properties(cfg: PeerBench, workers: int, store: Path, ports: dict[str, int]) -> Path:
    models = {
        m: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{m}.mar",
                "minWorkers": workers,
                "maxWorkers": workers,
                "batchSize": cfg.batch_size,
                "maxBatchDelay": cfg.max_batch_delay_ms,
                "responseTimeout": 120,
            }
        }
        for m in MODELS
    }
    lines = [f"{k}_address=http://127.0.0.1:{ports[k]}" for k in ("inference", "management", "metrics")]
    lines += [f"{k}_port={ports[k]}" for k in ("grpc_inference", "grpc_management")]
    lines += ["disable_token_authorization=true", f"model_store={store}", f"models={json.dumps(models)}"]
    if cfg.logs == "quiet":
        lines += ["metrics_mode=prometheus", "disable_system_metrics=true"]
    lines.append("load_models=" + ",".join(f"{m}.mar" for m in models))
    path = store.parent / f"config-{workers}w.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def torchserve(cfg: PeerBench, workers: int, store: Path) -> Iterator[tuple[int, dict[str, int]]]:
    """TorchServe with ``workers`` workers per model, READY; yields (launcher pid, ports)."""
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    props = write_properties(cfg, workers, store, ports)
    logs = store.parent / "logs"
    env = {**os.environ, "PATH": f"{cfg.venv / 'bin'}:{os.environ['PATH']}", "LOG_LOCATION": str(logs)}
    env["METRICS_LOCATION"] = str(logs)
    cmd = [str(cfg.venv / "bin/torchserve"), "--foreground", "--ncs", "--ts-config", str(props)]
    if cfg.logs == "quiet":
        (store.parent / "log4j2.xml").write_text(QUIET_LOG4J2)
        cmd += ["--log-config", str(store.parent / "log4j2.xml")]
    proc = subprocess.Popen(
        cmd,
        cwd=store.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(ports["management"], workers, proc, logs)
        yield proc.pid, ports
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the launcher's whole session (the launcher leaves Java running when it is
    stopped), then SIGKILL to whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_ready(
    management: int, workers: int, proc: subprocess.Popen, logs: Path, timeout_s: float = 180.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"torchserve exited with {proc.returncode} while starting: see {logs}/ts_log.log"
            )
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            states = [
                w["status"]
                for m in MODELS
                for w in json.loads(
                    urllib.request.urlopen(f"http://127.0.0.1:{management}/models/{m}").read()
                )[0]["workers"]
            ]
            if states.count("READY") == workers * len(MODELS):
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"torchserve's workers were not READY within {timeout_s:g} s: see {logs}/model_log.log"
    )


def expected_top1(cfg: PeerBench, model: str, x: np.ndarray) -> int:
    """The ONNX file's own answer for ``x`` (1, C, H, W), run here on onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file(cfg.repository, model)), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {session.get_inputs()[0].name: np.repeat(x, 2, axis=0)})[0]
    return int(np.argmax(logits[0]))


def check_answers(ports: dict[str, int], model: str, x: np.ndarray, want: int) -> None:
    """One request per protocol answers ``want`` (top-1), or the round stops."""
    import grpc

    body = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc_inference']}") as channel:
        call = channel.unary_unary(METHOD)
        answer = json.loads(prediction_of(call(predictions_request(model, body), timeout=60)))
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports['inference']}/predictions/{model}",
        data=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    rest = json.loads(urllib.request.urlopen(request, timeout=60).read())
    got = (int(np.argmax(answer[0])), int(np.argmax(rest[0])))
    if got != (want, want):
        raise RuntimeError(
            f"torchserve answered top-1 {got} (gRPC, REST) for {model}; the ONNX file says {want}"
        )


def measure(cfg: PeerBench, pid: int, ports: dict[str, int], load: tuple[str, int, int]) -> dict:
    """Both protocols at one load (``front_door_loads.drive``); the peer's failed requests are data:
    counted and reported, not fatal."""
    model, images, _ = load
    body = np.ascontiguousarray(test_images(model, images), dtype=np.float32).tobytes()
    wires = Wires(
        f"127.0.0.1:{ports['grpc_inference']}",
        METHOD,
        predictions_request(model, body),
        f"http://127.0.0.1:{ports['inference']}/predictions/{model}",
        body,
        {"content-type": "application/octet-stream"},
        blank_reason_is_ok=True,
    )
    return drive(pid, wires, load, cfg.grpc_connections, cfg.duration_s, cfg.warmup_s)


def one_round(cfg: PeerBench, store: Path) -> dict[str, dict]:
    """{"1w": {load key: measure()}, "2w": ...}."""
    firsts = {m: test_images(m, 1) for m in MODELS}  # (1, C, H, W)
    wants = {m: expected_top1(cfg, m, x) for m, x in firsts.items()}
    results: dict[str, dict] = {}
    for workers in cfg.workers:
        with torchserve(cfg, workers, store) as (pid, ports):
            for m, x in firsts.items():
                check_answers(ports, m, x, wants[m])
            # Java compiles its hot paths while it runs: one unmeasured pass at full load first.
            measure(dataclasses.replace(cfg, duration_s=cfg.warmup_s, warmup_s=0.5), pid, ports, LOADS[1])
            results[f"{workers}w"] = {str(load): measure(cfg, pid, ports, load) for load in LOADS}
    return results


def prepare_store(cfg: PeerBench) -> Path:
    """A fresh ``OUT_DIR/torchserve/store`` holding one archive per model of the loads."""
    work = cfg.out_dir / "torchserve"
    shutil.rmtree(work, ignore_errors=True)
    store = work / "store"
    store.mkdir(parents=True)
    for model in MODELS:
        archive(cfg, model, store)
    return store
