"""The experiment on a cluster (docs/cluster.md, "The study on a cluster"): --launcher, --plan, GPUs.

- GPU assignment of concurrent runs (fake GPU counts) and the launcher checks: fast.
- A step submitted through `sbatch --wait launcher/slurm.sbatch` with stand-ins for
  sbatch/srun/scontrol that start the job on this machine: slow.
- The acceptance runs (slow): the plan of a tiny experiment executed as written with bash gives
  the in-process experiment's report numbers; the arms launched through the deepspeed per-node
  launcher on two loopback "nodes" give the held-out loss of torchrun with 2 processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli

from kdcl_dist.errors import UserError

# ---------------------------------------------------------------------------------------------
# GPUs of concurrent runs


def test_visible_gpus_and_partition():
    from kdcl_dist.cluster import partition_gpus, visible_gpus

    assert visible_gpus({}, count=4) == ["0", "1", "2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5,7,9"}, count=8) == ["2", "5", "7", "9"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=8) == []  # hidden: a CPU run
    assert partition_gpus(["0", "1", "2", "3"], 2, 2) == [["0", "1"], ["2", "3"]]
    assert partition_gpus(["2", "5", "7", "9"], 4, 1) == [["2"], ["5"], ["7"], ["9"]]
    assert partition_gpus(list("01234567"), 3, 2) == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert partition_gpus([], 3, 2) == [[], [], []]  # CPU: nothing to share
    with pytest.raises(UserError, match=r"3 concurrent runs x 2 ranks need 6 GPUs, 4 visible"):
        partition_gpus(list("0123"), 3, 2)


def test_concurrent_runs_hold_disjoint_gpus(tmp_path, monkeypatch):
    """Experiment.runs with parallel=3, nproc=2 on 6 fake GPUs: 7 runs, never two at the same
    time on one GPU, each run's launcher sets CUDA_VISIBLE_DEVICES to its own pair."""
    import kdcl_dist.experiment as E

    monkeypatch.setattr(E, "visible_gpus", lambda: [str(g) for g in range(6)])
    cfg = E.ExperimentConfig(arms=["kd", "kd-cl", "student-only", "kd-reverse"], seeds=2)
    cfg.parallel, cfg.nproc = 3, 2
    exp = E.Experiment(tmp_path / "c.jsonl", tmp_path / "exp", cfg)
    exp.check_launch()
    busy: dict[str, str] = {}
    lock = threading.Lock()
    seen = []

    def fake_run_one(arm, seed, prep, launch=None):
        gpus = launch.env()["CUDA_VISIBLE_DEVICES"].split(",")
        with lock:
            clash = [g for g in gpus if g in busy]
            assert not clash, f"{arm}-s{seed} got GPUs {clash} held by {[busy[g] for g in clash]}"
            for g in gpus:
                busy[g] = f"{arm}-s{seed}"
            seen.append(tuple(gpus))
        time.sleep(0.05)
        with lock:
            for g in gpus:
                del busy[g]

    monkeypatch.setattr(exp, "run_one", fake_run_one)
    exp.runs({})
    assert len(seen) == 8
    assert set(seen) <= {("0", "1"), ("2", "3"), ("4", "5")} and len(set(seen)) == 3


def test_parallel_beyond_the_gpus_is_refused_before_work(tmp_path, monkeypatch):
    import kdcl_dist.experiment as E

    monkeypatch.setattr(E, "visible_gpus", lambda: ["0", "1"])
    cfg = E.ExperimentConfig(parallel=2, nproc=2)
    exp = E.Experiment(tmp_path / "missing.jsonl", tmp_path / "exp", cfg)
    with pytest.raises(UserError, match="need 4 GPUs, 2 visible"):
        exp.prepare()
    assert not (tmp_path / "exp" / "data").exists()


# ---------------------------------------------------------------------------------------------
# launcher checks: one line, before any work


def _launch(**kw):
    from kdcl_dist.cluster import Launch

    return Launch(**kw)


