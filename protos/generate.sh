#!/usr/bin/env bash
# Regenerate every Python stub under protos/ (run from anywhere; writes next to the .proto files).
#   protos/generate.sh [OUT_DIR]   # OUT_DIR defaults to the repo root (tests pass a tmp dir)
# Modules import as `protos.<package path>...` because protoc runs with -I at the repo root.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
py="${PYTHON:-$root/.venv/bin/python}"
cd "$root"

gen() {  # gen [--grpc] FILE...
  local grpc=()
  if [ "$1" = "--grpc" ]; then grpc=(--grpc_python_out="$out"); shift; fi
  "$py" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" "${grpc[@]}" "$@"
}

gen --grpc protos/cnnstack/classifier/v1/classifier.proto
gen protos/inference/model_config.proto
gen --grpc protos/inference/grpc_service.proto

# KServe stubs register in a private descriptor pool (see protos/inference/_pool.py) so that they
# can live in one process with tritonclient's identically named `inference.*` messages.
for f in "$out"/protos/inference/model_config_pb2.py "$out"/protos/inference/grpc_service_pb2.py; do
  sed -i \
    -e 's/^DESCRIPTOR = _descriptor_pool\.Default()\.AddSerializedFile(/DESCRIPTOR = _POOL.AddSerializedFile(/' \
    -e 's/^# @@protoc_insertion_point(imports)$/# @@protoc_insertion_point(imports)\nfrom protos.inference._pool import POOL as _POOL/' \
    "$f"
  grep -q '^DESCRIPTOR = _POOL.AddSerializedFile(' "$f" || { echo "generate.sh: could not redirect $f to the private pool" >&2; exit 1; }
done
