"""`kdcl-dist experiment --plan FILE`: the experiment's steps as a bash script and a Slurm submit
script, for users who run or submit the jobs themselves (docs/cluster.md, "The study on a cluster").

The plan is made by running the experiment's own step sequence (`Experiment.prepare`,
`references`, `runs`) with a `PlanRecorder` in place of the `Runner`: every step it would run
becomes a guarded shell command, in the same order, with the same command line and the same
output file that marks it done. What the Runner does in-process (the corpus split, held-out
evaluations) becomes `kdcl-dist experiment ... --step NAME`, which runs that one step. Values only
known after earlier steps (the steps of one epoch, the λ of `kd-cl-matched`) are shell
variables filled in by `kdcl-dist experiment ... --query` when first needed.

FILE          bash: `bash FILE` runs every step; `bash FILE prepare|run I|eval I|report` one group
FILE.slurm    bash: submits prepare -> runs (array: one task per arm x seed) -> evals (array)
              -> report as Slurm jobs chained with --dependency=afterok
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from kdcl_dist.cluster import Launch


class ShellVar:
    """A value the plan computes when it gets there: `"${NAME}"`, filled by `--query QUERY`."""

    def __init__(self, name: str, query: str):
        self.name, self.query = name, query

    def __str__(self) -> str:
        return "${" + self.name + "}"

    def __repr__(self) -> str:
        return f"ShellVar({self.name!r}, {self.query!r})"


class StepDone(Exception):
    """Raised by `StepRunner` once its one step has run (`experiment --step NAME`)."""


@dataclass
class Entry:
    name: str
    argv: list
    done: Path
    env: dict = field(default_factory=dict)
    group: str = "prepare"
    index: int | None = None


def _quote(a) -> str:
    if isinstance(a, ShellVar):
        return f'"{a}"'
    a = str(a)
    if a == sys.executable:
        return '"$PY"'
    return shlex.quote(a)


class PlanRecorder:
    """Runner's interface (step, call, inline); records the steps instead of running them."""

    def __init__(self, exp, base_args: list[str]):
        self.exp, self.base = exp, base_args
        self.entries: list[Entry] = []
        self.concurrent = 1
        self.records: list[dict] = []
        self.runs = {f"{a}-s{s}": i for i, (a, s) in enumerate(exp.jobs())}

    def _group(self, name: str) -> tuple[str, int | None]:
        kind, _, what = name.partition("/")
        if what in self.runs:
            if kind in ("train", "export"):
                return "run", self.runs[what]
            if kind.startswith("eval-"):
                return "eval", self.runs[what]
        return "prepare", None

    def _add(self, name: str, argv: list, done: Path, env: dict | None = None) -> None:
        g, i = self._group(name)
        self.entries.append(Entry(name, argv, Path(done), env or {}, g, i))

    def log_path(self, name: str) -> Path:
        return self.exp.out / "logs" / f"{name.replace('/', '_')}.log"

    def step(self, name: str, argv: list, done: Path, launcher=None) -> dict:
        from kdcl_dist.experiment import stage_argv

        argv = stage_argv(argv, self.exp.progress)
        env = {}
        if isinstance(launcher, Launch):
            prefix = launcher.prefix(self.log_path(name), name, in_allocation=True)
            env = {k: v for k, v in launcher.env().items() if k != "PYTHON"}
        else:
            from kdcl_dist.experiment import python_cli

            prefix = list(launcher or python_cli())
        self._add(name, prefix + list(argv), done, env)
        return {"step": name, "status": "planned"}

    def _in_process(self, name: str, done: Path) -> None:
        from kdcl_dist.experiment import python_cli

        self._add(name, python_cli() + ["experiment", *self.base, "--step", name], done)

    def call(self, name: str, fn, done: Path) -> dict:
        self._in_process(name, done)
        return {"step": name, "status": "planned"}

    def inline(self, name: str, fn, done: Path):
        self._in_process(name, done)
        return defaultdict(lambda: "?")

    def report(self) -> None:
        from kdcl_dist.experiment import python_cli

        self.entries.append(
            Entry(
                "report",
                python_cli() + ["experiment", *self.base, "--report-only"],
                self.exp.out / "report.md",
                group="report",
            )
        )


