"""Where the packaged cluster launcher scripts are (docs/cluster.md).

  kdcl-dist launcher              the directory holding them
  kdcl-dist launcher local_cpu    the path of one script (`local_cpu` or `local_cpu.sh`)
  kdcl-dist launcher --list       the script names, one a line

The scripts ship inside the package (kdcl_dist/launcher), so a wheel install has them too:

  $(kdcl-dist launcher local_cpu) -n 4 score --shards ... --out ...
  sbatch --nodes 2 --gpus-per-node 8 "$(kdcl-dist launcher slurm)" train ...
"""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument(
        "name",
        nargs="?",
        default=None,
        help="a script (local_cpu, deepspeed_hostfile, deepspeed_node, mpirun, slurm); "
        "omit for the directory",
    )
    parser.add_argument("--list", action="store_true", help="list the scripts")


def run(args) -> int:
    from kdcl_dist.packaged import find_launcher, launcher_names

    if args.list:
        print("\n".join(launcher_names()))
        return 0
    print(find_launcher(args.name))
    return 0
