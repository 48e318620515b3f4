#!/bin/bash
# The sweep as a SLURM job array: one run (model x σ x seed) per task, each on one GPU, then one
# gathering job that writes results.csv, summary.md and the figures. Submit from the repository root:
#   bash scripts/slurm_sweep_array.sh [sweep options ...]
# e.g. bash scripts/slurm_sweep_array.sh --seeds '[0, 1, 2]' --out sweeps/seeds
# Every task writes its own file under <out>/runs/, so tasks never race on results.csv, and a
# failed or pre-empted task is redone by submitting the same command again (finished runs are skipped).
set -euo pipefail
SWEEP_ARGS=("$@")
source .venv/bin/activate
# The number of runs in this sweep: models x seeds x scales.
N=$(python - "${SWEEP_ARGS[@]}" <<'PY'
import sys
from noise_robustness.sweep import build_parser, split_passthrough
args = build_parser().parse_args(split_passthrough(sys.argv[1:])[0])
print(len(args.models) * len(args.seeds) * len(args.scales))
PY
)
ARRAY=$(sbatch --parsable --job-name=noise-sweep --array=0-$((N - 1)) --gres=gpu:1 --cpus-per-task=4 --time=01:00:00 \
    --output='slurm-%x-%A_%a.out' \
    --wrap="python -m noise_robustness sweep ${SWEEP_ARGS[*]@Q} --run_index \$SLURM_ARRAY_TASK_ID --trainer.accelerator gpu")
sbatch --job-name=noise-sweep-report --dependency=afterany:"$ARRAY" --time=00:20:00 --output='slurm-%x-%j.out' \
    --wrap="python -m noise_robustness sweep ${SWEEP_ARGS[*]@Q} --report_only true --trainer.accelerator cpu"
echo "submitted $N runs as array job $ARRAY, and a report job after it"
