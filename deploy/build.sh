#!/usr/bin/env bash
# Builds cnnstack's images, each with an exact tag (the project version):
#   deploy/build.sh [server] [server-gpu] [trainer] [trainer-cuda] [models]   (default: server trainer)
#     server        deploy/server.Dockerfile, [serve]: plain onnxruntime    cnnstack-server:VERSION
#     server-gpu    deploy/server.Dockerfile, [serve-gpu]: onnxruntime-gpu  cnnstack-server-gpu:VERSION
#     trainer       deploy/trainer.Dockerfile, target cpu: CPU torch        cnnstack-trainer:VERSION
#     trainer-cuda  deploy/trainer.Dockerfile, target cuda: CUDA 13 torch   cnnstack-trainer-cuda:VERSION
#     models        deploy/models.Dockerfile from artifacts/repository      cnnstack-models:VERSION
# Environment:
#   ENGINE        podman or docker (default: podman where installed, else docker)
#   SERVER_BASE, TRAINER_BASE   base images in place of the official python ones (a registry
#                 mirror, or a locally made base where no registry is reachable)
#   CA_BUNDLE     a PEM file that pip inside the build trusts, passed as the build secret ca_bundle
#                 (for a TLS-inspecting proxy between the build and PyPI; nothing of it is kept)
#   TORCH_WHEEL   a local torch-2.13.0+cpu wheel for `trainer`, in place of PyTorch's CPU index
#                 (torch's dependencies then come from PyPI; no CPU torchvision can come with it,
#                 so that image's cnn-train --download says torchvision is missing)
#   TORCH_INDEX_URL   for `trainer-cuda`, in place of PyTorch's CUDA 13 index (PyPI's torch 2.13.0
#                 and torchvision 0.28.0 for Linux x86_64 are the same CUDA 13 builds)
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(server trainer)

common=()
# podman writes OCI images by default, which have no HEALTHCHECK: the Docker format keeps it.
[ "$(basename "$ENGINE")" != podman ] || common+=(--format docker)
if [ -n "${CA_BUNDLE:-}" ]; then
  common+=(--secret "id=ca_bundle,src=$CA_BUNDLE")
fi

build() {  # TAG DOCKERFILE BASE_VAR_VALUE [ARGS...]
  local tag=$1 file=$2 base=$3
  shift 3
  local args=("${common[@]}")
  [ -z "$base" ] || args+=(--build-arg "PYTHON_BASE=$base")
  echo "[build] $tag ($file)"
  local start=$SECONDS
  "$ENGINE" build "${args[@]}" "$@" -f "$file" -t "$tag" .
  echo "[build] $tag: $((SECONDS - start)) s"
}

trainer_args() {
  rm -f deploy/wheels/torch-*.whl
  if [ -n "${TORCH_WHEEL:-}" ]; then
    cp "$TORCH_WHEEL" deploy/wheels/
    # torch comes from the wheel; its dependencies and nothing else from PyPI.
    echo --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg TORCHVISION=
  fi
}

for target in "${targets[@]}"; do
  case "$target" in
    server)
      build "cnnstack-server:$VERSION" deploy/server.Dockerfile "${SERVER_BASE:-}" ;;
    server-gpu)
      build "cnnstack-server-gpu:$VERSION" deploy/server.Dockerfile "${SERVER_BASE:-}" \
        --build-arg SERVE_EXTRA=serve-gpu ;;
    trainer)
      # shellcheck disable=SC2046  # trainer_args prints whole words
      build "cnnstack-trainer:$VERSION" deploy/trainer.Dockerfile "${TRAINER_BASE:-}" --target cpu \
        $(trainer_args) ;;
    trainer-cuda)
      rm -f deploy/wheels/torch-*.whl
      build "cnnstack-trainer-cuda:$VERSION" deploy/trainer.Dockerfile "${TRAINER_BASE:-}" --target cuda \
        --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu130}" ;;
    models)
      "$ENGINE" build -f deploy/models.Dockerfile -t "cnnstack-models:$VERSION" artifacts/repository ;;
    *)
      echo "deploy/build.sh: unknown image '$target' (server, server-gpu, trainer, trainer-cuda, models)" >&2
      exit 2 ;;
  esac
done
