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

from kdcl_dist.config import add_config_args, resolve, write_resolved


def add_arguments(p):
    p.add_argument("--shards", required=True, help="source shard directory (dataset.json)")
    p.add_argument("--model", required=True, help="scoring model: HF model directory or name (the student)")
    p.add_argument("--out", required=True, help="scores directory to write")
    p.add_argument("--masks", type=int, help="K fixed masks per sample (default 2)")
    p.add_argument("--seed", type=int, help="seed of the scoring masks")
    p.add_argument("--token-budget", dest="token_budget", type=int,
                   help="max rows x padded length per batch (0 = auto: 4096 on CPU, 65536 on GPU)")
    p.add_argument("--window", type=int, help="rows length-sorted together before packing")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="model dtype (half precision: GPU only)")
    p.add_argument("--nonfinite", choices=("last", "exclude"), help="policy for non-finite scores")
    p.add_argument("--threads", type=int, help="torch threads per rank (0 = torch default)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--allow-new-head", dest="allow_new_head", action="store_true", default=None,
                   help="accept a model without MLM head (a freshly initialised head gives noise scores)")
    add_config_args(p)


def run(args) -> int:
    from kdcl_dist import dist
    from kdcl_dist.curriculum.scoring import ScoreConfig, precheck_head, score_shards
    from kdcl_dist.utils import check_output_path

    check_output_path(args.out, "dir")   # every rank, before the process group and any work
    keys = ("masks", "seed", "token_budget", "window", "dtype", "nonfinite", "threads", "progress", "allow_new_head")
    cfg = resolve(ScoreConfig, "score", preset=args.preset, config_file=args.config,
                  flags={k: getattr(args, k) for k in keys}, overrides=args.overrides)
    precheck_head(args.model, cfg.allow_new_head, "scores")
    with dist.stage() as info:
        if info.rank == 0:   # before the work: scores.json, written last, marks a finished run
            Path(args.out).mkdir(parents=True, exist_ok=True)
            write_resolved(cfg, Path(args.out), "score")
        score_shards(args.shards, args.model, args.out, cfg, rank=info.rank, world=info.world_size)
    return 0