def test_launcher_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, srun, pdsh, mpirun here
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(UserError, match="sbatch not found on PATH.*--plan"):
        _launch(launcher="slurm").check(tmp_path)
    with pytest.raises(UserError, match=r"nohost: hostfile not found; write one line"):
        _launch(launcher="deepspeed", hostfile=str(tmp_path / "nohost")).check(tmp_path)
    with pytest.raises(UserError, match="needs --hostfile"):
        _launch(launcher="deepspeed").check(tmp_path)
    hf = tmp_path / "hosts"
    hf.write_text("gpu-01 slots=8\n")
    with pytest.raises(UserError, match="pdsh not found"):
        _launch(launcher="deepspeed", hostfile=str(hf)).check(tmp_path)
    with pytest.raises(UserError, match=r"1 host line\(s\).*nnodes=2"):
        _launch(launcher="deepspeed", deepspeed_nodes="here", hostfile=str(hf), nnodes=2).check(
            tmp_path
        )
    with pytest.raises(UserError, match="torchrun runs one node"):
        _launch(launcher="torchrun", nnodes=2).check(tmp_path)
    with pytest.raises(UserError, match="mpirun not found"):
        _launch(launcher="mpirun").check(tmp_path)
    # writing a plan checks the settings and the hostfile, not the programs (they run elsewhere)
    _launch(launcher="slurm").check(tmp_path, programs=False)
    # here: the node launcher reads only the count of lines and their slots
    ln = _launch(launcher="deepspeed", deepspeed_nodes="here", nnodes=2, nproc=3)
    ln.check(tmp_path)
    assert Path(ln.hostfile).read_text() == "node0 slots=3\nnode1 slots=3\n"


def test_cli_refuses_a_missing_hostfile_before_any_work(tmp_path):
    p = run_cli(
        "experiment",
        "--corpus",
        tmp_path / "c.jsonl",
        "--out",
        tmp_path / "exp",
        "--launcher",
        "mpirun",
        "--hostfile",
        tmp_path / "hosts",
        check=False,
    )
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "hosts: hostfile not found" in err[0], p.stderr
    assert not (tmp_path / "exp" / "data").exists()


# ---------------------------------------------------------------------------------------------
# slurm: every step an `sbatch --wait` job

