# Server image: onnxruntime-gpu on a CUDA runtime base, no torch, no build tools at run time.
# Build: docker build -f deploy/server.Dockerfile -t cnnstack-server .
FROM python:3.12.8-slim-bookworm AS build
WORKDIR /src
# Only what cnn-serve and cnn-loadtest import, packaged by deploy/server.pyproject.toml: no
# trainer or exporter file, and only the console scripts that run here.
COPY deploy/server.pyproject.toml pyproject.toml
COPY cnnstack/__init__.py cnnstack/
COPY cnnstack/contract cnnstack/contract
COPY server server
COPY protos protos
COPY loadtest loadtest
# Only the [serve] extra: onnxruntime-gpu, grpcio, prometheus-client, Pillow, numpy. No torch.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[serve]"

# onnxruntime-gpu 1.31 links CUDA 13 (libcudart.so.13, libcublas.so.13) and cuDNN 9.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
COPY --from=build /wheels /wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
EXPOSE 8001 8002
USER 65534
ENTRYPOINT ["cnn-serve"]
