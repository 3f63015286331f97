# syntax=docker/dockerfile:1
# Server image: cnn-serve and cnn-loadtest in a virtualenv built in one stage and copied into the
# next (no wheel files, no compiler, no pip cache left in a layer). No torch, onnx or matplotlib.
#   CPU (default):  [serve], plain onnxruntime, nothing NVIDIA        -> cnnstack-server:0.1.0
#   GPU:            --build-arg SERVE_EXTRA=serve-gpu: onnxruntime-gpu with CUDA 13, cuBLAS and
#                   cuDNN 9 as pip wheels, so the base needs no CUDA: the NVIDIA Container Toolkit
#                   mounts the driver                                -> cnnstack-server-gpu:0.1.0
# deploy/build.sh builds both; see docs/deployment.md#images.
#   PYTHON_BASE   the base of both stages (a Debian with python3 and its venv module)
#   secret ca_bundle  a PEM bundle pip trusts (a TLS-inspecting proxy between the build and PyPI)
ARG PYTHON_BASE=python:3.12.8-slim-bookworm

FROM ${PYTHON_BASE} AS build
ARG SERVE_EXTRA=serve
WORKDIR /src
# Only what cnn-serve and cnn-loadtest import, packaged by deploy/server.pyproject.toml: no
# trainer or exporter file, and only the console scripts that run here.
COPY deploy/server.pyproject.toml pyproject.toml
# The dependencies first, from the project file alone (no package found yet: an empty install), so
# that a change of code reuses this layer. pip's cache is a build cache mount: reused by the next
# build on this machine, never in a layer.
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && python3 -m venv /opt/cnnstack \
    && /opt/cnnstack/bin/pip install -q --disable-pip-version-check ".[${SERVE_EXTRA}]" \
    && mkdir -p /home/cnnstack /models
COPY cnnstack/__init__.py cnnstack/cli.py cnnstack/
COPY cnnstack/contract cnnstack/contract
COPY server server
COPY protos protos
COPY loadtest loadtest
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && /opt/cnnstack/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall .

FROM ${PYTHON_BASE}
COPY --from=build /opt/cnnstack /opt/cnnstack
COPY --from=build --chown=65534:65534 /home/cnnstack /home/cnnstack
# HOME: a writable home for uid 65534 (whose passwd entry says /nonexistent). ORT_DISABLE_TELEMETRY:
# onnxruntime 1.31 on Linux otherwise starts its 1DS telemetry at the first session, persisting a
# device id and an event cache under $HOME/.cache/Microsoft and uploading events; this variable is
# its documented full opt-out (no uploader, no device id written). CNN_SERVE_*: the flags' defaults
# inside a container (every interface, the repository at /models); flags still win.
ENV PATH=/opt/cnnstack/bin:$PATH \
    HOME=/home/cnnstack \
    ORT_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CNN_SERVE_HOST=0.0.0.0 \
    CNN_SERVE_REPOSITORY=/models
USER 65534:65534
# HTTP (KServe v2 REST, /v1 classify), gRPC, Prometheus /metrics.
EXPOSE 8000 8001 8002
# grpc.health.v1 on the overall service, on the port the server was told (CNN_SERVE_PORT).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD python -m server.healthcheck --port "${CNN_SERVE_PORT:-8001}"
ENTRYPOINT ["cnn-serve"]
