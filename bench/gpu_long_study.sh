#!/usr/bin/env bash
# Issue "evidence", the long GPU studies (what bench/results/search_long-*.log and baselines-*.json came from):
#   1. `autopeft search --task glue/sst2 --n-trials 200 --workers 4` at the preset's GPU fidelity (packs of 8), MiniLM
#      in bf16, four workers sharing one GPU (each pack is host-bound, so four keep the GPU busier than one);
#   2. bench/baselines.py --front-only: that study's front points retrained at the final fidelity, 3 seeds, beside
#      the baseline rows of an earlier baselines-*.json at the same fidelity (--reuse); without REUSE.json the
#      baselines are rerun too.
# Usage (repo root, a CUDA machine, after ../shared/tools/gpu-carry):
#   bash bench/gpu_long_study.sh OUTDIR [bench/results/baselines-....json]
# Environment (defaults: the 2026-11-29 study): STUDY (glue-sst2-long), N_TRIALS (200), MAX_PARAMS (none; e.g. 1%
# for a study constrained to the <= 1% region), TIMEOUT (none; seconds after which no trial starts), OBJECTIVES (the
# preset's; e.g. metric,params), FRONT_TOP (5),
# STEPS ("search front"; run one per device call when both do not fit in one), RUNS (the study's --out),
# JOBS (8: front runs at a time), WORKERS (4: search worker processes; e.g. 8 on two GPUs), both spread round robin
# over the visible GPUs,
# HELDOUT (the preset's 500: examples of the selection split carved from train; a larger one lowers the noise of
# choosing among the front's best points, see the README's evidence section),
# RESCORE (none; N = rank the N best front points under 1% by reruns at the study's fidelity first, see baselines.py).
# Two steps of ~10 and ~4 minutes on an H200; the search resumes (--resume) if it is stopped in between.
# The 2026-11-30 budget studies (README, "both targets met"): one study per budget, each on its own GPU, e.g.
#   CUDA_VISIBLE_DEVICES=1 HELDOUT=2000 OBJECTIVES=metric MAX_PARAMS=16898 TIMEOUT=280 N_TRIALS=1000 STEPS=search \
#     STUDY=glue-sst2-ia3budget-h2000-refuse RUNS=/tmp/rb bash bench/gpu_long_study.sh OUT
# then bench/baselines.py --storage A.db B.db --study A B --rescore 16 --front-top 6 --front-only --reuse ... (both
# in one table), and bench/baselines.py --merge FILE... to join tables retrained in separate runs.
set -uo pipefail
out=${1:?usage: bench/gpu_long_study.sh OUTDIR [REUSE.json]}
reuse=${2:-}
study=${STUDY:-glue-sst2-long}
steps=${STEPS:-search front}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false AUTOPEFT_DATA_DIR=$PWD/.carry/data PYTHONUNBUFFERED=1
backbone=$PWD/.carry/minilm-bf16
runs=${RUNS:-/tmp/autopeft-gpu-long}
if [[ " $steps " == *" search "* ]]; then
  extra=()
  [ -f "$runs/optuna.db" ] && extra+=(--resume)
  [ -n "${MAX_PARAMS:-}" ] && extra+=(--max-params "$MAX_PARAMS")
  [ -n "${TIMEOUT:-}" ] && extra+=(--timeout "$TIMEOUT")
  [ -n "${OBJECTIVES:-}" ] && extra+=(--objectives "$OBJECTIVES")
  [ -n "${HELDOUT:-}" ] && extra+=(--heldout-examples "$HELDOUT")
  autopeft search --task glue/sst2 --backbone "$backbone" --out "$runs" --no-tracking --study "$study" \
    --n-trials "${N_TRIALS:-200}" --workers "${WORKERS:-4}" "${extra[@]}" 2>&1 | grep -v -i warn >>"$out/search_$study.log"
  python - "$runs/optuna.db" "$out/optuna-$study.db" <<'PY'
import sqlite3, sys
src = sqlite3.connect(sys.argv[1]); dst = sqlite3.connect(sys.argv[2]); src.backup(dst); dst.close()
PY
  python bench/study_stats.py "$out/optuna-$study.db" --study "$study" --device "$(python -c \
    'import sys; sys.path.insert(0, "bench"); from common import device_name; print(device_name())')" --out "$out" \
    --notes "autopeft search --workers ${WORKERS:-4} --n-trials ${N_TRIALS:-200} ${MAX_PARAMS:+--max-params $MAX_PARAMS }${OBJECTIVES:+--objectives $OBJECTIVES }${HELDOUT:+--heldout-examples $HELDOUT }(bench/gpu_long_study.sh)"
fi
if [[ " $steps " == *" front "* ]]; then
  python bench/baselines.py --backbone "$backbone" --storage "sqlite:///$runs/optuna.db" --study "$study" \
    --front-top "${FRONT_TOP:-5}" ${RESCORE:+--rescore "$RESCORE"} ${reuse:+--front-only --reuse "$reuse"} --seeds 0 1 2 --jobs "${JOBS:-8}" --out "$out" 2>&1 \
    | grep -v -i warn | tail -40
fi
