#!/usr/bin/env bash
# Multi-node launch from one machine through a hostfile: DeepSpeed's default pdsh/ssh runner
# starts `deepspeed.launcher.launch` on every host, which starts one process per slot.
set -euo pipefail
# shellcheck source=launcher/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<'EOF'
usage: launcher/deepspeed_hostfile.sh --hostfile FILE [options] [--] <stage> [stage args...]

Runs `deepspeed --hostfile FILE --module kdcl_dist <stage> ...`: DeepSpeed ssh-es (through
pdsh) into every host of FILE and starts `slots` processes there. Needs passwordless ssh
from this machine to every host, pdsh on this machine, the same Python environment at the
same path on every host, and the current directory on a filesystem every host sees (the
remote processes `cd` to it). Remote shells start with the login environment: variables
named NCCL*, PYTHON*, UCX*, MV2* are forwarded, plus every KEY=VALUE line of
./.deepspeed_env and ~/.deepspeed_env (or the file named by DS_ENV_FILE); put PATH there
too, or use --venv-script. See docs/cluster.md.

options (environment variable in brackets):
  --hostfile FILE        lines `<host> slots=<gpus>` (see launcher/hostfile.example) [HOSTFILE]
  --num-nodes N          use the first N hosts of FILE (default: all) [NUM_NODES]
  --gpus-per-node G      processes per host (default: the host's slots) [GPUS_PER_NODE]
  --master-addr A        address of the first host that every rank can reach (default:
                         DeepSpeed runs `ssh <first host> hostname -I`) [MASTER_ADDR]
  --master-port P        rendezvous port (default 29500) [MASTER_PORT]
  --ssh-port S           sshd port on the hosts (default 22) [SSH_PORT]
  --no-ssh-check         skip DeepSpeed's `ssh <first host> hostname` probe
  --venv-script FILE     a script every host sources before starting its ranks, e.g.
                         /shared/kdcl/.venv/bin/activate [DS_VENV_SCRIPT]
  --launcher-args ARGS   extra arguments for pdsh, one string [DS_LAUNCHER_ARGS]
  -h, --help             this help

example:
  launcher/deepspeed_hostfile.sh --hostfile launcher/hostfile --gpus-per-node 8 \
      train --curriculum /shared/run/curriculum --student ... --out /shared/run/train
EOF
}

hostfile="${HOSTFILE:-}"
num_nodes="${NUM_NODES:-}"
gpus="${GPUS_PER_NODE:-}"
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-29500}"
ssh_port="${SSH_PORT:-}"
launcher_args="${DS_LAUNCHER_ARGS:-}"
venv_script="${DS_VENV_SCRIPT:-}"
ssh_check=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --hostfile) hostfile="${2:?--hostfile needs a value}"; shift 2 ;;
        --num-nodes) num_nodes="${2:?--num-nodes needs a value}"; shift 2 ;;
        --gpus-per-node) gpus="${2:?--gpus-per-node needs a value}"; shift 2 ;;
        --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
        --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
        --ssh-port) ssh_port="${2:?--ssh-port needs a value}"; shift 2 ;;
        --no-ssh-check) ssh_check=0; shift ;;
        --venv-script) venv_script="${2:?--venv-script needs a value}"; shift 2 ;;
        --launcher-args) launcher_args="${2:?--launcher-args needs a value}"; shift 2 ;;
        *) break ;;
    esac
done
kdcl_check_stage "$@"; [[ "$1" != -- ]] || shift
kdcl_require_hostfile "$hostfile"
grep -Eq '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$hostfile" \
    || kdcl_die "hostfile $hostfile: no line of the form '<host> slots=<n>'"
command -v pdsh >/dev/null 2>&1 \
    || kdcl_die "pdsh not found on this machine (apt-get install pdsh); or launch each node with launcher/deepspeed_node.sh"
hostfile="$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")"

py="$(kdcl_python)"
args=(--hostfile "$hostfile" --master_port "$master_port")
[[ -n "$num_nodes" ]] && args+=(--num_nodes "$num_nodes")
[[ -n "$gpus" ]] && args+=(--num_gpus "$gpus")
[[ -n "$master_addr" ]] && args+=(--master_addr "$master_addr")
[[ -n "$ssh_port" ]] && args+=(--ssh_port "$ssh_port")
[[ "$ssh_check" == 1 ]] || args+=(--no_ssh_check)
[[ -n "$launcher_args" ]] && args+=(--launcher_args "$launcher_args")
[[ -n "$venv_script" ]] && args+=(--venv_script "$venv_script")

exec "$py" -m deepspeed.launcher.runner "${args[@]}" --module "${KDCL_MODULE:-kdcl_dist}" "$@"
