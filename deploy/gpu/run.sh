#!/usr/bin/env bash
# The GPU run, made by one `device` call (about 5 minutes on an H200), and
# rehearsed here on the CPU with the very same bundle and script:
#
#   bash deploy/gpu/bundle.sh                    # here: pack deploy/gpu/bundle/
#   bash deploy/gpu/run.sh --device cuda         # there, carry ["deploy/gpu/bundle"]
#   bash deploy/gpu/run.sh --device cpu          # here: the rehearsal
#
# It starts nothing that needs the network (a tansu broker on loopback, the
# stages as processes) and measures, with `sluice bench batching`, the raw model,
# the inferrer in memory and through the broker, and the four-stage pipeline, by
# batch size, in fp32 and bf16 (windows in bf16 too), with the LSTM and the near-free stock-light model
# beside it, while nvidia-smi samples the GPU's memory and utilisation. It writes
# $OUT/gpu.md and $OUT/gpu.json (copy both to docs/benchmarks/), $OUT/run.log and
# $OUT/raw.tar.gz (every run's own report). Options:
#   --device cuda|cpu   --events N   --sizes A,B,..   --repeats N   --precisions fp32,bf16
#   --budget-s S        each precision's run is stopped after S seconds (what it measured by then is
#                       lost; default 200 on CUDA, so that the call stays under 8 minutes, 900 here)
set -uo pipefail

DEVICE=cuda EVENTS="" SIZES=256,1024,4096 REPEATS=3 PRECISIONS=fp32,bf16 BUDGET_S=
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --events) EVENTS="$2"; shift 2 ;;
        --sizes) SIZES="$2"; shift 2 ;;
        --repeats) REPEATS="$2"; shift 2 ;;
        --precisions) PRECISIONS="$2"; shift 2 ;;
        --budget-s) BUDGET_S="$2"; shift 2 ;;
        *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
# Enough events for a few full batches of the largest size on a GPU; fewer for
# the rehearsal, where the CPU computes every one of them.
[ -n "$EVENTS" ] || { [ "$DEVICE" = cuda ] && EVENTS=16384 || EVENTS=4096; }
[ -n "$BUDGET_S" ] || { [ "$DEVICE" = cuda ] && BUDGET_S=200 || BUDGET_S=900; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUNDLE="$ROOT/deploy/gpu/bundle"
OUT="${OUT:-/tmp/sluice-gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
: > "$LOG"
log() { printf '%s run.sh: %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG" >&2; }
[ -f "$BUNDLE/sluice.gz" ] || { log "no bundle at $BUNDLE: run deploy/gpu/bundle.sh first"; exit 1; }

WORK="$(mktemp -d /tmp/sluice-gpu.XXXXXX)"
cp -r "$BUNDLE/cache" "$WORK/cache"
gunzip "$WORK/cache/bin/tansu.gz" && chmod +x "$WORK/cache/bin/tansu"
gunzip -c "$BUNDLE/sluice.gz" > "$WORK/sluice" && chmod +x "$WORK/sluice"

# libtorch: the GPU machine's image has it in /opt/torch/.venv (with
# libtorch_cuda.so); here, the setup's venv.
PY=""
for candidate in "${TORCH_PYTHON:-}" /opt/torch/.venv/bin/python "${SLUICE_CACHE:-$HOME/.cache/sluice}/venv/bin/python"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import torch' 2>/dev/null; then PY="$candidate"; break; fi
done
[ -n "$PY" ] || { log "no Python with torch found (set TORCH_PYTHON)"; exit 1; }
TORCH_LIB="$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SLUICE_CACHE="$WORK/cache" RUST_LOG="${RUST_LOG:-warn}" RUST_BACKTRACE=0
log "bundle $(cat "$BUNDLE/commit"), device $DEVICE, events $EVENTS, sizes $SIZES, repeats $REPEATS, precisions $PRECISIONS"
log "libtorch from $TORCH_LIB ($("$PY" -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "no cuda")'))"
"$WORK/sluice" --version >> "$LOG" 2>&1 || { log "the binary does not start"; exit 1; }

SMI_PID=""
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$WORK/gpu.txt" 2>&1 || true
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 250 \
        > "$WORK/smi.csv" 2>/dev/null &
    SMI_PID=$!
fi

: > "$WORK/phases"
for precision in ${PRECISIONS//,/ }; do
    log "batching, $precision"
    echo "$precision start $(date +%s.%N)" >> "$WORK/phases"
    # A model in bf16 or fp16 gets its windows in that precision too: half the
    # bytes through the broker, the same inputs (normalizer.window_precision).
    SLUICE_INFERRER__MODEL__DEVICE="$DEVICE" SLUICE_INFERRER__MODEL__PRECISION="$precision" \
        SLUICE_NORMALIZER__WINDOW_PRECISION="$precision" \
        timeout --signal=INT "$BUDGET_S" "$WORK/sluice" bench batching --events "$EVENTS" --sizes "$SIZES" \
        --waits 5 --repeats "$REPEATS" --out-dir "$WORK/runs/$precision" > "$WORK/$precision.out" 2>> "$LOG"
    status=$?
    # A run stopped by the budget leaves its broker and stages behind.
    pkill -f "$WORK/sluice run" 2> /dev/null; pkill -f "$WORK/cache/bin/tansu" 2> /dev/null
    echo "$precision end $(date +%s.%N) $status" >> "$WORK/phases"
    log "batching, $precision: exit $status"
done
[ -n "$SMI_PID" ] && kill "$SMI_PID" 2> /dev/null

"$PY" "$ROOT/deploy/gpu/summarise.py" --work "$WORK" --device "$DEVICE" --commit "$(cat "$BUNDLE/commit")" --out "$OUT" \
    >> "$LOG" 2>&1 || log "summarising failed"
tar czf "$OUT/raw.tar.gz" -C "$WORK" $( [ -d "$WORK/runs" ] && echo runs ) phases $( [ -f "$WORK/smi.csv" ] && echo smi.csv ) 2>> "$LOG"
log "wrote $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
