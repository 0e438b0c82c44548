#!/usr/bin/env bash
# Issue "evidence", the 200-trial study (what bench/results/search_long-*.log and baselines-*.json came from):
#   1. `autopeft search --task glue/sst2 --n-trials 200 --workers 4` at the preset's GPU fidelity (packs of 8), MiniLM
#      in bf16, four workers sharing one GPU (each pack is host-bound, so four keep the GPU busier than one);
#   2. bench/baselines.py --front-only: that study's front points retrained at the final fidelity, 3 seeds, beside
#      the baseline rows of an earlier baselines-*.json at the same fidelity (--reuse); without REUSE.json the
#      baselines are rerun too.
# Usage (repo root, a CUDA machine, after ../shared/tools/gpu-carry):
#   bash bench/gpu_long_study.sh OUTDIR [bench/results/baselines-....json]
# Two steps of ~10 and ~4 minutes on an H200; the search resumes (--resume) if it is stopped in between.
set -uo pipefail
out=${1:?usage: bench/gpu_long_study.sh OUTDIR [REUSE.json]}
reuse=${2:-}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false AUTOPEFT_DATA_DIR=$PWD/.carry/data PYTHONUNBUFFERED=1
backbone=$PWD/.carry/minilm-bf16
runs=${RUNS:-/tmp/autopeft-gpu-long}
resume=(); [ -f "$runs/optuna.db" ] && resume=(--resume)
autopeft search --task glue/sst2 --backbone "$backbone" --out "$runs" --no-tracking --study glue-sst2-long \
  --n-trials 200 --workers 4 "${resume[@]}" 2>&1 | grep -v -i warn >>"$out/search_long.log"
python - "$runs/optuna.db" "$out/optuna-glue-sst2-long.db" <<'PY'
import sqlite3, sys
src = sqlite3.connect(sys.argv[1]); dst = sqlite3.connect(sys.argv[2]); src.backup(dst); dst.close()
PY
python bench/study_stats.py "$out/optuna-glue-sst2-long.db" --study glue-sst2-long --device "$(python -c \
  'import sys; sys.path.insert(0, "bench"); from common import device_name; print(device_name())')" --out "$out" \
  --notes "autopeft search --workers 4 --n-trials 200 (bench/gpu_long_study.sh)"
python bench/baselines.py --backbone "$backbone" --storage "sqlite:///$runs/optuna.db" --study glue-sst2-long \
  --front-top 5 ${reuse:+--front-only --reuse "$reuse"} --seeds 0 1 2 --jobs 8 --out "$out" 2>&1 \
  | grep -v -i warn | tail -30
