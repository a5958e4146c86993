"""The whole pipeline on the embedded default (tiny models, CPU, a few minutes): `make demo`.

  kdcl-dist demo                       # -> runs/demo
  kdcl-dist demo --out runs/demo2 --corpus my_abstracts.jsonl steps=100

Uses $KDCL_DATA_DIR/pubmed/abstracts.jsonl (a subset) when present, else a synthetic corpus
(said loudly). Re-running skips every step whose output exists.
"""

from __future__ import annotations

from kdcl_dist.config import add_config_args, resolve


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--corpus", default=None, help="jsonl corpus (default: real abstracts if present, else synthetic)")
    p.add_argument("--steps", type=int, help="KD-CL-SR training steps")
    p.add_argument("--max-docs", dest="max_docs", type=int, help="documents of the real corpus to use")
    p.add_argument("--nproc", type=int, help="local ranks (default 2)")
    add_config_args(p)


def run(args) -> int:
    from kdcl_dist.demo import DemoConfig, run_demo
    from kdcl_dist.utils import check_output_path

    check_output_path(args.out, "dir")

    cfg = resolve(DemoConfig, "demo", preset=args.preset, config_file=args.config,
                  flags={"steps": args.steps, "max_docs": args.max_docs, "nproc": args.nproc},
                  overrides=args.overrides)
    run_demo(args.out, args.corpus, cfg)
    return 0
