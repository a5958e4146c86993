"""The paper's study at an equal sample budget: arms x seeds, held-out MLM (and yes/no) evaluation, report.

  kdcl-dist experiment --corpus ../shared/data/pubmed/abstracts.jsonl --out runs/exp --seeds 3 --steps 200
  kdcl-dist experiment --corpus C --out runs/exp --arms kd,kd-cl --seeds 2 --steps 20 parallel=2

Arms: student-only, kd, kd-cl, kd-cl-sr-paper, kd-cl-sr-sample, kd-reverse, kd-pacing-root.
Re-running the same command skips every finished step (see docs/evaluation.md).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from kdcl_dist.config import add_config_args, add_options, resolve_args, write_resolved
from kdcl_dist.progress import PROGRESS_HELP, add_progress_flag


def add_arguments(p):
    p.add_argument("--corpus", required=True, help="jsonl corpus ({id, title?, text} per line)")
    p.add_argument("--out", required=True, help="experiment directory (re-use it to resume)")
    from kdcl_dist.experiment import ExperimentConfig

    add_options(p, ExperimentConfig, "experiment", helps={"arms": "comma-separated arms to run"})
    add_progress_flag(
        p,
        PROGRESS_HELP + "; --no-progress is passed on to every step that takes it (steps log to "
        "<out>/logs/, where no bar is drawn anyway)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="rebuild report.md from finished runs"
    )
    p.add_argument(
        "--plan",
        metavar="FILE",
        help="write every step as a shell command to FILE (bash; FILE.slurm submits it as Slurm "
        "jobs) instead of running them (docs/cluster.md)",
    )
    p.add_argument(
        "--step", metavar="NAME", help="run one step by name (as a plan does), e.g. eval-mlm/kd-s0"
    )
    p.add_argument(
        "--query",
        metavar="WHAT",
        help="print a value a plan fills in after earlier steps: steps, warmup_steps, lambda:ARM",
    )
    add_config_args(
        p,
        None,
        preset_note="default tiny; the experiment section configures the grid and the "
        "preset's other sections every stage of each run",
    )
    p.set_defaults(preset="tiny")


def run(args) -> int:
    from kdcl_dist.errors import UserError
    from kdcl_dist.experiment import Experiment, write_report
    from kdcl_dist.utils import check_output_path

    check_output_path(args.out, "dir")

    cfg = resolve_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out, "experiment")
    command = (
        "kdcl-dist " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    )
    exp = Experiment(
        Path(args.corpus),
        out,
        cfg,
        preset=args.preset,
        command=command,
        config_file=args.config,
        progress=args.progress,
    )
    if sum(bool(x) for x in (args.report_only, args.plan, args.step, args.query)) > 1:
        raise UserError("experiment: give at most one of --report-only, --plan, --step, --query")
    if args.plan:
        check_output_path(args.plan, "file", key="--plan")
        plan, slurm = exp.write_plan(Path(args.plan))
        print(f"plan: {plan} (bash {plan}); Slurm: {slurm} (bash {slurm} submits it)")
        return 0
    if args.step:
        exp.run_only(args.step)
        return 0
    if args.query:
        print(exp.query(args.query))
        return 0
    if args.report_only:
        print(f"report: {write_report(out, cfg, exp.report_prep(), 0.0, command)}")
        return 0
    exp.run()
    return 0
