"""Global sort of the scores and curriculum shards in easy -> hard order.

  kdcl-dist curriculum --shards runs/shards --scores runs/scores --out runs/curriculum
  kdcl-dist curriculum ... --exclude-heldout-percent 0   (keep the documents `eval mlm` holds out; default 5)
  torchrun --nproc-per-node 2 -m kdcl_dist curriculum ...   (ranks split the output shards)

Writes curriculum.json, order_scores.npy, shard-NNNNNN.tar (+ .idx.json) with each
sample's score and position in its metadata, curriculum.png and score_histogram.png.
Scores made for another dataset are refused. Above `--in-memory-max` samples (default 20M)
the global sort is an external merge sort (bounded memory, identical order). See docs/curriculum.md.
"""

from __future__ import annotations

from pathlib import Path

from kdcl_dist.config import add_config_args, resolve, write_resolved


def add_arguments(p):
    p.add_argument("--shards", required=True, help="source shard directory (dataset.json)")
    p.add_argument("--scores", required=True, help="scores directory from `kdcl-dist score`")
    p.add_argument("--out", required=True, help="curriculum directory to write")
    p.add_argument("--shard-size", dest="shard_size", type=int, help="samples per curriculum shard")
    p.add_argument("--nonfinite", choices=("last", "exclude"),
                   help="non-finite score policy (default: the one recorded in scores.json)")
    p.add_argument("--in-memory-max", dest="in_memory_max", type=int,
                   help="samples up to which the global sort runs in memory (default 20M); above it an "
                        "external merge sort with bounded memory gives the same order (0: always external)")
    p.add_argument("--exclude-heldout-percent", dest="exclude_heldout_percent", type=int,
                   help="leave out the documents `kdcl-dist eval mlm --split heldout --heldout-percent N` "
                        "evaluates (id hash %% 100 < N, N in 0..99), so that training never sees them (default 5, eval "
                        "mlm's default split; 0 keeps every document)")
    p.add_argument("--no-plots", dest="plots", action="store_false", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    add_config_args(p)


def run(args) -> int:
    from kdcl_dist import dist
    from kdcl_dist.curriculum.build import CurriculumConfig, build_curriculum
    from kdcl_dist.utils import check_output_path

    check_output_path(args.out, "dir")   # every rank, before the process group and any work
    keys = ("shard_size", "nonfinite", "plots", "progress", "in_memory_max", "exclude_heldout_percent")
    cfg = resolve(CurriculumConfig, "curriculum", preset=args.preset, config_file=args.config,
                  flags={k: getattr(args, k) for k in keys}, overrides=args.overrides)
    with dist.stage() as info:
        build_curriculum(args.shards, args.scores, args.out, cfg, rank=info.rank, world=info.world_size)
        if info.rank == 0:
            write_resolved(cfg, Path(args.out), "curriculum")
    return 0
