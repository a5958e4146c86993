#!/usr/bin/env bash
# One machine, N processes, torch.distributed with gloo on the CPU.
set -euo pipefail
# shellcheck source=launcher/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<'EOF'
usage: launcher/local_cpu.sh [options] [--] <stage> [stage args...]

Runs `kdcl-dist <stage> ...` as N processes on this machine (CPU, gloo). Each process
gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the launcher.

options (environment variable in brackets):
  -n, --nproc N          number of processes (default 2) [NPROC]
  --launcher L           torchrun (default) or deepspeed (`deepspeed --num_gpus N` on
                         DeepSpeed's CPU accelerator) [KDCL_LAUNCHER]
  --master-port P        rendezvous port on 127.0.0.1 (default: a free port) [MASTER_PORT]
  --threads T            OMP threads per process (default 1) [OMP_NUM_THREADS]
  -h, --help             this help

examples:
  launcher/local_cpu.sh -n 2 score --shards runs/shards --model runs/models/student --out runs/scores
  launcher/local_cpu.sh --launcher deepspeed -n 2 train --curriculum runs/curriculum ...
EOF
}

nproc="${NPROC:-2}"
launcher="${KDCL_LAUNCHER:-torchrun}"
port="${MASTER_PORT:-}"
threads="${OMP_NUM_THREADS:-1}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -n|--nproc) nproc="${2:?--nproc needs a value}"; shift 2 ;;
        --launcher) launcher="${2:?--launcher needs a value}"; shift 2 ;;
        --master-port) port="${2:?--master-port needs a value}"; shift 2 ;;
        --threads) threads="${2:?--threads needs a value}"; shift 2 ;;
        *) break ;;
    esac
done
kdcl_check_stage "$@"; [[ "$1" != -- ]] || shift
{ kdcl_is_int "$nproc" && [[ "$nproc" -ge 1 ]]; } || kdcl_die "--nproc: '$nproc' is not a positive integer"

py="$(kdcl_python)"
module="${KDCL_MODULE:-kdcl_dist}"
port="${port:-$(kdcl_free_port "$py")}"
export OMP_NUM_THREADS="$threads"
# A CPU run even on a machine with GPUs: hide them so torch picks gloo and DeepSpeed its
# CPU accelerator.
export CUDA_VISIBLE_DEVICES=""
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

case "$launcher" in
    torchrun)
        exec "$py" -m torch.distributed.run --nnodes 1 --nproc-per-node "$nproc" \
            --master-addr 127.0.0.1 --master-port "$port" -m "$module" "$@" ;;
    deepspeed)
        exec "$py" -m deepspeed.launcher.runner --num_gpus "$nproc" \
            --master_addr 127.0.0.1 --master_port "$port" --module "$module" "$@" ;;
    *) kdcl_die "--launcher: '$launcher' is not one of torchrun, deepspeed" ;;
esac