_HEAD = r"""set -euo pipefail
SEL="${1:-}" IDX="${2:-}"
case "$SEL" in
    ""|prepare|report) ;;
    run|eval) [[ "$IDX" =~ ^[0-9]+$ ]] || { echo "usage: $0 [prepare | run I | eval I | report]" >&2; exit 2; } ;;
    *) echo "usage: $0 [prepare | run I | eval I | report]" >&2; exit 2 ;;
esac

# want GROUP INDEX NAME DONE: the step belongs to the selected group and its output is missing
want() {
    if [[ -n "$SEL" && ( "$SEL" != "$1" || ( -n "$IDX" && "$IDX" != "$2" ) ) ]]; then return 1; fi
    if [[ -e "$4" ]]; then echo "  [skip] $3 (exists: $4)"; return 1; fi
}
# need VAR QUERY: a value known once earlier steps ran (the steps of one epoch, a planned λ)
need() {
    if [[ -z "${!1:-}" ]]; then
        printf -v "$1" '%s' "$("$PY" -m kdcl_dist experiment "${EXP[@]}" --query "$2")"
    fi
}
# run_step NAME DONE CMD...: the command's output goes to logs/NAME.log; it must write DONE
run_step() {
    local name=$1 done=$2 log="$LOGS/${1//\//_}.log"
    shift 2
    echo "  [run ] $name"
    printf '$ %s\n' "$*" >"$log"
    local t0=$SECONDS
    if ! "$@" >>"$log" 2>&1; then
        echo "$log: step '$name' failed; last lines:" >&2
        tail -n 25 "$log" >&2
        exit 1
    fi
    [[ -e "$done" ]] || { echo "$log: step '$name' finished without writing $done" >&2; exit 1; }
    echo "  [ok  ] $name $((SECONDS - t0))s"
    # the Runner's record: the report's wall time starts at the first one
    printf '{"step": "%s", "status": "done", "seconds": %d, "output": "%s", "time": "%s"}\n' \
        "$name" $((SECONDS - t0)) "$done" "$(date +%Y-%m-%dT%H:%M:%S)" >>"$STEPS_LOG"
}
"""


def write_plan(exp, path: Path, command: str | None = None) -> tuple[Path, Path]:
    """Record the experiment's steps and write FILE (bash) and FILE.slurm (sbatch chain)."""
    from kdcl_dist.utils import atomic_path

    path = Path(path)
    out = exp.out
    base = [
        "--corpus",
        str(exp.corpus),
        "--out",
        str(out),
        "--preset",
        exp.preset,
        "--config",
        str(out / "config.yaml"),
    ] + ([] if exp.progress else ["--no-progress"])
    rec = PlanRecorder(exp, base)
    exp.r, exp.planning = rec, True
    prep = exp.prepare()
    exp.references(prep)
    exp.runs(prep)
    rec.report()
    jobs = exp.jobs()

    L = [
        "#!/usr/bin/env bash",
        f"# kdcl-dist experiment plan ({len(rec.entries)} steps), written {time.strftime('%Y-%m-%d %H:%M:%S')}"
        + (f" by:\n#   {command}" if command else ""),
        "#",
        f"#   bash {path}             every step in order; a step whose output exists is skipped",
        f"#   bash {path} prepare     split, shards, scoring, curriculum, reference evaluations",
        f"#   bash {path} run I       train + export of run I, I = 0..{len(jobs) - 1} (below)",
        f"#   bash {path} eval I      the held-out evaluations of run I",
        f"#   bash {path} report      report.md from the evaluations",
        f"#   bash {path}.slurm       submit it all as Slurm jobs (afterok dependencies)",
        "#",
        "# runs: " + ", ".join(f"{i}={a}-s{s}" for i, (a, s) in enumerate(jobs)),
        _HEAD,
        f"cd {shlex.quote(os.getcwd())}",
        f'PY="${{PYTHON:-{sys.executable}}}"',
        'export PYTHON="$PY"',
        'export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"',
        'export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"',
        f"LOGS={shlex.quote(str(out / 'logs'))}",
        'mkdir -p "$LOGS"',
        f"STEPS_LOG={shlex.quote(str(out / 'steps.jsonl'))}",
        "EXP=(" + " ".join(shlex.quote(a) for a in base) + ")",
        "",
    ]
    for e in rec.entries:
        idx = "" if e.index is None else str(e.index)
        L.append(f"# {e.name}")
        L.append(
            f"if want {e.group} {shlex.quote(idx)} {shlex.quote(e.name)} {shlex.quote(str(e.done))}; then"
        )
        for v in {str(a): a for a in e.argv if isinstance(a, ShellVar)}.values():
            L.append(f"    need {v.name} {shlex.quote(v.query)}")
        env = ["env", *(f"{k}={shlex.quote(str(v))}" for k, v in e.env.items())] if e.env else []
        cmd = " ".join(_quote(a) for a in env + e.argv)
        L.append(f"    run_step {shlex.quote(e.name)} {shlex.quote(str(e.done))} {cmd}")
        L.append("fi")
    L.append('[[ -n "$SEL" ]] || echo "report: ' + str(out / "report.md") + '"')
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(L) + "\n")
        tmp.chmod(0o755)
    slurm = path.with_name(path.name + ".slurm")
    with atomic_path(slurm) as tmp:
        tmp.write_text(_slurm_script(exp, path, len(jobs)))
        tmp.chmod(0o755)
    return path, slurm


