"""The whole pipeline on the embedded default (tiny models, CPU, a few minutes): `make demo`.

  kdcl-dist demo                       # -> runs/demo
  kdcl-dist demo --out runs/demo2 --corpus my_abstracts.jsonl steps=100

Uses $KDCL_DATA_DIR/pubmed/abstracts.jsonl (a subset) when present, else a synthetic corpus
(said loudly). Re-running skips every step whose output exists.
"""

from __future__ import annotations

from kdcl_dist.config import add_config_args, add_options, resolve_args
from kdcl_dist.progress import PROGRESS_HELP, add_progress_flag


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument(
        "--corpus",
        default=None,
        help="jsonl corpus (default: real abstracts if present, else synthetic)",
    )
    add_progress_flag(
        p,
        PROGRESS_HELP + "; --no-progress is passed on to every step that takes it (steps log to "
        "<out>/logs/, where no bar is drawn anyway)",
    )
    from kdcl_dist.demo import DemoConfig

    add_options(p, DemoConfig, "demo")
    add_config_args(p, "demo")


def run(args) -> int:
    from kdcl_dist.demo import run_demo
    from kdcl_dist.utils import check_output_path

    check_output_path(args.out, "dir")

    cfg = resolve_args(args)
    run_demo(args.out, args.corpus, cfg, progress=args.progress)
    return 0