FAKE_SBATCH = r'''#!{python}
"""Stand-in for `sbatch --wait`: runs the batch script here with the job's Slurm variables,
appends its output to --output, prints the job id (--parsable), exits with the script's code."""
import os, random, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("--"):
    k, _, v = args.pop(0).partition("=")
    opts[k] = v
with open(os.environ["FAKE_SBATCH_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
assert "--wait" in opts, "the experiment waits for every job"
nodes = int(opts.get("--nodes", "1"))
job = str(random.randint(1000, 9999))
env = dict(os.environ, SLURM_JOB_ID=job, SLURM_JOB_NODELIST=f"node[0-{{nodes - 1}}]",
           SLURM_NNODES=str(nodes), SLURM_NTASKS=str(nodes), TMPDIR=os.environ["FAKE_TMP"])
print(job, flush=True)
with open(opts["--output"], "a") as out:
    rc = subprocess.call(["bash", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
sys.exit(rc)
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_launcher_submits_each_step_and_waits(tmp_path, monkeypatch):
    """A Runner step through `--launcher slurm` (2 nodes x 1 rank): sbatch --wait with the
    step's log as the job output; slurm.sbatch starts one deepspeed node launcher per node."""
    from _curriculum_fixture import free_port
    from test_launchers import FAKE_SCONTROL, FAKE_SRUN, TESTS, read_probe

    from kdcl_dist.experiment import Runner

    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    for k, v in {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SBATCH_LOG": tmp_path / "sbatch.log",
        "FAKE_SRUN_LOG": tmp_path / "srun.log",
        "FAKE_TMP": tmp_path,
        "KDCL_MODULE": "launch_probe",
        "KDCL_MASTER_ADDR": "127.0.0.1",
        "KDCL_MASTER_PORT": free_port(),
        "PYTHONPATH": f"{TESTS}:{os.environ.get('PYTHONPATH', '')}",
        "CUDA_VISIBLE_DEVICES": "",
    }.items():
        monkeypatch.setenv(k, str(v))
    launch = _launch(launcher="slurm", nnodes=2, nproc=1, slurm_args="--partition=cpu --time=5")
    launch.check(tmp_path)
    r = Runner(tmp_path, echo=False)
    r.step("probe/step", [tmp_path / "out"], tmp_path / "out" / "rank1.json", launch)
    me = read_probe(tmp_path / "out", 2)
    assert [m["local_rank"] for m in me] == [0, 0]  # one rank on each of the two "nodes"
    sb = (tmp_path / "sbatch.log").read_text()
    assert "--wait" in sb and "--nodes=2" in sb and "--partition=cpu --time=5" in sb
    assert f"--output={tmp_path / 'logs' / 'probe_step.log'}" in sb
    log = (tmp_path / "logs" / "probe_step.log").read_text()
    assert "slurm.sbatch: job" in log and "nodes=2" in log  # the job's output is the step log


FAKE_SUBMIT = r"""#!/bin/sh
# Stand-in for `sbatch --parsable` at submission: log the arguments, print a job id.
n=$(wc -l < "$FAKE_SBATCH_LOG" 2>/dev/null || echo 0)
printf '%s\n' "$*" >> "$FAKE_SBATCH_LOG"
echo "$((700 + n));cluster"
"""


def test_plan_with_slurm_launcher_and_its_submit_chain(tmp_path):
    """--plan with --launcher slurm (written where no Slurm is installed): training steps call
    slurm.sbatch inside the job; FILE.slurm submits prepare -> runs array -> evals array -> report,
    each after the previous one (afterok), with the user's sbatch options."""
    corpus = _corpus(tmp_path / "c.jsonl", 50)
    plan = tmp_path / "my plan.sh"  # a space: every path is quoted
    run_cli(
        "experiment",
        "--corpus",
        corpus,
        "--out",
        tmp_path / "exp",
        "--arms",
        "kd,kd-cl",
        "--seeds",
        "2",
        "--steps",
        "7",
        "--launcher",
        "slurm",
        "--nnodes",
        "2",
        "--nproc",
        "4",
        "slurm_args=--partition=gpu --time=01:00:00",
        "--plan",
        plan,
        env={"PATH": os.defpath},
    )
    text = plan.read_text()
    assert "# runs: 0=kd-s0, 1=kd-cl-s0, 2=kd-s1, 3=kd-cl-s1" in text
    train = [x for x in text.splitlines() if "run_step train/kd-cl-s1 " in x][0]
    assert "env GPUS_PER_NODE=4 bash" in train and "slurm.sbatch train" in train
    assert "--steps 7" in train and "need STEPS" not in text  # --steps given: no query
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SUBMIT)
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env["FAKE_SBATCH_LOG"] = str(tmp_path / "sbatch.log")
    p = subprocess.run(["bash", f"{plan}.slurm"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "submitted: prepare 700, runs 701 (4 tasks), evals 702, report 703" in p.stdout
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert len(calls) == 4 and all("--partition=gpu --time=01:00:00" in c for c in calls)
    assert "--nodes=2" in calls[0] and "--dependency" not in calls[0]
    assert "--array=0-3 --dependency=afterok:700" in calls[1] and "--nodes=2" in calls[1]
    assert "--array=0-3 --dependency=afterok:701" in calls[2] and "--nodes=1" in calls[2]
    assert "--dependency=afterok:702" in calls[3]
    assert calls[1].endswith(f"--wrap bash '{plan.resolve()}' run $SLURM_ARRAY_TASK_ID")
    assert calls[3].endswith(f"--wrap bash '{plan.resolve()}' report")


# ---------------------------------------------------------------------------------------------
# acceptance: plan == in-process; deepspeed on two loopback nodes == torchrun


def _corpus(path: Path, n: int = 200) -> Path:
    from kdcl_dist.data.synthetic import synthetic_documents

    with open(path, "w") as f:
        for doc_id, text in synthetic_documents(n, seed=3):
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return path


# steps=0: one epoch, known only once the shards exist (the plan asks `--query steps`);
# kd-cl-matched: its λ comes from the curriculum (`--query lambda:kd-cl-matched`)
GRID = [
    "--arms",
    "kd,kd-cl-matched",
    "--seeds",
    "1",
    "--nproc",
    "2",
    "heldout_percent=10",
    "teacher_steps=2",
    "max_length=64",
    "global_batch=16",
    "micro_batch=8",
    "n_boot=200",
]
ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The tiny experiment run in-process (torchrun, 2 processes per run): the reference."""
    work = tmp_path_factory.mktemp("cluster")
    corpus = _corpus(work / "corpus.jsonl")
    run_cli("experiment", "--corpus", corpus, "--out", work / "ref", *GRID, env=ENV, timeout=1500)
    return work, corpus, json.loads((work / "ref" / "report.json").read_text())


def _numbers(res: dict) -> dict:
    return {
        "arms": {
            a: (v["losses"], v["pooled"], v["planned_lambda"]) for a, v in res["arms"].items()
        },
        "refs": {k: v["loss"] for k, v in res["references"].items()},
        "comparisons": [(c["a"], c["b"], c["diff"], c["ci"]) for c in res["comparisons"]],
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_plan_run_with_bash_gives_the_in_process_report(in_process, tmp_path):
    work, corpus, ref = in_process
    plan = tmp_path / "plan.sh"
    out = tmp_path / "exp"
    # the in-process run's tokenizer: HF's WordPiece trainer breaks ties in hash order, so a
    # second training on the same corpus may differ (huggingface/tokenizers#1794)
    tok = work / "ref" / "tokenizer"
    run_cli(
        "experiment",
        "--corpus",
        corpus,
        "--out",
        out,
        *GRID,
        f"tokenizer={tok}",
        "--plan",
        plan,
        env=ENV,
    )
    text = plan.read_text()
    assert "kdcl_dist tokenizer" not in text and f"--tokenizer {tok}" in text
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "need STEPS steps" in text and "need LAMBDA_kd_cl_matched lambda:kd-cl-matched" in text
    assert not (out / "data").exists()  # writing the plan runs nothing
    slurm = Path(f"{plan}.slurm").read_text()
    assert "--array=0-1" in slurm and slurm.count("--dependency=afterok:") == 3
    env = {**os.environ, **ENV}
    p = subprocess.run(["bash", plan], env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[skip]" not in p.stdout and p.stdout.count("[ok  ]") == text.count("run_step ") - 1
    got = json.loads((out / "report.json").read_text())
    assert _numbers(got) == _numbers(ref)
    assert (
        "Teacher adapted for 2 steps, student warmed up for 2 steps"
        in (out / "report.md").read_text()
    )
    # run again: every step is skipped; one group at a time (as the Slurm jobs run it)
    p = subprocess.run(["bash", plan, "run", "1"], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "[run ]" not in p.stdout
    assert p.stdout.count("[skip]") == 2 and "train/kd-cl-matched-s0" in p.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_two_loopback_nodes_match_torchrun(in_process, tmp_path):
    """The kd arm again through `deepspeed_node.sh` x 2 nodes x 1 rank (deepspeed_nodes=here),
    from the same preparation: the same held-out loss as torchrun with 2 processes."""
    if shutil.which("bash") is None or not _have("deepspeed"):
        pytest.skip("deepspeed is not installed")
    work, corpus, ref = in_process
    out = tmp_path / "exp"
    shutil.copytree(work / "ref", out, ignore=shutil.ignore_patterns("runs", "report*"))
    for f in (out / "evals").glob("kd*-s0.*"):
        f.unlink()
    grid = [a if a != "kd,kd-cl-matched" else "kd" for a in GRID]
    grid[grid.index("--nproc") + 1] = "1"
    launcher = ["--launcher", "deepspeed", "--deepspeed-nodes", "here", "--nnodes", "2"]
    p = run_cli(
        "experiment", "--corpus", corpus, "--out", out, *launcher, *grid, env=ENV, timeout=1500
    )
    assert "[run ] train/kd-s0" in p.stdout and "[skip] score/student" in p.stdout
    log = (out / "logs" / "train_kd-s0.log").read_text()
    assert log.count("nnodes=2, num_local_procs=1") == 2  # two node launchers, one rank each
    got = json.loads((out / "report.json").read_text())
    assert got["arms"]["kd"]["losses"] == ref["arms"]["kd"]["losses"]


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_given_tokenizer_is_checked_before_any_work(tmp_path):
    """experiment tokenizer=DIR: a directory without a tokenizer, or a tokenizer beside pretrained
    models, is a one-line refusal before any step runs."""
    corpus = _corpus(tmp_path / "corpus.jsonl")
    p = run_cli(
        "experiment",
        "--corpus",
        corpus,
        "--out",
        tmp_path / "a",
        f"tokenizer={tmp_path}",
        check=False,
        env=ENV,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"kdcl-dist experiment: error: experiment.tokenizer: {tmp_path} is not a tokenizer directory "
        "(no tokenizer_config.json); pass the `tokenizer` directory of an earlier run or of "
        "`kdcl-dist tokenizer --out`"
    )
    assert not (tmp_path / "a" / "data").exists()
    tok = tmp_path / "tok"
    run_cli("tokenizer", "--input", corpus, "--out", tok, "--vocab-size", "300", env=ENV)
    p = run_cli(
        "experiment",
        "--corpus",
        corpus,
        "--out",
        tmp_path / "b",
        "--preset",
        "minilm",
        f"tokenizer={tok}",
        check=False,
        env=ENV,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"kdcl-dist experiment: error: experiment.tokenizer: {tok} given with pretrained models, "
        "whose shards use the student's own tokenizer; drop tokenizer="
    )
    assert not (tmp_path / "b" / "data").exists()
