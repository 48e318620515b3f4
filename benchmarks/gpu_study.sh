#!/usr/bin/env bash
# Issue 16's GPU check, run from the repository root of a machine with one CUDA GPU (python3 with this project's
# requirements): the GPU tests (a captured step replays the eager step's numbers; the counter masks' bits), the
# step alone (benchmarks/gpu_step.py), then the README's main study and the CNN's with the graphed step (wall time and
# the epochs' time), and where the main study's command spends its time (cProfile, 3 epochs).
# Writes under $OUT (default /tmp/gpu_study): each study's log, the studies' folders without checkpoints and
# TensorBoard runs (gpu_study.tgz), the profile (profile.txt). $STUDY_ARGS: options added to every study (a smoke
# test on a CPU: '--epochs 1 --trainer.limit_train_batches 5'); $STUDIES: which of mlp_graphed, cnn_graphed,
# cnn_fp32_graphed, mlp_eager, profile to run, in order (default: the MLP and CNN graphed, the profile).
set -u
OUT=${OUT:-/tmp/gpu_study}
WORK=${WORK:-/tmp/gpu_work}
STUDIES=${STUDIES:-mlp_graphed cnn_graphed profile}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, pytorch_lightning as pl, torchmetrics, jsonargparse; print('torch', torch.__version__, \
'lightning', pl.__version__, 'torchmetrics', torchmetrics.__version__, 'jsonargparse', jsonargparse.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -n 2
python3 benchmarks/gpu_step.py

study() { # study NAME TIMEOUT OPTIONS...: one sweep, its wall time and the sum of its epochs' times
    local name=$1 limit=$2
    shift 2
    local start end
    start=$(date +%s.%N)
    # shellcheck disable=SC2086  # STUDY_ARGS is a list of options
    timeout "$limit" python3 -m noise_robustness sweep --out "$WORK/$name" --trainer.enable_progress_bar=false \
        "$@" ${STUDY_ARGS:-} >"$OUT/$name.log" 2>&1
    local rc=$?
    end=$(date +%s.%N)
    echo "$name: exit $rc, command $(python3 -c "print(round($end - $start, 1))") s, epochs (training and" \
        "validation) $(awk '/^epoch [0-9]+\/[0-9]+: / {s += $3} END {printf "%.1f", s}' "$OUT/$name.log") s; epochs:" \
        "$(awk '/^epoch [0-9]+\/[0-9]+: / {printf "%s ", $3}' "$OUT/$name.log")"
}

for name in $STUDIES; do
    case $name in
    mlp_graphed) study mlp_graphed "${MLP_LIMIT:-150}" --model.graphed true ;;
    cnn_graphed) study cnn_graphed "${CNN_LIMIT:-200}" --model.net noise_robustness.models.KerasCNN --model.graphed true ;;
    cnn_fp32_graphed) study cnn_fp32_graphed "${CNN_LIMIT:-200}" --model.net noise_robustness.models.KerasCNN \
        --model.graphed true --trainer.precision 32-true ;;
    mlp_eager) study mlp_eager "${MLP_LIMIT:-150}" ;;
    profile)
        python3 -m cProfile -o "$WORK/profile.out" -m noise_robustness sweep --out "$WORK/profile" --epochs 3 \
            --model.graphed true --trainer.enable_progress_bar=false \
            ${STUDY_ARGS:-} >"$OUT/profile.log" 2>&1
        python3 -c "import pstats; pstats.Stats('$WORK/profile.out').sort_stats('cumulative').print_stats(80)" \
            >"$OUT/profile.txt"
        grep -E "cli_main|run_study|runner.py|report.py|_run_stage|import_module|fit_loop.py:.*\(run\)|trainer.py.*\(test\)" \
            "$OUT/profile.txt" | head -n 16
        ;;
    esac
done
for name in $STUDIES; do [ "$name" = profile ] || grep -v "^epoch" "$OUT/$name.log" | tail -n 2; done
tar czf "$OUT/gpu_study.tgz" -C "$WORK" --exclude=checkpoints --exclude=tensorboard --exclude=locks --exclude="*.pt" \
    $(cd "$WORK" && ls -d mlp_graphed cnn_graphed cnn_fp32_graphed mlp_eager 2>/dev/null)
