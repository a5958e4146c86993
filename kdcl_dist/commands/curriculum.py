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

from kdcl_dist.config import add_config_args, add_options, resolve_args, write_resolved


def add_arguments(p):
    p.add_argument(
        "--shards", required=True, help="source shard directory (dataset.json) or its URL"
    )
    p.add_argument(
        "--scores", required=True, help="scores directory from `kdcl-dist score` (or its URL)"
    )
    p.add_argument("--out", required=True, help="curriculum directory to write (or a URL)")
    from kdcl_dist.curriculum.build import CurriculumConfig

    add_options(p, CurriculumConfig, "curriculum")
    add_config_args(p, "curriculum")


def run(args) -> int:
    from kdcl_dist import dist, storage
    from kdcl_dist.curriculum.build import build_curriculum
    from kdcl_dist.utils import check_output_path

    # every rank, before the process group and any work
    check_output_path(args.out, "dir", allow_url=True)
    cfg = resolve_args(args)
    with dist.stage() as info:
        # an --out URL: written to a staging directory, uploaded at the end (curriculum.json last)
        out_cm = storage.staged_output(args.out, info.rank, info.world_size)
        with out_cm as out, storage.local_copy(args.scores) as scores:  # a URL: downloaded
            build_curriculum(args.shards, scores, out, cfg, rank=info.rank, world=info.world_size)
            if info.rank == 0:
                write_resolved(cfg, Path(out), "curriculum")
    return 0
