# Trainer + exporter image: CUDA torch (the [train] extra), used by the `trainer` and `exporter` services.
# Build: docker build -f deploy/trainer.Dockerfile -t cnnstack-trainer .
FROM python:3.12.8-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM pytorch/pytorch:2.9.1-cuda13.0-cudnn9-runtime
COPY --from=build /wheels /wheels
# torch comes from the base image (CUDA build); the rest of [train] on top, without replacing torch.
RUN pip install --no-cache-dir numpy matplotlib tqdm onnx onnxscript "onnxruntime-gpu==1.31.*" "protobuf>=6.33.5,<7" \
    && pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["cnn-train"]
