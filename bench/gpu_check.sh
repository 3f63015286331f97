#!/usr/bin/env bash
# The GPU check: at most 8 minutes on one GPU machine, one table at the end (OUT/gpu_check.md).
#   1. nvidia-smi name/driver; torch CUDA/cuDNN; onnxruntime and its CUDA probe (a convolution)
#   2. CNN_REQUIRE_GPU=1 pytest -m gpu (a skipped gpu test is a failure there)
#   3. ResNet-18 on Fashion-MNIST (resnet18-fmnist: AMP via precision auto, channels_last);
#      epochs/s and test accuracy against the goal (>= 95% in <= 60 s)
#   4. cnn-export of that run (parity gate), then cnn-serve --device cuda, which loads the model
#      only with every convolution on CUDA
#   5. cnn-loadtest at concurrency 1/64/256 with 1 and 32 images per request (goal: >= 20k
#      images/s with 32), and the in-process onnxruntime ceiling at batch 1/32/256 beside it
#   6. torch.compile on CUDA: compile time and an epoch's images/s against the eager run
#
#   bench/gpu_check.sh [--data-dir DIR] [--out DIR] [--epochs N] [--budget-s S] [--dry-run]
#   bench/gpu_check.sh --device cpu --train-args "--arch lenet5 --epochs 1"   # a rehearsal of the plumbing
#   bench/gpu_check.sh --fetch-wheels     # on a machine with network: small wheels for a bare host, into .whl/
#
# Runs from the working tree on whatever Python it finds ($PYTHON, else .venv/bin/python, else
# python3) with PYTHONPATH=. (no pip install of the project). Wheels carried in .whl/ are unpacked
# into .whl/site (pip --target, no index) and put on PYTHONPATH. Where onnxruntime's CUDA provider
# cannot load (e.g. a CPU-only onnxruntime), one line says so and the server is measured on CPU.
# Every step runs under a time cap taken from one budget (--budget-s, default 470 s), so the whole
# check ends within 8 minutes; a step that runs out says so in the table.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=artifacts/gpu_check
DATA=""
EPOCHS=""
TRAIN_ARGS=""
TRAIN_DEVICE=cuda
BUDGET=470
DRY=0
FETCH=0
while [ $# -gt 0 ]; do
  case $1 in
    --data-dir) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --device) TRAIN_DEVICE=$2; shift 2 ;;
    --train-args) TRAIN_ARGS=$2; shift 2 ;;
    --budget-s) BUDGET=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --fetch-wheels) FETCH=1; shift ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python; } || PY=python3

if [ "$FETCH" = 1 ]; then
  # What a bare host's python3 may lack for the server and the tests: pure-Python gRPC add-ons,
  # protobuf at least as new as the generated stubs, pytest-timeout. Versions as installed here.
  pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("grpcio-health-checking", "grpcio-reflection", "protobuf", "pytest-timeout")))
EOF
)
  set -x
  # shellcheck disable=SC2086
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl $pins
fi

if [ -z "$DATA" ]; then
  DATA=/usr/share/datasets/fashion-mnist
  [ -e data/fashion-mnist/train-images-idx3-ubyte.gz ] && DATA=data/fashion-mnist
fi
LOGS=$OUT/logs
START=$SECONDS

show() {  # print a command, quoting what a shell would otherwise split
  local out="+" a
  for a in "$@"; do
    if [[ $a =~ ^[][A-Za-z0-9_./:=,@%+\$-]+$ ]]; then out+=" $a"; else out+=" $(printf '%q' "$a")"; fi
  done
  echo "$out"
}

left() { echo $((BUDGET - (SECONDS - START))); }

step() {  # NAME CAP COMMAND...: run under min(CAP, budget left), log to LOGS/NAME.log, record rc and seconds
  local name=$1 cap=$2 rc t0=$SECONDS
  shift 2
  show "$@"
  [ "$DRY" = 1 ] && return 0
  [ "$cap" -gt "$(left)" ] && cap=$(left)
  if [ "$cap" -lt 5 ]; then
    printf '%s\t124\t0\tno time left in the %s s budget\n' "$name" "$BUDGET" >>"$OUT/steps.tsv"
    echo "  -> skipped: the budget is spent"
    return 124
  fi
  timeout -k 10 "$cap" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
  echo "  -> exit $rc in $((SECONDS - t0)) s (log: $LOGS/$name.log)"
  return "$rc"
}

