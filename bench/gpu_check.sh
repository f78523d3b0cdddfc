#!/usr/bin/env bash
# The one prepared GPU run (DESIGN.md): install, measure the card's ceilings once, run the GPU tests, then
# every bench/bench_*.py and the 4096-patch profiles, and write everything under $OUT (default bench/results/<date>-<gpu>/).
# Each step has its own time limit, so that a slow step cannot eat the others, and the whole run a deadline:
# BUDGET seconds (env FUSEDTX_GPU_BUDGET_S, default 480, DESIGN's 8 minutes; not yet measured on an H100).
# A step runs for at most min(its limit, the time left); one that finds no time left is skipped and noted.
# The step limits add up to more than the budget, so a slow run loses its last benches and profiles but
# still writes the summary, well inside the device tool's 600 s per command. The last lines printed are
# the summary. FUSEDTX_GPU_DRY_RUN=1 prints each step's command line ("dry run: ...") instead of running it
# (tests/test_bench.py checks those lines on a CPU, so that the script cannot rot between GPU sessions).
set -uo pipefail
cd "$(dirname "$0")/.."

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd '[:alnum:]-')
OUT="${OUT:-bench/results/$(date +%F)-${gpu:-gpu}}"
mkdir -p "$OUT"
export OUT FUSEDTX_CEILINGS="$OUT/ceilings.json"
summary="$OUT/summary.md"
BUDGET="${FUSEDTX_GPU_BUDGET_S:-480}"  # whole-run deadline in seconds, counted from the script's start
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, note the outcome
  local name=$1 limit=$2; shift 2
  if [ -n "${FUSEDTX_GPU_DRY_RUN:-}" ]; then
    printf 'dry run: %s:' "$name"; printf ' %q' "$@"; echo
    return 0
  fi
  local left=$((BUDGET - SECONDS))
  if [ "$left" -le 0 ]; then
    echo "skipped (out of the run's time budget)" > "$OUT/$name.log"
    echo "- $name: skipped (out of the run's time budget)" >> "$summary"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "- $name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" >> "$summary"
  return 0
}

{
  echo "# fusedtx GPU check, $(date -u +%FT%TZ)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import torch, triton, sys; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}')"
  echo
} > "$summary"

step install 120 python3 -m pip install --no-deps --no-build-isolation --no-index -e .
step check 120 python3 -m fusedtx check  # the self-test first: every family against float64 on this card
# Tuned configs for this card at the 4096-patch shapes; copy $OUT/tuned/*.json to kernels/configs/ to ship them.
export FUSEDTX_CONFIG_DIR="$OUT/tuned"
for model in vit_base_patch16_224 swin_tiny_patch4_window7_224; do
  step "tune_$model" 90 python3 -m fusedtx tune --model "$model" --img-size 1024 --dtype bfloat16
done
step ceilings 60 python3 -c "
import json, os, torch
from fusedtx.bench.harness import measure_ceilings
os.environ.pop('FUSEDTX_CEILINGS')
c = measure_ceilings(torch.device('cuda'))
open('$FUSEDTX_CEILINGS', 'w').write(json.dumps(c))
print(c)"
step tests 180 python3 -m pytest -q -p no:cacheprovider tests
for bench in bench/bench_*.py; do
  name=$(basename "$bench" .py)
  [ "$name" = bench_cpu ] && continue  # the CPU bench (minutes of a CPU's time; a CPU is its target)
  limit=60
  # The attention benches compile FlexAttention and torch.compile peers (tens of seconds each); they
  # write their table after every case, headline case first, so a timeout still leaves results.
  case "$name" in bench_attention | bench_window_attention) limit=120 ;; esac
  step "$name" "$limit" python3 -m "fusedtx.bench.$name" --out "$OUT"
done
# The 4096-patch profiles: ViT-B/16 and Swin-T at 1024 px, bf16, batch 1 and 8.
for model in vit_base_patch16_224 swin_tiny_patch4_window7_224; do
  for batch in 1 8; do
    step "profile_${model}_b$batch" 40 python3 -m fusedtx profile --model "$model" --img-size 1024 \
      --batch "$batch" --dtype bfloat16 --steps 10 --out "$OUT/profile_${model}_b$batch"
  done
done
# The zoo of fusedtx.swap at the same size: BEiT-B (its relative position bias in the fused bias path) and Swin V2-T
# (cosine attention in the window kernel), bf16, batch 1.
for model in beit_base_patch16_224 swinv2_tiny_window8_256; do
  step "profile_${model}_b1" 40 python3 -m fusedtx profile --model "$model" --img-size 1024 --batch 1 \
    --dtype bfloat16 --steps 10 --out "$OUT/profile_${model}_b1"
done
# The high-resolution strategies side by side (fusedtx profile --strategy all) at 1024 px, bf16.
step strategies 60 python3 -m fusedtx profile --strategy all --img-size 1024 --batch 1 --dtype bfloat16 --steps 5 \
  --out "$OUT/strategies"

{
  echo
  echo "## ceilings"
  cat "$FUSEDTX_CEILINGS" 2>/dev/null
  echo
  echo "## tests"
  tail -n 3 "$OUT/tests.log" 2>/dev/null
  for md in "$OUT"/*.md "$OUT"/profile_*/report.md "$OUT"/strategies/strategies.md; do
    case "$md" in "$summary") continue ;; esac
    [ -f "$md" ] && { echo; cat "$md"; }
  done
} >> "$summary"
cat "$summary"
