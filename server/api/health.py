"""grpc.health.v1 (overall ``""``, each service, each model by name) and server reflection.

Reflection answers from one descriptor pool holding every service's files: the KServe messages
live in a private pool (see protos/inference/_pool.py), so they are copied in next to ours.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from protos.cnnstack.classifier.v1 import classifier_pb2
from protos.inference import grpc_service_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVICE_NAMES = (CLASSIFIER_SERVICE, KSERVE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)


def create_health() -> health_aio.HealthServicer:
    return health_aio.HealthServicer()


def reflection_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(fd) -> None:  # dependencies first
        if fd.name in added:
            return
        for dep in fd.dependencies:
            add(dep)
        pool.AddSerializedFile(fd.serialized_pb)
        added.add(fd.name)

    for fd in (
        classifier_pb2.DESCRIPTOR,
        grpc_service_pb2.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
    ):
        add(fd)
    return pool


def enable_reflection(server) -> None:
    reflection.enable_server_reflection(SERVICE_NAMES, server, pool=reflection_pool())
