#!/usr/bin/env bash
# Issue 16's GPU check, from the repository root of a machine with one CUDA GPU (python3 with this project's
# requirements): the GPU tests (a captured step replays the eager step's numbers; the counter masks' bits), then the
# README's main command with the step graphed and without (wall time, the epochs' time, the same results.csv?), and
# the CNN's study graphed. Writes its logs and tables under $OUT (default /tmp/gpu_study); $STUDY_ARGS, options
# added to every study (a smoke test: '--epochs 1 --trainer.limit_train_batches 5').
set -u
OUT=${OUT:-/tmp/gpu_study}
WORK=${WORK:-/tmp/gpu_work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, pytorch_lightning as pl, torchmetrics, jsonargparse; print('torch', torch.__version__, \
'lightning', pl.__version__, 'torchmetrics', torchmetrics.__version__, 'jsonargparse', jsonargparse.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -3
python3 benchmarks/gpu_step.py

study() {  # study NAME TIMEOUT OPTIONS...: one sweep, its wall time and the sum of its epochs' times
    local name=$1 limit=$2
    shift 2
    local start end
    start=$(date +%s.%N)
    timeout "$limit" python3 -m noise_robustness sweep --out "$WORK/$name" --trainer.enable_progress_bar=false \
        --trainer.logger.init_args.save_dir="$WORK/tb_logs" "$@" ${STUDY_ARGS:-} >"$OUT/$name.log" 2>&1
    local rc=$?
    end=$(date +%s.%N)
    echo "$name: exit $rc, command $(python3 -c "print(round($end - $start, 1))") s, epochs (training and validation) $(awk \
        '/^epoch [0-9]+\/[0-9]+: / {s += $3} END {printf "%.1f", s}' "$OUT/$name.log") s; epochs:" \
        "$(awk '/^epoch [0-9]+\/[0-9]+: / {printf "%s ", $3}' "$OUT/$name.log")"
    cp "$WORK/$name/results.csv" "$OUT/$name.results.csv" 2>/dev/null
    cp "$WORK/$name/summary.md" "$OUT/$name.summary.md" 2>/dev/null
    cp "$WORK/$name/study.yaml" "$OUT/$name.study.yaml" 2>/dev/null
}

study mlp_graphed "${MLP_LIMIT:-150}" --model.graphed true
study cnn_graphed "${CNN_LIMIT:-200}" --model.net noise_robustness.models.KerasCNN --model.graphed true
study mlp_eager "${MLP_LIMIT:-150}"
if cmp -s "$OUT/mlp_graphed.results.csv" "$OUT/mlp_eager.results.csv"; then
    echo "mlp: graphed and eager results.csv identical"
else
    echo "mlp: graphed and eager results.csv DIFFER"
    diff "$OUT/mlp_graphed.results.csv" "$OUT/mlp_eager.results.csv" | head -8
fi
for name in mlp_graphed cnn_graphed mlp_eager; do grep -v "^epoch" "$OUT/$name.log" | tail -n 4; done