SERVER_PID=""
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null
  for _ in $(seq 1 400); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=""
}
trap stop_server EXIT

start_server() {  # DEVICE MAX_BATCH: start cnn-serve in the background; 0 once it listens
  local device=$1 events=$OUT/serve-$1.events
  local cmd=("$PY" -m server --repository "$OUT/repo" --host 127.0.0.1 --port 0 --metrics-port 0
    --device "$device" --max-batch-size "$2" --instances 2 --poll-interval-s 0)
  echo "$(show "${cmd[@]}") &"
  [ "$DRY" = 1 ] && return 0
  "${cmd[@]}" >"$events" 2>"$LOGS/serve-$device.log" &
  SERVER_PID=$!
  local t0=$SECONDS
  while ! grep -q '"event": "listening"' "$events" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID"
      local rc=$?
      SERVER_PID=""
      printf '%s\t%s\t%s\t\n' "serve-$device" "$rc" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
      return "$rc"
    fi
    if [ $((SECONDS - t0)) -gt 90 ] || [ "$(left)" -lt 5 ]; then
      stop_server
      printf '%s\t124\t%s\tno listening line\n' "serve-$device" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
      return 124
    fi
    sleep 0.2
  done
  printf '%s\t0\t%s\t\n' "serve-$device" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
}

listening_field() {  # FIELD: a number from the listening line of the running server
  grep -h '"event": "listening"' "$OUT"/serve-*.events | sed -n "s/.*\"$1\": \([0-9]*\).*/\1/p" | head -1
}

if [ "$DRY" = 1 ]; then
  echo "# dry run: the commands bench/gpu_check.sh would run (python: $PY, data: $DATA, out: $OUT)"
else
  if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA/train-images-idx3-ubyte" ]; then
    echo "gpu_check: no Fashion-MNIST in $DATA (its four .gz files); pass --data-dir DIR" >&2
    exit 2
  fi
  rm -rf "$OUT" && mkdir -p "$LOGS"
fi

