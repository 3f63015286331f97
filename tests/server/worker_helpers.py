"""Helpers of the ``--workers`` tests: channels that each hold their own connection, which worker a
connection reached (the ``cnn-server-pid`` metadata of ServerMetadata), and /metrics sums."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterable, Mapping

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from cnnstack.serverproc import ServerProcess
from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server.api.kserve.grpc import PID_METADATA

X = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
# Without it, channels to one target share one connection (grpc's global subchannel pool), and a
# test could never reach a second worker.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def request(model: str = "tiny") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model=model, images=[pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=X.tobytes()))]
    )


def own_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=OWN_CONNECTION)


def pid_of(channel: grpc.Channel) -> int:
    """The pid of the process serving this channel's connection."""
    stub = ks_grpc.GRPCInferenceServiceStub(channel)
    _, call = stub.ServerMetadata.with_call(ks.ServerMetadataRequest(), timeout=30)
    return int(dict(call.initial_metadata())[PID_METADATA])


def channels_per_worker(
    target: str, pids: Iterable[int], each: int = 1, limit: int = 64
) -> dict[int, list[grpc.Channel]]:
    """Open channels until every pid in ``pids`` serves ``each`` of them (the kernel picks the
    worker of each new connection); extra channels are closed. Fails after ``limit`` channels."""
    want = set(pids)
    out: dict[int, list[grpc.Channel]] = {pid: [] for pid in want}
    for _ in range(limit):
        ch = own_channel(target)
        pid = pid_of(ch)
        assert pid in want, f"a connection reached pid {pid}, not one of the workers {sorted(want)}"
        if len(out[pid]) < each:
            out[pid].append(ch)
        else:
            ch.close()
        if all(len(v) >= each for v in out.values()):
            return out
    for chans in out.values():
        for ch in chans:
            ch.close()
    raise AssertionError(f"{limit} connections did not reach every worker {sorted(want)} {each} time(s)")


def close_all(channels: Mapping[int, list[grpc.Channel]]) -> None:
    for chans in channels.values():
        for ch in chans:
            ch.close()


def metric_sums(url: str, **labels: str) -> dict[str, float]:
    """Sample name -> sum over the series whose labels include ``labels``."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def metrics_url(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.listening['metrics_port']}/metrics"


def wait_event(server: ServerProcess, name: str, timeout_s: float = 60.0, after: int = 0) -> dict:
    """The first event ``name`` among ``server.events[after:]``, waiting for it."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for ev in server.events[after:]:
            if ev.get("event") == name:
                return ev
        assert server.proc is not None and server.proc.poll() is None, server.log_tail()
        time.sleep(0.05)
    raise AssertionError(f"no {name!r} event within {timeout_s:g}s; {server.log_tail()}")
