# syntax=docker/dockerfile:1
# Trainer + exporter image (cnn-train, cnn-export): torch at the project's pin (2.13.0) and the
# torchvision built for it (0.28.0, for --download), then the project with [train], in a virtualenv
# built in one stage and copied into the next. Two targets:
#   cpu (default, last stage): torch from PyTorch's CPU index          -> cnnstack-trainer:0.1.0
#   cuda: --target cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130: the
#         CUDA 13 torch (its nvidia-* wheels bring CUDA and cuDNN) and the C compiler torch.compile
#         needs on CUDA (Triton builds its launchers with gcc)          -> cnnstack-trainer-cuda:0.1.0
# deploy/build.sh builds both; see docs/deployment.md#images.
#   PYTHON_BASE   the base of every stage (a Debian with python3 and its venv module)
#   TORCH_INDEX_URL, TORCH, TORCHVISION   where torch and torchvision come from, and which
#   secret ca_bundle  a PEM bundle pip trusts (a TLS-inspecting proxy between the build and PyPI)
#   deploy/wheels/  a torch wheel put there (deploy/build.sh TORCH_WHEEL=...) is installed instead
#                   of the index's (a machine that reaches PyPI but not PyTorch's index)
ARG PYTHON_BASE=python:3.11.11-slim-bookworm

FROM ${PYTHON_BASE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH=torch==2.13.0
ARG TORCHVISION=torchvision==0.28.0
COPY deploy/wheels/ /wheels/
# torch before the sources: this layer is reused until the pins or the wheels change. The pip cache
# is a build cache mount: reused by the next build on this machine, never in a layer.
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && python3 -m venv /opt/cnnstack \
    && if ls /wheels/torch-*.whl >/dev/null 2>&1; then \
         /opt/cnnstack/bin/pip install -q --no-index --find-links /wheels --no-deps ${TORCH}; fi \
    && /opt/cnnstack/bin/pip install -q --disable-pip-version-check --index-url "${TORCH_INDEX_URL}" \
         ${TORCH} ${TORCHVISION}
WORKDIR /src
COPY pyproject.toml README.md ./
# The rest of [train] from PyPI, from the project file alone (no package found yet: an empty
# install), so that a change of code reuses this layer; torch==2.13.0 is already met above.
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && /opt/cnnstack/bin/pip install -q --disable-pip-version-check ".[train]" \
    && mkdir -p /home/cnnstack /data /runs /models
COPY cnnstack cnnstack
COPY protos protos
COPY trainer trainer
COPY exporter exporter
COPY server server
COPY loadtest loadtest
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && /opt/cnnstack/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall .

FROM ${PYTHON_BASE} AS runtime
COPY --from=build /opt/cnnstack /opt/cnnstack
# Owned by uid 65534: its home, and the mount points, whose ownership a new named volume takes.
COPY --from=build --chown=65534:65534 /home/cnnstack /home/cnnstack
COPY --from=build --chown=65534:65534 /data /data
COPY --from=build --chown=65534:65534 /runs /runs
COPY --from=build --chown=65534:65534 /models /models
# HOME: a writable home for uid 65534 (torch.compile's and matplotlib's caches). ORT_DISABLE_TELEMETRY:
# onnxruntime's documented opt-out of its telemetry (see deploy/server.Dockerfile).
ENV PATH=/opt/cnnstack/bin:$PATH \
    HOME=/home/cnnstack \
    ORT_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1
USER 65534:65534
ENTRYPOINT ["cnn-train"]

FROM runtime AS cuda
USER 0
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65534:65534

FROM runtime AS cpu
