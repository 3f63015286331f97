"""The data plane without a server: ``Inference`` over a fake model version and manager. What every
protocol adapter relies on: a call's status and message, its metrics and statistics, admission
counts, the retry across a version swap, shutdown refusals, parse-then-404, and decoding off the
event loop."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.api.dataplane import Call, Inference, ServerState, error_code, parse_version
from server.errors import ServeError, http_status, invalid, not_found
from server.metrics import HTTP, ServerMetrics
from server.runtime.version import Retired

X = np.zeros((1, 1, 2, 2), np.float32)  # (n, C, H, W)


class FakeVersion:
    """A served version whose batch returns ``x + 1``; ``retired``: refuses (a newer one took over)."""

    def __init__(self, metrics: ServerMetrics, name: str = "m", version: int = 1) -> None:
        self.name, self.version = name, version
        self.metrics = metrics.for_version(name, str(version))
        self.inflight = 0
        self.retired = False
        self.records: list[bool] = []
        self.inputs: list[np.ndarray] = []

    def submit(
        self,
        x: np.ndarray,
        deadline: float | None,
        what: str = "input",
        priority: int = 0,
        timeout_us: int = 0,
        trace: object = None,
    ) -> asyncio.Future:
        if self.retired:
            raise Retired(f"{self.name} v{self.version} retired")
        self.inputs.append(x)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result([x + 1])
        return fut

    def record_request(self, ok: bool, seconds: float) -> None:
        self.records.append(ok)


class FakeManager:
    def __init__(self, *versions: FakeVersion) -> None:
        self.versions = list(versions)
        self.cache = None  # no response cache (tests/server/test_cache*.py test it)

    def resolve(self, name: str, version: int = 0) -> FakeVersion:
        live = [v for v in self.versions if v.name == name and (not version or v.version == version)]
        if not live:
            raise not_found(f"model {name!r} is not loaded")
        return live[-1] if version else max(live, key=lambda v: (not v.retired, v.version))


def make(*versions: FakeVersion, metrics: ServerMetrics | None = None, executor=None) -> Inference:
    metrics = metrics or ServerMetrics(CollectorRegistry())
    return Inference(FakeManager(*versions), metrics, ServerState(ready=True), executor)  # type: ignore[arg-type]


def count(
    metrics: ServerMetrics, code: str, model: str = "m", version: str = "1", rpc: str = "ModelInfer"
) -> float:
    labels = {"rpc": rpc, "protocol": "grpc", "model": model, "version": version, "code": code}
    return metrics.registry.get_sample_value("cnn_requests_total", labels) or 0.0


async def call(inference: Inference, work) -> tuple[object, list[tuple[grpc.StatusCode, str]]]:
    errors: list[tuple[grpc.StatusCode, str]] = []

    async def on_error(status: grpc.StatusCode, message: str) -> str:
        errors.append((status, message))
        return "error"

    return await inference.handle("ModelInfer", work, on_error), errors


def test_a_served_call_is_ok_counted_recorded_and_admitted() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    v1 = FakeVersion(metrics)
    inference = make(v1, metrics=metrics)

    async def work(c: Call):
        served, outputs = await inference.run(c, "m", 0, lambda s: X, None)
        return served.version, outputs[0]

    (version, out), errors = asyncio.run(call(inference, work))
    assert version == 1 and errors == [] and float(out.sum()) == 4.0
    assert count(metrics, "OK") == 1 and v1.records == [True] and v1.inflight == 0
    assert inference.state.summary() == {"admitted": 1, "admitted_ok": 1, "admitted_failed": 0}
    assert inference.state.active == 0


def test_a_serve_error_reaches_the_caller_with_its_status_and_message() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    inference = make(FakeVersion(metrics), metrics=metrics)

    async def work(c: Call):
        await inference.run(c, "m", 0, lambda s: (_ for _ in ()).throw(invalid("input 'x' is bad")), None)

    reply, errors = asyncio.run(call(inference, work))
    assert reply == "error" and errors == [(grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is bad")]
    assert count(metrics, "INVALID_ARGUMENT") == 1
    assert inference.state.admitted == 0  # refused before it reached a queue


def test_an_unknown_model_is_not_found_and_counted_under_no_model() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    inference = make(FakeVersion(metrics), metrics=metrics)

    async def work(c: Call):
        await inference.run(c, "nope", 0, lambda s: X, None)

    _, errors = asyncio.run(call(inference, work))
    assert errors[0][0] == grpc.StatusCode.NOT_FOUND and "'nope'" in errors[0][1]
    assert count(metrics, "NOT_FOUND", model="", version="") == 1


def test_a_bug_is_internal_with_its_type_and_the_server_goes_on(caplog) -> None:
    inference = make(FakeVersion(ServerMetrics(CollectorRegistry())))

    async def work(c: Call):
        raise KeyError("boom")

    _, errors = asyncio.run(call(inference, work))
    assert errors == [(grpc.StatusCode.INTERNAL, "internal error: KeyError: 'boom'")]
    assert "unexpected error while serving a request" in caplog.text  # with its traceback
    assert inference.state.active == 0


def test_a_version_swapped_in_while_decoding_serves_the_call() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    old, new = FakeVersion(metrics, version=1), FakeVersion(metrics, version=2)
    inference = make(old, metrics=metrics)
    seen = []

    def make_input(served):
        seen.append(served.version)
        if served is old:  # version 2 is swapped in while version 1's input is being built
            old.retired = True
            inference.manager.versions.append(new)  # type: ignore[attr-defined]
        return X

    async def work(c: Call):
        served, _ = await inference.run(c, "m", 0, make_input, None)
        return served.version

    version, errors = asyncio.run(call(inference, work))
    assert errors == [] and version == 2 and seen == [1, 2]
    assert (len(old.inputs), len(new.inputs)) == (0, 1)


def test_a_pinned_version_that_retires_is_unavailable_not_rerouted() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    v1 = FakeVersion(metrics)
    v1.retired = True
    inference = make(v1, metrics=metrics)

    async def work(c: Call):
        await inference.run(c, "m", 1, lambda s: X, None)

    _, errors = asyncio.run(call(inference, work))
    assert errors[0][0] == grpc.StatusCode.UNAVAILABLE and "just unloaded" in errors[0][1]


def test_while_stopping_new_calls_are_unavailable() -> None:
    inference = make(FakeVersion(ServerMetrics(CollectorRegistry())))
    inference.state.begin_shutdown()

    async def work(c: Call):
        await inference.run(c, "m", 0, lambda s: X, None)

    _, errors = asyncio.run(call(inference, work))
    assert errors[0][0] == grpc.StatusCode.UNAVAILABLE and "shutting down" in errors[0][1]
    assert not inference.state.serving


def test_a_cancelled_call_is_counted_cancelled_and_propagates() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    inference = make(FakeVersion(metrics), metrics=metrics)

    async def main() -> None:
        async def work(c: Call):
            c.served = inference.manager.resolve("m")
            await asyncio.sleep(10)

        task = asyncio.create_task(call(inference, work))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert count(metrics, "CANCELLED") == 1 and inference.state.active == 0


def test_a_bad_body_of_an_unknown_model_is_not_found_first() -> None:
    inference = make(FakeVersion(ServerMetrics(CollectorRegistry())))

    def bad_body():
        raise invalid("the request's JSON does not parse")

    with pytest.raises(ServeError) as unknown:
        inference.parse(Call(), "nope", 0, bad_body)
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    c = Call()
    with pytest.raises(ServeError) as known:
        inference.parse(c, "m", 0, bad_body)
    assert known.value.code == grpc.StatusCode.INVALID_ARGUMENT and c.served is not None  # counted under m
    assert inference.parse(Call(), "nope", 0, lambda: 7) == 7  # a good body is not resolved here


def test_large_inputs_are_built_on_the_decode_pool() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        inference = make(FakeVersion(ServerMetrics(CollectorRegistry())), executor=pool)
        threads = []

        def make_input(served):
            threads.append(threading.current_thread().name)
            return X

        async def work(c: Call):
            await inference.run(c, "m", 0, make_input, None, offload=False)
            await inference.run(c, "m", 0, make_input, None, offload=True)

        asyncio.run(call(inference, work))
    assert not threads[0].startswith("decode") and threads[1].startswith("decode")


def test_http_calls_are_counted_under_http() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    inference = make(FakeVersion(metrics), metrics=metrics)

    async def main() -> None:
        async def work(c: Call):
            await inference.run(c, "m", 0, lambda s: X, None)

        async def on_error(status, message):
            return None

        await inference.handle("ModelInfer", work, on_error, HTTP)

    asyncio.run(main())
    labels = {"rpc": "ModelInfer", "protocol": "http", "model": "m", "version": "1", "code": "OK"}
    assert metrics.registry.get_sample_value("cnn_requests_total", labels) == 1


@pytest.mark.parametrize(
    ("error", "grpc_code", "http"),
    [
        (invalid("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (not_found("x"), grpc.StatusCode.NOT_FOUND, 404),
        (ServeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 503),
        (ServeError(grpc.StatusCode.UNAVAILABLE, "x"), grpc.StatusCode.UNAVAILABLE, 503),
        (ServeError(grpc.StatusCode.DEADLINE_EXCEEDED, "x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (RuntimeError("x"), grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_errors_map_to_one_grpc_and_one_http_status(error, grpc_code, http) -> None:
    code, _ = error_code(error)
    assert code == grpc_code and http_status(code) == http


@pytest.mark.parametrize(("text", "version"), [("", 0), ("3", 3), ("12", 12)])
def test_a_version_is_empty_or_a_positive_integer(text: str, version: int) -> None:
    assert parse_version(text) == version


@pytest.mark.parametrize("text", ["latest", "-1", "1.0", " 2"])
def test_other_versions_are_invalid(text: str) -> None:
    with pytest.raises(ServeError, match="model_version must be a positive integer"):
        parse_version(text)
