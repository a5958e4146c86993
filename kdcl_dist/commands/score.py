"""Distributed scoring pass: each sample's mean masked-LM loss over K fixed masks.

  kdcl-dist score --shards runs/shards --model runs/models/student --out runs/scores
  torchrun --nproc-per-node 2 -m kdcl_dist score --shards ... --model ... --out ...
  mpirun -n 4 kdcl-dist score ...        (deepspeed --num_gpus N also works)

Source shards are spread over the ranks balanced by tokens. One score file per source shard is written
atomically; a re-run skips shards already scored with the same model, K, seed and
dataset. `scores.json` records the fingerprints and the throughput. See docs/curriculum.md.
"""

from __future__ import annotations

from pathlib import Path

from kdcl_dist.config import add_config_args, add_options, resolve_args, write_resolved


def add_arguments(p):
    p.add_argument(
        "--shards", required=True, help="source shard directory (dataset.json) or its URL"
    )
    p.add_argument(
        "--model", required=True, help="scoring model: HF model directory or name (the student)"
    )
    p.add_argument("--out", required=True, help="scores directory to write (or a URL)")
    from kdcl_dist.curriculum.scoring import ScoreConfig

    add_options(p, ScoreConfig, "score")
    add_config_args(p, "score")


def run(args) -> int:
    from kdcl_dist import dist, storage
    from kdcl_dist.curriculum.scoring import precheck_head, score_shards
    from kdcl_dist.utils import check_output_path

    # every rank, before the process group and any work
    check_output_path(args.out, "dir", allow_url=True)
    cfg = resolve_args(args)
    from kdcl_dist.data.reader import find_manifest

    find_manifest(args.shards)  # a missing directory, bucket or key: one line, nothing written
    precheck_head(args.model, cfg.allow_new_head, "scores")
    with dist.stage() as info:
        # an --out URL: written to a staging directory, uploaded at the end (scores.json last)
        with storage.staged_output(args.out, info.rank, info.world_size) as out:
            if info.rank == 0:  # before the work: scores.json, written last, marks a finished run
                Path(out).mkdir(parents=True, exist_ok=True)
                write_resolved(cfg, Path(out), "score")
            score_shards(args.shards, args.model, out, cfg, rank=info.rank, world=info.world_size)
    return 0
