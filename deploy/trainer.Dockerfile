# Trainer + exporter image: CUDA torch at the project's pin (2.13.0) and the C compiler that
# torch.compile needs on CUDA (Triton builds its kernel launchers with gcc against the Python
# headers, which this base has). Used by the `trainer` and `exporter` services.
# Build: docker build -f deploy/trainer.Dockerfile -t cnnstack-trainer .
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
# The CUDA 13 build of torch; its nvidia-* wheels bring the CUDA runtime, cuBLAS and cuDNN 9.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0
COPY --from=build /wheels /wheels
# The rest of [train] on top; torch==2.13.0 is already met by the CUDA build.
RUN pip install --no-cache-dir "$(ls /wheels/cnnstack-*.whl)[train]" && rm -rf /wheels
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility PYTHONUNBUFFERED=1
ENTRYPOINT ["cnn-train"]
