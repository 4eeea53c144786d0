#!/usr/bin/env bash
# One prepared GPU check for a single H100/H200 with torch, transformers and safetensors (diffusers
# and pytest used when present): writes a full-size random-weight checkpoint, runs the GPU tests,
# then benchmarks every compile mode and attention backend at 1024x1024 (few steps, scaled to 50),
# then CogView4 at its full size (random init on the GPU, nothing written; eager and compiled), and
# writes one JSON (s/image, MFU, FLOPs split, peak memory, compile seconds) within a time budget.
#
#   bash jobs/gpu_check.sh [--dry-run] [--out DIR] [--budget-s 480] [--ckpt DIR]
#
# Each step gets `timeout` of what is left of the budget; the benchmark writes its JSON after every
# variant, so a step cut short still reports what it measured.
set -uo pipefail

DRY_RUN=0
OUT_DIR="${OUT:-./gpu_check_out}"
BUDGET_S=480
CKPT="${CKPT:-/tmp/cogview-ray-full}"
PY="${PYTHON:-python}"
TESTS_MAX_S=150   # the GPU tests' share; the rest goes to the benchmark
STEPS=4           # timed denoising steps per image, reported scaled to 50
CV4_MAX_S=150     # CogView4's share, kept back from the CogView3-Plus benchmark
CV4_STEPS=2       # CogView4 timed steps (two forwards each with guidance), scaled to 50
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --budget-s) BUDGET_S="$2"; shift ;;
    --ckpt) CKPT="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run NAME MAX_S CMD...: a step under `timeout min(MAX_S, budget left)`, its rc and seconds kept
declare -A RC SECS
run() {
  local name="$1" max_s="$2"; shift 2
  local limit; limit=$(left)
  [ "$max_s" -gt 0 ] && [ "$max_s" -lt "$limit" ] && limit="$max_s"
  if [ "$DRY_RUN" = 1 ]; then
    echo "[$name] timeout ${limit}s $*"
    return 0
  fi
  if [ "$limit" -le 10 ]; then
    echo "[$name] skipped: budget spent" >&2; RC[$name]=skipped; SECS[$name]=0; return 0
  fi
  echo "[$name] $* (limit ${limit}s)" >&2
  local t0; t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  RC[$name]=$?; SECS[$name]=$(( $(date +%s) - t0 ))
  tail -n 5 "$OUT_DIR/$name.log" >&2
}

# reserve S: seconds left minus S (at least 1, which `run` skips): a step that leaves S to later ones
reserve() { local r=$(( $(left) - $1 )); [ "$r" -lt 1 ] && r=1; echo "$r"; }

[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT_DIR"
have() { "$PY" -c "import $1" >/dev/null 2>&1; }

if [ "$DRY_RUN" = 0 ]; then
  for m in torch transformers safetensors sentencepiece; do
    have "$m" || { echo "missing Python package: $m" >&2; exit 2; }
  done
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device visible to torch" >&2; exit 2; }
fi

# 1. a full-size random-weight checkpoint (once; reused by a rerun)
if [ -f "$CKPT/.complete" ]; then
  echo "[checkpoint] reusing $CKPT" >&2
else
  run checkpoint 0 "$PY" -c "import sys; from cogview_ray.model.checkpoint import make_checkpoint; \
make_checkpoint('full', sys.argv[1]); open(sys.argv[1] + '/.complete', 'w').write('ok')" "$CKPT"
fi

# 2. the GPU tests (tiny checkpoints; parity with diffusers where it is installed)
if [ "$DRY_RUN" = 1 ] || have pytest; then
  run gpu_tests "$TESTS_MAX_S" "$PY" -m pytest -m gpu tests/model -x -q -p no:cacheprovider
else
  RC[gpu_tests]="skipped: pytest not installed"; SECS[gpu_tests]=0
fi

# 3. the benchmark: attention backends eager, then each compile mode (cheapest first)
REF_FLAG="--skip-reference"
run benchmark "$(reserve "$CV4_MAX_S")" "$PY" jobs/benchmark.py model --checkpoint "$CKPT" --device cuda --dtype bfloat16 \
  --height 1024 --width 1024 --steps "$STEPS" --scale-steps 50 --runs 5 --batch 1 \
  --compile none,default,max-autotune-no-cudagraphs,max-autotune --attention all $REF_FLAG \
  --json-out "$OUT_DIR/benchmark.json"

# 4. CogView4-6B's sizes (built on the GPU with random init: its 31 GB checkpoint would take
#    minutes to write), eager then compiled; no reference (no checkpoint holds these weights)
run benchmark_cogview4 "$CV4_MAX_S" "$PY" jobs/benchmark.py model --random-init full-cogview4 --device cuda \
  --dtype bfloat16 --height 1024 --width 1024 --steps "$CV4_STEPS" --scale-steps 50 --runs 3 --batch 1 \
  --compile none,default --attention auto --json-out "$OUT_DIR/benchmark_cogview4.json"

# 5. the diffusers reference, eager, when installed and time is left
if [ "$DRY_RUN" = 1 ] || have diffusers; then
  run reference 0 "$PY" jobs/benchmark.py model --checkpoint "$CKPT" --device cuda --dtype bfloat16 \
    --height 1024 --width 1024 --steps "$STEPS" --scale-steps 50 --runs 5 --batch 1 \
    --compile none --attention auto --json-out "$OUT_DIR/reference.json"
fi

[ "$DRY_RUN" = 1 ] && exit 0

# one JSON: step results plus every benchmark row
STEPS_JSON="{"
for k in "${!RC[@]}"; do STEPS_JSON+="\"$k\": {\"rc\": \"${RC[$k]}\", \"seconds\": ${SECS[$k]}},"; done
STEPS_JSON="${STEPS_JSON%,}}"
"$PY" - "$OUT_DIR" "$STEPS_JSON" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
from pathlib import Path

out, steps, total = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
summary = {"steps": steps, "total_s": total}
for name in ("benchmark", "benchmark_cogview4", "reference"):
    p = out / f"{name}.json"
    if p.exists():
        summary[name] = json.loads(p.read_text())
summary["table"] = [
    {"family": summary[name].get("family"),
     **{k: r.get(k) for k in ("variant", "attention_used", "s_per_image_scaled", "s_per_image_p50",
                              "s_per_image_p90", "mfu", "peak_memory_gib", "compile_s", "error")}}
    for name in ("benchmark", "benchmark_cogview4", "reference") if name in summary
    for r in summary[name].get("rows", [])]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
for r in summary["table"]:
    print(json.dumps(r))
EOF
echo "wrote $OUT_DIR/gpu_check.json" >&2
