#!/usr/bin/env bash
# Multi-node launch without ssh: run this once on every node (by hand, by a scheduler, or by
# launcher/slurm.sbatch) with that node's rank; DeepSpeed starts the node's local ranks.
set -euo pipefail
# shellcheck source=launcher/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<'EOF'
usage: launcher/deepspeed_node.sh --hostfile FILE --node-rank R --master-addr A [options]
                                  [--] <stage> [stage args...]

Runs `deepspeed --hostfile FILE --no_ssh --node_rank R --master_addr A --module kdcl_dist
<stage> ...` on this node. Start it on every node of FILE with the same arguments except
--node-rank (0 for the first host of FILE, 1 for the second, ...). No ssh, no pdsh: the
environment is this shell's environment.

options (environment variable in brackets):
  --hostfile FILE        lines `<host> slots=<gpus>`; only the count and the slots matter [HOSTFILE]
  --node-rank R          this node's position in FILE, from 0 [NODE_RANK]
  --master-addr A        address of node 0 that every node can reach [MASTER_ADDR]
  --master-port P        rendezvous port on node 0 (default 29500) [MASTER_PORT]
  --num-nodes N          use the first N hosts of FILE (default: all) [NUM_NODES]
  --gpus-per-node G      processes per node (default: the host's slots) [GPUS_PER_NODE]
  -h, --help             this help

example (two nodes, run on each):
  launcher/deepspeed_node.sh --hostfile launcher/hostfile --node-rank $NODE_RANK \
      --master-addr 10.0.0.1 score --shards /shared/run/shards --model ... --out /shared/run/scores
EOF
}

hostfile="${HOSTFILE:-}"
node_rank="${NODE_RANK:-}"
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-29500}"
num_nodes="${NUM_NODES:-}"
gpus="${GPUS_PER_NODE:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --hostfile) hostfile="${2:?--hostfile needs a value}"; shift 2 ;;
        --node-rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
        --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
        --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
        --num-nodes) num_nodes="${2:?--num-nodes needs a value}"; shift 2 ;;
        --gpus-per-node) gpus="${2:?--gpus-per-node needs a value}"; shift 2 ;;
        *) break ;;
    esac
done
kdcl_check_stage "$@"; [[ "$1" != -- ]] || shift
kdcl_require_hostfile "$hostfile"
kdcl_is_int "$node_rank" || kdcl_die "--node-rank is required: this node's position in $hostfile, from 0 (got '$node_rank')"
[[ -n "$master_addr" ]] || kdcl_die "--master-addr is required: an address of node 0 that every node can reach"

py="$(kdcl_python)"
args=(--hostfile "$hostfile" --no_ssh --node_rank "$node_rank"
      --master_addr "$master_addr" --master_port "$master_port")
[[ -n "$num_nodes" ]] && args+=(--num_nodes "$num_nodes")
[[ -n "$gpus" ]] && args+=(--num_gpus "$gpus")

exec "$py" -m deepspeed.launcher.runner "${args[@]}" --module "${KDCL_MODULE:-kdcl_dist}" "$@"
