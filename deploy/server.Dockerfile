# Server image: onnxruntime-gpu with CUDA 13 and cuDNN 9 as pip wheels ([serve] asks for
# onnxruntime-gpu[cuda,cudnn] on Linux; the server preloads them), so the base needs no CUDA: the
# NVIDIA Container Toolkit mounts the driver. No torch, no build tools at run time.
# Build: docker build -f deploy/server.Dockerfile -t cnnstack-server .
FROM python:3.12.8-slim-bookworm AS build
WORKDIR /src
# Only what cnn-serve and cnn-loadtest import, packaged by deploy/server.pyproject.toml: no
# trainer or exporter file, and only the console scripts that run here.
COPY deploy/server.pyproject.toml pyproject.toml
COPY cnnstack/__init__.py cnnstack/cli.py cnnstack/
COPY cnnstack/contract cnnstack/contract
COPY server server
COPY protos protos
COPY loadtest loadtest
# Only the [serve] extra: onnxruntime-gpu[cuda,cudnn], grpcio, prometheus-client, Pillow, numpy. No torch.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[serve]"

FROM python:3.12.8-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
# What the NVIDIA runtime mounts into a container given a GPU: the driver's CUDA library (libcuda).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility PYTHONUNBUFFERED=1
EXPOSE 8001 8002
USER 65534
ENTRYPOINT ["cnn-serve"]
