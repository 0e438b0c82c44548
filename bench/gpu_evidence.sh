#!/usr/bin/env bash
# Issue "evidence" on one GPU, in one go (what bench/results/{baselines,tabular}-*.json came from):
#   1. `autopeft search --task glue/sst2` at the preset's GPU fidelity (packs of 8), MiniLM in bf16;
#   2. bench/baselines.py: HF PEFT baselines, full FT, Houlsby/Pfeiffer and that study's front, 3 seeds;
#   3. meanwhile, bench/tabular.py: the tabular benchmark for bench/sampler_efficiency.py (replayed on a CPU).
# Usage (repo root, a CUDA machine, after ../shared/tools/gpu-carry):  bash bench/gpu_evidence.sh OUTDIR
# Runs offline: backbone .carry/minilm-bf16, data .carry/data. Several processes share the one GPU (the runs are
# host-bound at MiniLM size), so the seconds in these files are under that sharing, as their notes say.
set -uo pipefail
out=${1:?usage: bench/gpu_evidence.sh OUTDIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false AUTOPEFT_DATA_DIR=$PWD/.carry/data PYTHONUNBUFFERED=1
backbone=$PWD/.carry/minilm-bf16
runs=${RUNS:-/tmp/autopeft-gpu-runs}
python bench/tabular.py --backbone "$backbone" --data-dir .carry/data --jobs "${TAB_JOBS:-6}" --pack-size 8 \
  --limit "${TAB_LIMIT:-300}" --out "$out/tabular-glue-sst2-minilm.jsonl" --results "$out" >"$out/tabular.log" 2>&1 &
tab=$!
autopeft search --task glue/sst2 --backbone "$backbone" --out "$runs" --no-tracking 2>&1 | grep -v Warning \
  | tee "$out/search.log" | tail -30
python - "$runs" <<'PY' || autopeft search --task glue/sst2 --backbone "$backbone" --out "$runs" --no-tracking \
  --study glue-sst2-unpacked --pack-size 1 2>&1 | grep -v Warning | tee "$out/search-unpacked.log" | tail -30
import sys, optuna
s = optuna.load_study(study_name="glue-sst2", storage=f"sqlite:///{sys.argv[1]}/optuna.db")
n = sum(t.state == optuna.trial.TrialState.COMPLETE for t in s.trials)
print(f"packed study: {n} complete trials"); sys.exit(0 if n >= 12 else 1)
PY
study=glue-sst2; [ -f "$out/search-unpacked.log" ] && study=glue-sst2-unpacked
cp "$runs/optuna.db" "$out/optuna-gpu.db"
python bench/baselines.py --backbone "$backbone" --storage "sqlite:///$runs/optuna.db" --study "$study" \
  --seeds 0 1 2 --jobs "${BASE_JOBS:-6}" --out "$out" 2>&1 | grep -v Warning | tail -25
wait $tab; tail -5 "$out/tabular.log"
