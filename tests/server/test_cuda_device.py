"""The CUDA decisions without a GPU: the start-up probe on a fake onnxruntime whose provider, session
or result is wrong; the node-placement rule on real CPU sessions; the warm-up batch sizes against
what the batcher produces; instances on the GPUs of --gpus and instance_group."""

from __future__ import annotations

import asyncio
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from cnnstack.cli import ConfigError
from cnnstack.contract import RepositoryError, scan_repository
from protos.inference import model_config_pb2 as mc
from server.config import ServerConfig
from server.runtime import cuda
from server.runtime.batcher import Batcher, batch_sizes
from server.runtime.cuda import CPU, CUDA, DeviceError
from server.runtime.devices import instance_devices, instance_groups
from server.runtime.loader import ServingSettings, load_version, warmup_batch_sizes
from server.runtime.placement import (
    RECORD_KEY,
    conv_placement_problem,
    describe,
    profiled_placement,
    recorded_placement,
)
from server.runtime.queue import QueuePolicy, RequestQueue
from server.runtime.sessions import create_session, session_options
from tests.server.gpu_helpers import conv_model
from tests.server.helpers import publish


class FakeSession:
    def __init__(self, ort_module: FakeOrt, providers: list) -> None:
        self.ort = ort_module
        self.providers_asked = providers
        self.fallback = True

    def get_providers(self) -> list[str]:
        return self.ort.session_providers

    def disable_fallback(self) -> None:
        self.fallback = False

    def run(self, outputs, feed):
        if self.ort.run_error:
            raise RuntimeError(self.ort.run_error)
        _, x, expected = cuda.probe_case()
        np.testing.assert_array_equal(feed["x"], x)
        return [expected + self.ort.error]


class FakeOrt:
    """The part of the onnxruntime module the probe uses; each attribute is one way to be wrong."""

    __version__ = "9.9.9-fake"

    def __init__(self, tmp: Path, **wrong) -> None:
        self.__file__ = str(tmp / "onnxruntime" / "__init__.py")  # no capi/ next to it
        self.available = wrong.get("available", [CUDA, CPU])
        self.session_providers = wrong.get("session_providers", [CUDA, CPU])
        self.create_error = wrong.get("create_error")
        self.run_error = wrong.get("run_error")
        self.error = wrong.get("error", 0.0)
        self.fail_on = wrong.get("fail_on")  # a device id whose session cannot be created
        self.sessions: list[FakeSession] = []
        self.kwargs: list[dict] = []

    def get_available_providers(self) -> list[str]:
        return self.available

    def SessionOptions(self):  # noqa: N802  (onnxruntime's name)
        return SimpleNamespace(log_severity_level=2, add_session_config_entry=lambda k, v: None)

    def InferenceSession(self, model, sess_options=None, providers=(), **kwargs):  # noqa: N802
        self.kwargs.append(kwargs)
        options = providers[0][1]
        if self.create_error or options["device_id"] == str(self.fail_on):
            raise RuntimeError(
                self.create_error or f"CUDA failure 101: invalid device ordinal {options['device_id']}"
            )
        session = FakeSession(self, list(providers))
        self.sessions.append(session)
        return session


