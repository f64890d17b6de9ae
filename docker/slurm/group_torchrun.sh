#!/usr/bin/env bash
# Multi-node, multi-GPU group-level training with torchrun (PyTorch DDP), one task per node.
#
#   sbatch --nodes=2 docker/slurm/group_torchrun.sh
#
#SBATCH --job-name=dualglow-group
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --output=logs/dualglow-group-%j.out
set -euo pipefail

BIDS_DIR=${BIDS_DIR:-/data/study}
OUT_DIR=${OUT_DIR:-/data/study/derivatives/dualglow}
WORK_DIR=${WORK_DIR:-/scratch/$USER/dualglow-work}   # shared by all nodes: the preprocessing cache
SIF=${SIF:-$HOME/containers/dualglow.sif}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
mkdir -p "$OUT_DIR" "$WORK_DIR"

# Preprocess once before the distributed run, so ranks do not race to fill the cache.
apptainer run --nv --cleanenv -B "$BIDS_DIR":/data:ro -B "$OUT_DIR":/out -B "$WORK_DIR":/work \
  "$SIF" /data /out group --preprocess-only -w /work --nprocs "$SLURM_CPUS_PER_TASK"

srun apptainer exec --nv --cleanenv \
  -B "$BIDS_DIR":/data:ro -B "$OUT_DIR":/out -B "$WORK_DIR":/work \
  "$SIF" torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_node:29500" \
    --no-python dualglow /data /out group \
      -w /work --device cuda --epochs 200 --batch-size 2 --side-info age --resume