def _slurm_script(exp, plan: Path, n_runs: int) -> str:
    """prepare -> runs (array) -> evals (array) -> report, each job `bash PLAN <group> [I]`."""
    c = exp.cfg
    plan_abs = plan.resolve()
    logs = (exp.out / "logs").resolve()
    nodes = c.nnodes
    extra = " ".join(shlex.quote(a) for a in shlex.split(c.slurm_args))

    def wrap(group: str) -> str:  # single-quoted: $SLURM_ARRAY_TASK_ID expands in the job
        return shlex.quote(f"bash {shlex.quote(str(plan_abs))} {group}")

    return f"""#!/usr/bin/env bash
# Submits the plan {plan_abs} as Slurm jobs:
#   prepare (--nodes={nodes}) -> runs (array 0-{n_runs - 1}, one task per arm x seed, --nodes={nodes})
#   -> evals (array, one node each) -> report (one node), chained with --dependency=afterok.
# Extra sbatch options of every job (experiment.slurm_args): {c.slurm_args or "(none)"}
# A job that fails cancels nothing already finished: fix it and run this script again; every
# step whose output exists is skipped.
set -euo pipefail
cd {shlex.quote(os.getcwd())}
LOGS={shlex.quote(str(logs))}
mkdir -p "$LOGS"
sb() {{ local id; id=$(sbatch --parsable {extra} "$@"); echo "${{id%%;*}}"; }}
prep=$(sb --job-name=kdcl-prepare --nodes={nodes} --output="$LOGS/slurm-prepare-%j.out" \\
    --wrap {wrap("prepare")})
runs=$(sb --job-name=kdcl-runs --nodes={nodes} --array=0-{n_runs - 1} --dependency=afterok:$prep \\
    --output="$LOGS/slurm-run-%A_%a.out" --wrap {wrap("run $SLURM_ARRAY_TASK_ID")})
evals=$(sb --job-name=kdcl-evals --nodes=1 --array=0-{n_runs - 1} --dependency=afterok:$runs \\
    --output="$LOGS/slurm-eval-%A_%a.out" --wrap {wrap("eval $SLURM_ARRAY_TASK_ID")})
report=$(sb --job-name=kdcl-report --nodes=1 --dependency=afterok:$evals \\
    --output="$LOGS/slurm-report-%j.out" --wrap {wrap("report")})
echo "submitted: prepare $prep, runs $runs ({n_runs} tasks), evals $evals, report $report"
"""


def step_runner(root: Path, target: str):
    """A Runner for `experiment --step NAME`: runs that one step (unless its output exists), skips
    every other one without a trace, and stops the experiment's step sequence after it."""
    from kdcl_dist.experiment import Runner

    class StepRunner(Runner):
        def _run(self, name, done, how, work):
            if name != target:
                return {"step": name, "status": "other"}
            if not Path(done).exists():
                work()  # the plan's run_step records it in steps.jsonl
            raise StepDone(name)

        def inline(self, name, fn, done):
            res = fn()
            if name == target:
                raise StepDone(name)
            return res

    return StepRunner(root)