PYPATH=$ROOT
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 120 "$PY" -m pip install --quiet --no-deps --no-index --upgrade --target .whl/site .whl/*.whl
  PYPATH=$ROOT:$ROOT/.whl/site
fi
export PYTHONPATH=$PYPATH${PYTHONPATH:+:$PYTHONPATH}
[ "$DRY" = 1 ] && echo "+ export PYTHONPATH=$PYTHONPATH"

# 1. The machine.
if [ "$DRY" = 1 ] || command -v nvidia-smi >/dev/null; then
  step nvidia-smi 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  [ "$DRY" = 1 ] || cp "$LOGS/nvidia-smi.log" "$OUT/nvidia-smi.csv"
else
  printf 'nvidia-smi\t127\t0\tnvidia-smi not found\n' >>"$OUT/steps.tsv"
  echo "nvidia-smi not found: no NVIDIA driver tools on this host"
fi
step env 90 "$PY" -m bench.gpu_check env "$OUT"

# 2. The gpu tests; a skip is a failure here.
mapfile -t GPU_TESTS < <(grep -rlE --include='test_*.py' 'mark\.gpu' tests | sort)
step pytest 150 env CNN_REQUIRE_GPU=1 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest.xml" "${GPU_TESTS[@]}"

# 3. Training; 4. export.
train=("$PY" -m trainer --preset resnet18-fmnist --device "$TRAIN_DEVICE" --data-dir "$DATA" --overwrite --quiet)
[ -n "$EPOCHS" ] && train+=(--epochs "$EPOCHS")
# shellcheck disable=SC2206  # --train-args is split into words on purpose
[ -n "$TRAIN_ARGS" ] && train+=($TRAIN_ARGS)
step train 150 "${train[@]}" --out "$OUT/train"
step export 90 "$PY" -m exporter "$OUT/train" --repository "$OUT/repo" --name resnet18 --data-dir "$DATA" \
  --max-batch-size 256 --bench-seconds 0.5 --no-progress

# 4. cnn-serve --device cuda, or on CPU where the CUDA provider cannot load.
DEVICE=$TRAIN_DEVICE
MAX_BATCH=256
[ "$DEVICE" = cpu ] && MAX_BATCH=64
if [ "$DRY" = 0 ] && [ ! -f "$OUT/repo/resnet18/1/model.onnx" ]; then
  printf 'serve-%s\t1\t0\tnothing to serve: the export published no model\n' "$DEVICE" >>"$OUT/steps.tsv"
  echo "nothing to serve: the export published no model"
elif ! start_server "$DEVICE" "$MAX_BATCH" && [ "$DEVICE" = cuda ]; then
  REASON=$(grep -h -m1 'cannot start:' "$LOGS/serve-cuda.log" 2>/dev/null | sed 's/.*cannot start: //')
  echo "CUDA serving not possible here: ${REASON:-the server did not start (see $LOGS/serve-cuda.log)}; measuring the server on CPU"
  DEVICE=cpu
  MAX_BATCH=64
  start_server cpu "$MAX_BATCH"
fi
[ "$DRY" = 1 ] && echo "# (only if the CUDA server exits 2: the same with --device cpu --max-batch-size 64)"
PORT=$(listening_field port 2>/dev/null)
MPORT=$(listening_field metrics_port 2>/dev/null)
[ "$DRY" = 1 ] && PORT='$PORT' MPORT='$METRICS_PORT'
if [ "$DRY" = 0 ]; then
  "$PY" - "$OUT" "$DEVICE" "${REASON:-}" "$TRAIN_DEVICE" <<'EOF'
import json, pathlib, sys
out, device, reason, asked = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
events = out / f"serve-{device}.events"
lines = [json.loads(l) for l in events.read_text().splitlines() if l.strip()] if events.is_file() else []
listening = next((e for e in lines if e.get("event") == "listening"), {})
served = {"device": device if listening else None, "asked": asked, "listening": listening, "cuda_reason": reason}
(out / "serve.json").write_text(json.dumps(served))
EOF
fi

# 5. Load against it, then the in-process ceiling of the same model file.
if [ -n "$PORT" ]; then
  PROCS=$(( $(nproc) / 4 )); [ "$PROCS" -lt 1 ] && PROCS=1; [ "$PROCS" -gt 4 ] && PROCS=4
  for n in 1 32; do
    step "loadtest-x$n" 60 "$PY" -m loadtest --target "127.0.0.1:$PORT" --model resnet18 --concurrency 1,64,256 \
      --images-per-request "$n" --duration 6 --warmup 1 --window 1 --processes "$PROCS" --quiet \
      --metrics-url "http://127.0.0.1:$MPORT/metrics" --csv "$OUT/loadtest-x$n.csv" --out "$OUT/loadtest-x$n.json"
  done
fi
stop_server
[ "$DRY" = 1 ] || [ -f "$OUT/repo/resnet18/1/model.onnx" ] && step ceiling 45 "$PY" -m bench.gpu_check ceiling --model "$OUT/repo/resnet18/1/model.onnx" --device "$DEVICE" \
  --batches 1,32,256 --out "$OUT/ceiling.json"

# 6. torch.compile: a shorter run, its epochs set against the eager run's.
if [ "$TRAIN_DEVICE" = cuda ]; then
  step compile 120 "${train[@]}" --compile --epochs 2 --max-train 30000 --out "$OUT/train-compile"
fi

if [ "$DRY" = 1 ]; then
  show "$PY" -m bench.gpu_check table "$OUT"
  exit 0
fi
echo $((SECONDS - START)) >"$OUT/total_s"
echo
"$PY" -m bench.gpu_check table "$OUT"
echo "(also in $OUT/gpu_check.md; logs in $LOGS)"
