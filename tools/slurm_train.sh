#!/usr/bin/env bash
# Train on a SLURM cluster: one `raydn train` process per GPU started by srun, as mmdet3d's and
# StreamPETR's tools/slurm_train.sh do. Each task maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
# SLURM_STEP_NODELIST onto torch's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR itself
# (raydn.engine.distributed.slurm_environment); MASTER_PORT defaults to 29500 + job id % 1000.
#
#   [GPUS=16] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#     tools/slurm_train.sh PARTITION JOB_NAME PRESET WORK_DIR --data INFOS_TRAIN.pkl [raydn train options]
#
# WORK_DIR must be on a filesystem every node sees (checkpoints, per-rank resume state, logs).
# The run resumes from WORK_DIR's latest checkpoint when there is one (--resume auto), so the same
# command continues a preempted or requeued job, or one stopped by a lost node.
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
PRESET=$3
WORK_DIR=$4
shift 4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PYTHON=${PYTHON:-python}

# shellcheck disable=SC2086  # SRUN_ARGS is a list of options
srun -p "${PARTITION}" \
    --job-name="${JOB_NAME}" \
    --gres=gpu:"${GPUS_PER_NODE}" \
    --ntasks="${GPUS}" \
    --ntasks-per-node="${GPUS_PER_NODE}" \
    --cpus-per-task="${CPUS_PER_TASK}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "${PYTHON}" -u -m raydn.cli train --preset "${PRESET}" --out "${WORK_DIR}" --resume auto \
    --no-progress "$@"
