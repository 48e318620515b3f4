#!/bin/bash
# One `fit` on 4 GPUs of one node with DDP: one SLURM task per GPU, and Lightning reads the ranks
# from SLURM's variables. Submit from the repository root:  sbatch scripts/slurm_fit_ddp.sh configs/scale_1.0.yaml
#SBATCH --job-name=noise-fit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4          # must equal --trainer.devices
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
CONFIG=${1:-configs/scale_1.0.yaml}
source .venv/bin/activate
# bf16-mixed halves activation memory and uses tensor cores; drop it for exact fp32 numbers.
srun python -m noise_robustness fit --config "$CONFIG" \
    --trainer.accelerator gpu --trainer.devices 4 --trainer.num_nodes 1 --trainer.strategy ddp \
    --trainer.precision bf16-mixed
