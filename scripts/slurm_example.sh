#!/bin/bash
# Multi-node DDP training on SLURM that survives preemption and time limits.
#
#   sbatch scripts/slurm_example.sh                      # edit the #SBATCH lines for your cluster first
#   sbatch scripts/slurm_example.sh optim.lr=3e-4        # extra arguments are Hydra overrides
#
# One task per GPU (--ntasks-per-node = --gpus-per-node = hardware.devices), so Lightning uses SLURM's
# processes instead of launching its own. 120 s before the time limit SLURM sends SIGUSR1: Lightning saves
# <run dir>/hpc_ckpt_N.ckpt and requeues the job (scontrol requeue). The requeued job keeps its job id, so
# it gets the same run directory, and ckpt_path=last resumes from the newest checkpoint there.
#
# For sweeps, `sft-train -m hydra/launcher=slurm ...` submits array jobs instead (README, "SLURM").
#SBATCH --job-name=sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=outputs/%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

# Not timestamped: a requeued job must find its checkpoints, and every task must agree on the directory.
RUN_DIR="outputs/slurm/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"

srun .venv/bin/sft-train \
    experiment=medium_ddp_bf16 \
    hardware.devices="${SLURM_NTASKS_PER_NODE}" \
    hardware.num_nodes="${SLURM_NNODES}" \
    hydra.run.dir="${RUN_DIR}" \
    ckpt_path=last \
    "$@"
