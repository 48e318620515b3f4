#!/usr/bin/env bash
# Submits the study to Slurm: a job array with one task per seed (scripts/study.sbatch), then a job
# that gathers the tables and figures once every task has ended (and fails, naming the members without
# results, if a task failed). sbatch options go before `--`, study options after it:
#   GPU cluster:  bash scripts/slurm_study.sh --partition=gpu --account=myproj --gres=gpu:1 -- --out /shared/noise_study
#   CPU cluster:  bash scripts/slurm_study.sh --partition=cpu --cpus-per-task=8 -- --out /shared/noise_study
# Rerun the same command to redo failed tasks: finished members are kept, interrupted ones resume.
set -euo pipefail
SBATCH_OPTIONS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    SBATCH_OPTIONS+=("$1")
    shift
done
[ $# -gt 0 ] && shift  # the `--`
# One task per seed; parsing the options here also refuses bad ones before anything is queued.
TASKS=$(python -m noise_robustness sweep "$@" --print_config | python -c 'import sys, yaml; print(len(yaml.safe_load(sys.stdin)["seeds"]))')
SCRIPT=$(dirname "$0")/study.sbatch
ARRAY=$(sbatch --parsable --array="0-$((TASKS - 1))" "${SBATCH_OPTIONS[@]}" "$SCRIPT" "$@")
GATHER=$(sbatch --parsable --dependency="afterany:$ARRAY" "${SBATCH_OPTIONS[@]}" "$SCRIPT" "$@")
echo "array job $ARRAY: $TASKS task(s), one per seed; gather job $GATHER after it"