def test_the_probe_passes_only_a_correct_convolution_on_cuda_with_fallback_off(tmp_path) -> None:
    good = FakeOrt(tmp_path)
    assert cuda.probe_gpu(1, "EXHAUSTIVE", good) is None
    (session,) = good.sessions
    assert session.providers_asked == [(CUDA, {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"})]
    assert good.kwargs == [{"enable_fallback": 0}] and session.fallback is False


@pytest.mark.parametrize(
    ("wrong", "expected"),
    [
        ({"available": [CPU]}, "has no CUDAExecutionProvider: install onnxruntime-gpu"),
        ({"session_providers": [CPU]}, r"did not load \(the session got \['CPUExecutionProvider'\]\)"),
        ({"create_error": "CUDA failure 100: no CUDA-capable device"}, "no CUDA-capable device"),
        (
            {"run_error": "Could not load library libcudnn_cnn.so.9"},
            "did not run a convolution on GPU 0.*libcudnn_cnn",
        ),
        ({"error": 1.0}, "gave a wrong result .*max abs error 1"),
    ],
)
def test_the_probe_says_what_is_wrong(tmp_path, wrong: dict, expected: str) -> None:
    reason = cuda.probe_gpu(0, "HEURISTIC", FakeOrt(tmp_path, **wrong))
    assert reason is not None
    assert __import__("re").search(expected, reason), reason
    if "available" not in wrong and "error" not in wrong:
        assert "needs an NVIDIA driver, CUDA 13 and cuDNN 9" in reason
        assert "has no libonnxruntime_providers_cuda.so" in reason  # the fake has no capi/ folder


def test_resolve_device_cuda_raises_auto_falls_back_and_every_gpu_is_probed(
    tmp_path, caplog, monkeypatch
) -> None:
    monkeypatch.setattr(cuda, "driver_error", lambda: None)  # as on a host with the NVIDIA driver
    assert cuda.resolve_device("cuda", (0, 1), ort_module=FakeOrt(tmp_path)) == CUDA
    broken = FakeOrt(tmp_path, fail_on=1)
    with pytest.raises(
        DeviceError, match=r"--device cuda: .*GPU 1 .*invalid device ordinal 1.*--device auto"
    ):
        cuda.resolve_device("cuda", (0, 1), ort_module=broken)
    with caplog.at_level(logging.WARNING, logger="server.runtime.cuda"):
        assert cuda.resolve_device("auto", (0, 1), ort_module=broken) == CPU
    assert "device auto: serving on CPU, because" in caplog.text and "GPU 1" in caplog.text
    assert cuda.resolve_device("cpu", ort_module=broken) == CPU


@pytest.mark.parametrize("cpu_build", [True, False])
def test_where_cuda_cannot_be_tried_nothing_is_preloaded_or_probed(
    tmp_path, caplog, monkeypatch, cpu_build: bool
) -> None:
    """The CPU install (no CUDA provider), or the GPU install on a host without the NVIDIA driver:
    one plain line says why auto serves on CPU; no preload, no CUDA session; cuda fails with it."""
    fake = FakeOrt(tmp_path, available=[CPU] if cpu_build else [CUDA, CPU])
    fake.preload_dlls = lambda: pytest.fail("preloaded NVIDIA libraries")
    monkeypatch.setattr(cuda, "pip_library_dirs", lambda: [tmp_path])  # as if NVIDIA wheels were here
    monkeypatch.setattr(cuda, "driver_error", lambda: None if cpu_build else "libcuda.so.1: cannot open")
    expected = "is the CPU build, without the CUDA execution provider" if cpu_build else "no NVIDIA driver"
    with caplog.at_level(logging.INFO, logger="server.runtime.cuda"):
        assert cuda.resolve_device("auto", (0,), ort_module=fake) == CPU
    (record,) = [r for r in caplog.records if r.name == "server.runtime.cuda"]
    assert record.levelno == logging.INFO and "device auto: serving on CPU, because" in record.message
    assert expected in record.message and fake.sessions == []
    with pytest.raises(DeviceError, match=f"--device cuda: .*{expected}"):
        cuda.resolve_device("cuda", (0,), ort_module=fake)


def test_preloading_keeps_onnxruntimes_prints_off_stdout(tmp_path, monkeypatch, capsys) -> None:
    calls = []
    fake = SimpleNamespace(
        preload_dlls=lambda: (calls.append(1), print("Failed to load libcudnn.so.9: nope"))
    )
    monkeypatch.setattr(cuda, "pip_library_dirs", lambda: [tmp_path])
    assert cuda.preload_libraries(fake) == ["Failed to load libcudnn.so.9: nope"] and calls == [1]
    assert capsys.readouterr().out == ""  # stdout carries the server's JSON events
    monkeypatch.setattr(cuda, "pip_library_dirs", lambda: [])
    assert cuda.preload_libraries(fake) == [] and calls == [1]  # no pip CUDA libraries: nothing to load


def test_the_probe_convolution_matches_onnxruntime_on_the_cpu() -> None:
    model, x, expected = cuda.probe_case()
    session = ort.InferenceSession(model, providers=[CPU])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert (expected > 0).any() and (expected == 0).any()  # Relu active and clipping


def test_a_real_cpu_sessions_placement_fails_the_cuda_rule(tmp_path) -> None:
    model, _meta = conv_model()
    feed = {"input": np.zeros((2, 1, 28, 28), dtype=np.float32)}
    profiled = profiled_placement(ort, model, session_options(1), [CPU], feed)
    so = session_options(1)
    so.add_session_config_entry(RECORD_KEY, "1")
    recorded = recorded_placement(ort.InferenceSession(model, so, providers=[CPU]))
    for placed in (profiled, recorded):
        assert placed is not None and {p.provider for p in placed} == {CPU}
        problem = conv_placement_problem(placed)
        assert problem is not None and problem.startswith("2 convolution(s) not on CUDAExecutionProvider")
        assert "on CPUExecutionProvider" in problem
        assert conv_placement_problem(placed, provider=CPU) is None
    assert describe(recorded or []).startswith(f"{len(recorded or [])} nodes on CPUExecutionProvider")


def test_cuda_sessions_never_fall_back_to_cpu_at_run_time(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(conv_model()[0])
    assert create_session(path, CPU, 1)._enable_fallback is False


def settings(**kw) -> ServingSettings:
    base = dict(
        provider=CPU,
        max_batch_size=8,
        max_queue_delay_s=0.001,
        max_queue_size=16,
        instances=1,
        intra_op_threads=1,
        drain_timeout_s=1.0,
    )
    return ServingSettings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("strict", [True, False])
def test_a_cuda_server_refuses_or_reports_a_model_with_a_convolution_on_cpu(
    tmp_path, monkeypatch, caplog, strict: bool
) -> None:
    """The rule at load: the sessions are real CPU ones posing as CUDA (no GPU here)."""
    import server.runtime.loader
    import server.runtime.sessions

    real = server.runtime.sessions.create_session
    monkeypatch.setattr(
        server.runtime.sessions, "create_session", lambda path, provider, *a: real(path, CPU, 1)
    )
    monkeypatch.setattr(server.runtime.loader, "warmup_batch_sizes", lambda m, p: [1, m])  # CPU-fast warm-up
    model, meta = conv_model()
    publish(tmp_path, "conv", 1, model, meta)
    rm = scan_repository(tmp_path)["conv"]
    s = settings(provider=CUDA, strict_device=strict)
    if strict:
        with pytest.raises(
            RepositoryError, match=r"model.onnx: 2 convolution\(s\) not on CUDA.*conv1 \(Conv on CPU"
        ):
            load_version("conv", rm.config, rm.versions[1], s)
        return
    with caplog.at_level(logging.INFO, logger="server.runtime.loader"):
        loaded = load_version("conv", rm.config, rm.versions[1], s)
    assert (
        "not on CUDAExecutionProvider" in caplog.text and "serving it anyway (--device auto)" in caplog.text
    )
    assert [(g.kind, list(g.gpus)) for g in loaded.config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, [0])
    ]
    for inst in loaded.instances:
        inst.close()


def test_warm_up_covers_every_batch_size_the_batcher_produces() -> None:
    """Random request sizes through a real Batcher: every batch it forms is a warmed-up size on CUDA."""
    max_batch, seen = 8, set()

    def run_batch(x: np.ndarray):
        seen.add(int(x.shape[0]))
        return [x]

    async def drive() -> None:
        queue = RequestQueue(QueuePolicy.simple(10_000))
        with ThreadPoolExecutor(1) as ex:
            task = asyncio.create_task(
                Batcher(queue, run_batch, ex, max_batch_size=max_batch, max_delay_s=0.002).run()
            )
            rng = random.Random(0)
            for _ in range(40):
                futures = [
                    queue.submit(np.zeros((rng.randint(1, max_batch), 1, 1, 1), np.float32))
                    for _ in range(rng.randint(1, 6))
                ]
                await asyncio.gather(*futures)
            queue.put_stop()
            await task

    asyncio.run(drive())
    assert seen <= set(warmup_batch_sizes(max_batch, CUDA)) == set(batch_sizes(max_batch)) == set(range(1, 9))
    assert len(seen) > 4
    assert warmup_batch_sizes(max_batch, CPU) == [1, max_batch] and warmup_batch_sizes(1, CPU) == [1]


def group(count: int = 0, kind=mc.ModelInstanceGroup.KIND_GPU, gpus=()) -> mc.ModelInstanceGroup:
    return mc.ModelInstanceGroup(count=count, kind=kind, gpus=list(gpus))


def test_instances_land_on_the_gpus_of_gpus_and_instance_group() -> None:
    assert instance_devices([], True, (0, 1), 2) == [0, 1, 0, 1]  # --instances per GPU of --gpus
    assert instance_devices([group(2, gpus=[1])], True, (0, 1), 1) == [1, 1]
    assert instance_devices([group(1, gpus=[0]), group(2)], True, (0, 1), 1) == [
        0,
        0,
        1,
        0,
        1,
    ]  # Triton: count per GPU
    assert instance_devices([group(kind=mc.ModelInstanceGroup.KIND_AUTO)], True, (3,), 2) == [3, 3]
    assert instance_devices([group(2), group(1)], False, (0,), 1) == [None] * 3  # CPU: counts add up
    assert instance_devices([], False, (0, 1), 2) == [None, None]
    with pytest.raises(
        RepositoryError, match=r"names GPU\(s\) \[2\], but this server was started with --gpus 0,1"
    ):
        instance_devices([group(1, gpus=[0, 2])], True, (0, 1), 1, "m/config.pbtxt")
    with pytest.raises(RepositoryError, match="kind KIND_CPU on a CUDA server"):
        instance_devices([group(1, kind=mc.ModelInstanceGroup.KIND_CPU)], True, (0,), 1)
    gpu = mc.ModelInstanceGroup.KIND_GPU
    assert [(g.kind, g.count, list(g.gpus)) for g in instance_groups([0, 1, 0])] == [
        (gpu, 2, [0]),
        (gpu, 1, [1]),
    ]
    assert [(g.kind, g.count) for g in instance_groups([None, None])] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]


def test_gpu_flags_and_their_env_vars() -> None:
    cfg = ServerConfig.from_args(
        ["--repository", ".", "--gpus", "0, 1", "--cudnn-conv-algo-search", "EXHAUSTIVE"], {}
    )
    assert cfg.gpu_ids == (0, 1) and cfg.cudnn_conv_algo_search == "EXHAUSTIVE"
    env = ServerConfig.from_args(
        [], {"CNN_SERVE_REPOSITORY": ".", "CNN_SERVE_GPUS": "2", "CNN_SERVE_DEVICE": "cuda"}
    )
    assert env.gpu_ids == (2,) and env.device == "cuda" and env.cudnn_conv_algo_search == "HEURISTIC"
    for bad in ("0,0", "-1", "a", ""):
        with pytest.raises(ConfigError, match="--gpus"):
            ServerConfig(repository=Path("."), gpus=bad)
    with pytest.raises(SystemExit):
        ServerConfig.from_args(["--repository", ".", "--cudnn-conv-algo-search", "FAST"], {})
