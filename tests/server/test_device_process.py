"""``python -m server`` and its device: ``--device cuda`` without CUDA exits 2 naming what is missing,
``--device auto`` says why it uses the CPU and shows it (listening line, cnn_server_info), and on a
GPU host ``--device cuda`` serves a conv net (gpu marker)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.server.gpu_helpers import conv_model, reference, why_no_cuda_provider
from tests.server.helpers import publish

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# What the exit message names: a library the loader cannot load, or the missing provider itself.
MISSING = re.compile(
    r"lib[\w+-]+\.so\.\d+ (?:\(the NVIDIA driver\) )?cannot be loaded|no CUDAExecutionProvider"
    r"|no NVIDIA driver: libcuda\.so\.1|the CPU build, without the CUDA execution provider"
)


class Server:
    """The server as a child process; stdout's JSON events and stderr's log lines read by threads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--poll-interval-s",
                "0",
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self.listening = threading.Event()
        self._readers = [
            threading.Thread(target=self._out, daemon=True),
            threading.Thread(target=self._err, daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _out(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.events.append(json.loads(line))  # stdout holds nothing but events
            if self.events[-1]["event"] == "listening":
                self.listening.set()

    def _err(self) -> None:
        self.stderr.extend(self.proc.stderr)  # type: ignore[arg-type]

    def wait_listening(self, timeout: float = 120) -> dict:
        if not self.listening.wait(timeout):
            raise AssertionError(f"server did not start: {self.log()[-3000:]}")
        return next(e for e in self.events if e["event"] == "listening")

    def exit_code(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(10)
        return code

    def log(self) -> str:
        return "".join(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def spawn():
    started: list[Server] = []

    def start(*args: str) -> Server:
        started.append(Server(*args))
        return started[-1]

    yield start
    for s in started:
        s.kill()


@pytest.fixture(scope="module")
def no_cuda() -> str:
    reason = why_no_cuda_provider()
    if reason is None:
        pytest.skip("CUDA works here; the fallback paths need a machine without it")
    return reason


@pytest.fixture
def conv_repo(tmp_path) -> tuple[Path, bytes]:
    model, meta = conv_model()
    publish(tmp_path / "repo", "conv", 1, model, meta)
    return tmp_path / "repo", model


def classify(port: int, x: np.ndarray) -> pb.ClassifyReply:
    images = [pb.Image(tensor=pb.Tensor(shape=list(img.shape), data=img.tobytes())) for img in x]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return pb_grpc.ClassifierStub(ch).Classify(
            pb.ClassifyRequest(model="conv", images=images), timeout=60
        )


def test_device_cuda_without_cuda_exits_2_naming_what_is_missing(conv_repo, spawn, no_cuda) -> None:
    server = spawn("--repository", str(conv_repo[0]), "--metrics-port", "-1", "--device", "cuda")
    assert server.exit_code() == 2
    (line,) = [ln for ln in server.log().splitlines() if "cannot start:" in ln]
    assert "--device cuda: " in line and MISSING.search(line), line
    assert line.rstrip().endswith("use --device auto to fall back to CPU")
    assert server.events == []  # no listening line: nothing was bound


def test_device_auto_without_cuda_says_why_and_serves_on_the_cpu(conv_repo, spawn, no_cuda) -> None:
    root, model = conv_repo
    server = spawn("--repository", str(root), "--metrics-port", "0", "--device", "auto")
    listening = server.wait_listening()
    assert listening["provider"] == CPU and listening["models"] == [
        {"name": "conv", "versions": [1], "provider": CPU}
    ]
    (line,) = [ln for ln in server.log().splitlines() if "device auto: serving on CPU, because" in ln]
    assert MISSING.search(line), line
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{listening['metrics_port']}/metrics", timeout=10
    ).read()
    assert f'cnn_server_info{{device="auto",provider="{CPU}"}} 1.0' in metrics.decode()
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    reply = classify(listening["port"], x)
    assert [r.predictions[0].class_index for r in reply.results] == list(reference(model, x).argmax(1))
    server.proc.send_signal(signal.SIGTERM)
    assert server.exit_code() == 0


@pytest.mark.gpu
def test_device_cuda_serves_a_conv_net_with_every_conv_on_cuda(conv_repo, spawn) -> None:
    reason = why_no_cuda_provider()
    if reason:
        pytest.skip(reason)
    root, model = conv_repo
    server = spawn(
        "--repository", str(root), "--metrics-port", "-1", "--device", "cuda", "--max-batch-size", "16"
    )
    listening = server.wait_listening()
    assert listening["provider"] == CUDA and listening["models"][0]["provider"] == CUDA
    placement = [
        ln for ln in server.log().splitlines() if f"nodes on {CUDA}" in ln or f"node on {CUDA}" in ln
    ]
    assert placement and "not on CUDA" not in server.log(), server.log()[-3000:]
    x = np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32)
    reply = classify(listening["port"], x)
    assert [r.predictions[0].class_index for r in reply.results] == list(reference(model, x).argmax(1))
    server.proc.send_signal(signal.SIGTERM)
    assert server.exit_code() == 0
