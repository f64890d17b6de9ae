#!/usr/bin/env bash
# One participant per SLURM array task (docs/CONTAINERS.md).
#
#   N=$(tail -n +2 /data/study/participants.tsv | wc -l)
#   sbatch --array=1-${N}%20 docker/slurm/participant_array.sh
#
#SBATCH --job-name=dualglow-participant
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=00:30:00
#SBATCH --gres=gpu:1
#SBATCH --output=logs/dualglow-%A_%a.out
set -euo pipefail

BIDS_DIR=${BIDS_DIR:-/data/study}
OUT_DIR=${OUT_DIR:-/data/study/derivatives/dualglow}
SIF=${SIF:-$HOME/containers/dualglow.sif}
# A per-task work dir on node-local scratch: tasks never share caches they both write.
WORK_DIR=${WORK_DIR:-${TMPDIR:-/tmp}/dualglow-work-${SLURM_ARRAY_JOB_ID}-${SLURM_ARRAY_TASK_ID}}

# The Nth participant label (row N of participants.tsv, without "sub-").
label=$(awk -F'\t' -v n="$((SLURM_ARRAY_TASK_ID + 1))" 'NR==n {sub(/^sub-/, "", $1); print $1}' \
  "$BIDS_DIR/participants.tsv")

mkdir -p "$OUT_DIR" "$WORK_DIR"
apptainer run --nv --cleanenv \
  -B "$BIDS_DIR":/data:ro -B "$OUT_DIR":/out -B "$WORK_DIR":/work \
  "$SIF" /data /out participant \
  --participant-label "$label" \
  --nprocs "$SLURM_CPUS_PER_TASK" --device auto -w /work \
  --skip-bids-validation
