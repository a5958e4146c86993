"""The launcher scripts in launcher/, run as real multi-process (and multi-"node") jobs.

- Every script: --help, clear errors, runs from any directory.
- Probe jobs (tests/launch_probe.py: dist.init + all_reduce + all_gather) under local_cpu.sh
  (torchrun and deepspeed), slurm.sbatch (deepspeed and srun modes, with stand-ins for
  srun/scontrol that start the tasks on this machine).
- The acceptance jobs: scoring and a few training steps as
  (a) one node with 2 processes (the reference),
  (b) a 2-node job on one machine: two `deepspeed --hostfile H --num_nodes 2 --num_gpus 1
      --no_ssh --node_rank {0,1} --master_addr 127.0.0.1` processes (launcher/deepspeed_node.sh),
  (c) `mpirun -np 2` with the MPI of the `mpi` extra (launcher/mpirun.sh),
  (d) the pdsh/ssh path: two network namespaces with their own sshd, launched through
      `deepspeed --hostfile` (launcher/deepspeed_hostfile.sh).
  Scores and final student weights of (b), (c), (d) must equal (a)'s exactly.

All runs use CPU + gloo, tiny models, 4 training steps. Traffic stays on 127.0.0.1 or the
test namespaces' own 10.231.0.0/24 addresses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _curriculum_fixture import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launcher"
TESTS = Path(__file__).resolve().parent
SCRIPTS = [
    "local_cpu.sh",
    "deepspeed_hostfile.sh",
    "deepspeed_node.sh",
    "mpirun.sh",
    "slurm.sbatch",
]
TIMEOUT = 900  # a fresh machine JIT-builds DeepSpeed's CPU comm op on first use (~1 min on 2 cores)

TRAIN_STEPS = 4


def base_env(**extra) -> dict:
    e = dict(os.environ)
    e.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHON=sys.executable,
        CUDA_VISIBLE_DEVICES="",
    )
    # Nothing from an outer launcher may leak into the jobs we start.
    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NODE_RANK",
        "HOSTFILE",
    ):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def _kill_group(p: subprocess.Popen) -> None:
    """Kill a launcher and everything it started (its own session: ranks, launch.py, pdsh),
    also ranks left behind by a launcher that already exited."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def run(cmd, env=None, cwd=None, timeout=TIMEOUT, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        env=env or base_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n"
            f"--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-6000:]}"
        )
    return p


def run_two_nodes(stage_args, workdir: Path, env=None, timeout=TIMEOUT) -> list[str]:
    """Two `deepspeed --no_ssh --node_rank R` processes (launcher/deepspeed_node.sh), one per node."""
    hostfile = workdir / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    env = env or base_env()
    procs = []
    for node in (0, 1):
        cmd = [
            LAUNCHER / "deepspeed_node.sh",
            "--hostfile",
            hostfile,
            "--node-rank",
            node,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            "--num-nodes",
            2,
            "--gpus-per-node",
            1,
            *stage_args,
        ]
        log = open(workdir / f"node{node}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [str(c) for c in cmd],
                    env=env,
                    cwd=workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                ),
                log,
            )
        )
    deadline = time.time() + timeout
    rcs = []
    try:
        for p, _ in procs:
            rcs.append(p.wait(timeout=max(1, deadline - time.time())))
    finally:
        failed = len(rcs) < len(procs) or any(rcs)
        for p, log in procs:
            if failed:  # a node whose peer failed would otherwise wait for the rendezvous timeout
                _kill_group(p)
            log.close()
    logs = [(workdir / f"node{n}.log").read_text() for n in (0, 1)]
    if any(rcs):
        raise AssertionError(
            f"2-node job failed (exit codes {rcs}):\n"
            + "\n".join(f"--- node{n}\n{text[-5000:]}" for n, text in enumerate(logs))
        )
    return logs


# ---------------------------------------------------------------------------------------------
# scripts: help, errors, any directory


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_from_any_directory(script, tmp_path):
    p = run([LAUNCHER / script, "--help"], cwd=tmp_path)
    assert "usage:" in p.stdout
    text = (LAUNCHER / script).read_text()
    assert "set -euo pipefail" in text
    assert '"$@"' in text  # the stage and its arguments are passed through untouched
    assert os.access(LAUNCHER / script, os.X_OK)


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("local_cpu.sh", [], "no stage given"),
        ("local_cpu.sh", ["-n", "zero", "score"], "not a positive integer"),
        ("local_cpu.sh", ["--launcher", "srun", "score"], "not one of torchrun, deepspeed"),
        ("deepspeed_hostfile.sh", ["score"], "--hostfile is required"),
        ("deepspeed_hostfile.sh", ["--hostfile", "/nonexistent/hosts", "score"], "does not exist"),
        (
            "deepspeed_node.sh",
            ["--hostfile", "HOSTFILE", "--master-addr", "127.0.0.1", "score"],
            "--node-rank is required",
        ),
        (
            "deepspeed_node.sh",
            ["--hostfile", "HOSTFILE", "--node-rank", "0", "score"],
            "--master-addr is required",
        ),
        ("mpirun.sh", ["--bogus", "score"], "unknown option --bogus"),
        ("slurm.sbatch", ["score"], "not inside a Slurm allocation"),
    ],
)
def test_clear_errors(script, args, message, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=1\n")
    args = [str(hostfile) if a == "HOSTFILE" else a for a in args]
    env = base_env()
    for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST"):
        env.pop(k, None)
    p = run([LAUNCHER / script, *args], env=env, cwd=tmp_path, check=False, timeout=60)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_hostfile_example_parses():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(LAUNCHER / "hostfile.example"))
    assert list(pool.items()) == [("gpu-node-01", 8), ("gpu-node-02", 8)]


# ---------------------------------------------------------------------------------------------
# probe jobs: each launcher produces the expected world


def probe_env(**extra) -> dict:
    e = base_env(KDCL_MODULE="launch_probe", **extra)
    e["PYTHONPATH"] = f"{TESTS}:{e['PYTHONPATH']}" if e.get("PYTHONPATH") else str(TESTS)
    return e


def read_probe(out: Path, world: int) -> list[dict]:
    got = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for r, g in enumerate(got):
        assert g["me"]["rank"] == r and g["me"]["world_size"] == world
        assert g["me"]["sum"] == world * (world + 1) / 2  # the all_reduce crossed every rank
        assert [a["rank"] for a in g["all"]] == list(range(world))
    return [g["me"] for g in got]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "launcher", ["torchrun", pytest.param("deepspeed", marks=pytest.mark.slow)]
)
def test_local_cpu_probe(launcher, tmp_path):
    run(
        [LAUNCHER / "local_cpu.sh", "--launcher", launcher, "-n", 2, tmp_path / "out"],
        env=probe_env(),
        cwd=tmp_path,
    )
    me = read_probe(tmp_path / "out", 2)
    assert [m["local_rank"] for m in me] == [0, 1]
    assert all(m["master"].startswith("127.0.0.1:") for m in me)


FAKE_SRUN = r'''#!{python}
"""Stand-in for Slurm's srun inside an allocation: start the tasks on this machine with the
variables slurmstepd would set (SLURM_NODEID, SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS)."""
import os, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("--"):
    a = args.pop(0)
    if "=" in a:
        k, v = a.split("=", 1)
    elif a in ("--nodes", "--ntasks", "--ntasks-per-node"):
        k, v = a, args.pop(0)
    else:
        k, v = a, "1"
    opts[k] = v
nodes = int(opts.get("--nodes", os.environ["SLURM_NNODES"]))
ntasks = int(opts.get("--ntasks", os.environ.get("SLURM_NTASKS", nodes)))
per_node = int(opts.get("--ntasks-per-node", ntasks // nodes))
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
procs = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node * per_node + local),
                   SLURM_LOCALID=str(local), SLURM_NTASKS=str(nodes * per_node), SLURMD_NODENAME=f"node{{node}}")
        procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
'''

FAKE_SCONTROL = r"""#!/bin/sh
# Stand-in for `scontrol show hostnames LIST`: node0 .. node{{N-1}} for N = SLURM_NNODES.
[ "$1 $2" = "show hostnames" ] || {{ echo "fake scontrol: unsupported: $*" >&2; exit 1; }}
i=0; while [ $i -lt "$SLURM_NNODES" ]; do echo "node$i"; i=$((i+1)); done
"""


def fake_slurm(tmp_path: Path, nnodes: int, ntasks: int, **extra) -> dict:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.format())
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = probe_env(
        SLURM_JOB_ID=4242,
        SLURM_JOB_NODELIST=f"node[0-{nnodes - 1}]",
        SLURM_NNODES=nnodes,
        SLURM_NTASKS=ntasks,
        SLURM_SUBMIT_DIR=tmp_path,
        GPUS_PER_NODE=ntasks // nnodes,
        KDCL_MASTER_ADDR="127.0.0.1",
        KDCL_MASTER_PORT=free_port(),
        FAKE_SRUN_LOG=tmp_path / "srun.log",
        TMPDIR=tmp_path,
        **extra,
    )
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


@pytest.mark.distributed
@pytest.mark.slow
def test_slurm_deepspeed_mode_probe(tmp_path):
    """One srun task per node, each running the deepspeed launcher with --no_ssh --node_rank $SLURM_NODEID."""
    env = fake_slurm(tmp_path, nnodes=2, ntasks=2)
    run(["bash", LAUNCHER / "slurm.sbatch", tmp_path / "out"], env=env, cwd=tmp_path)
    me = read_probe(tmp_path / "out", 2)
    assert [m["local_rank"] for m in me] == [0, 0]  # one rank on each of the two nodes
    assert all(m["master"] == f"127.0.0.1:{env['KDCL_MASTER_PORT']}" for m in me)
    # the hostfile each node derived from the node list
    assert (tmp_path / "kdcl-hostfile.4242.1").read_text() == "node0 slots=1\nnode1 slots=1\n"
    assert "--ntasks-per-node 1" in (tmp_path / "srun.log").read_text()


@pytest.mark.distributed
@pytest.mark.slow
def test_slurm_srun_mode_probe(tmp_path):
    """One srun task per rank: RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/NTASKS/LOCALID."""
    env = fake_slurm(tmp_path, nnodes=1, ntasks=2, KDCL_SLURM_MODE="srun")
    run(["bash", LAUNCHER / "slurm.sbatch", tmp_path / "out"], env=env, cwd=tmp_path)
    me = read_probe(tmp_path / "out", 2)
    assert [m["local_rank"] for m in me] == [0, 1]


# ---------------------------------------------------------------------------------------------
# acceptance: score + train, same results under every launcher


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def score_args(assets, out: Path) -> list:
    return [
        "score",
        "--shards",
        assets["shards"],
        "--model",
        assets["student"],
        "--out",
        out,
        "--masks",
        2,
        "--seed",
        7,
        "--no-progress",
    ]


def train_args(assets, curriculum: Path, out: Path) -> list:
    return [
        "train",
        "--curriculum",
        curriculum,
        "--student",
        assets["student"],
        "--teacher",
        assets["teacher"],
        "--out",
        out,
        "--order",
        "sequential",
        "--reliance",
        "constant",
        "--lambda",
        0.5,
        "--global-batch",
        8,
        "--micro-batch",
        4,
        "--steps",
        TRAIN_STEPS,
        "--save-every",
        0,
        "--num-workers",
        0,
        "--seed",
        11,
        "--resume",
        "none",
        "--ds-config",
        REPO / "ds_configs" / "zero2.json",
        "warmup_steps=1",
    ]


def read_scores(scores_dir: Path) -> dict[str, float]:
    out = {}
    files = sorted(scores_dir.glob("*.scores.npz"))
    assert files, f"no score files in {scores_dir}"
    for f in files:
        with np.load(f) as z:
            for i, s in zip(z["ids"].tolist(), z["score"].tolist()):
                assert i not in out, f"{i} scored twice"
                out[i] = s
    return out


def final_weights(train_out: Path) -> dict:
    from kdcl_dist.export import consolidated_state_dict, resolve_checkpoint

    summary = json.loads((train_out / "train_summary.json").read_text())
    assert summary["steps_done"] == TRAIN_STEPS and summary["world_size"] == 2
    root, tag = resolve_checkpoint(train_out)
    assert tag == f"global_step{TRAIN_STEPS}"
    return consolidated_state_dict(root, tag)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not (a[k].shape == b[k].shape and bool((a[k] == b[k]).all()))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    """One node, 2 processes (torchrun via launcher/local_cpu.sh): scores, curriculum, 4 steps."""
    for m in (
        "kdcl_dist.commands.score",
        "kdcl_dist.commands.curriculum",
        "kdcl_dist.commands.train",
    ):
        if not _have(m):
            pytest.skip(f"{m} is not there yet")
    work = tmp_path_factory.mktemp("ref")
    run([LAUNCHER / "local_cpu.sh", "-n", 2, *score_args(tiny_assets, work / "scores")], cwd=work)
    run(
        [
            sys.executable,
            "-m",
            "kdcl_dist",
            "curriculum",
            "--shards",
            tiny_assets["shards"],
            "--scores",
            work / "scores",
            "--out",
            work / "curriculum",
        ],
        env=base_env(),
        cwd=work,
    )
    run(
        [
            LAUNCHER / "local_cpu.sh",
            "-n",
            2,
            *train_args(tiny_assets, work / "curriculum", work / "train"),
        ],
        cwd=work,
    )
    ref = {
        "work": work,
        "scores": read_scores(work / "scores"),
        "curriculum": work / "curriculum",
        "weights": final_weights(work / "train"),
    }
    # The comparison means something only if training moved the weights.
    from kdcl_dist.kd.models import load_mlm

    init = load_mlm(str(tiny_assets["student"])).state_dict()
    moved = [
        k for k, v in ref["weights"].items() if k in init and not bool((init[k].float() == v).all())
    ]
    assert moved, "training did not change any student weight"
    assert len(ref["scores"]) > 0
    return ref


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_on_one_machine_match_one_node(reference, tiny_assets, tmp_path):
    run_two_nodes(score_args(tiny_assets, tmp_path / "scores"), tmp_path)
    got = read_scores(tmp_path / "scores")
    assert got.keys() == reference["scores"].keys()
    assert got == reference["scores"]

    logs = run_two_nodes(
        train_args(tiny_assets, reference["curriculum"], tmp_path / "train"), tmp_path
    )
    assert all("nnodes=2, num_local_procs=1" in log for log in logs)
    assert_same_weights(final_weights(tmp_path / "train"), reference["weights"])


def mpirun_unavailable() -> str | None:
    py_dir = Path(sys.executable).parent
    if not ((py_dir / "mpirun").exists() or shutil.which("mpirun")):
        return "mpirun not found: install the mpi extra (pip install -e '.[mpi]')"
    if not _have("mpi4py"):
        return "mpi4py not importable: install the mpi extra (pip install -e '.[mpi]')"
    return None


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.mpi
def test_mpirun_matches_one_node(reference, tiny_assets, tmp_path):
    reason = mpirun_unavailable()
    if reason:
        pytest.skip(reason)
    mpi = [LAUNCHER / "mpirun.sh", "-np", 2, "--master-addr", "127.0.0.1"]
    run([*mpi, *score_args(tiny_assets, tmp_path / "scores")], cwd=tmp_path)
    assert read_scores(tmp_path / "scores") == reference["scores"]
    run([*mpi, *train_args(tiny_assets, reference["curriculum"], tmp_path / "train")], cwd=tmp_path)
    assert_same_weights(final_weights(tmp_path / "train"), reference["weights"])


@pytest.mark.distributed
@pytest.mark.slow
def test_mpirun_probe(tmp_path):
    """DeepSpeed's MPI discovery through kdcl_dist.dist.init(): ranks from mpi4py, our port kept."""
    reason = mpirun_unavailable()
    if reason:
        pytest.skip(reason)
    port = free_port()
    run(
        [
            LAUNCHER / "mpirun.sh",
            "-np",
            2,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            tmp_path / "out",
        ],
        env=probe_env(),
        cwd=tmp_path,
    )
    me = read_probe(tmp_path / "out", 2)
    assert [m["local_rank"] for m in me] == [0, 1]
    assert all(m["master"] == f"127.0.0.1:{port}" for m in me)


# ---------------------------------------------------------------------------------------------
# the real pdsh/ssh path: two hosts made of network namespaces


def netns_hosts_or_skip(tmp_path: Path):
    import netns_ssh

    reason = netns_ssh.unavailable_reason()
    if reason and os.environ.get("KDCL_TEST_INSTALL_SSH") == "1" and os.geteuid() == 0:
        netns_ssh.install_tools()
        reason = netns_ssh.unavailable_reason()
    if reason:
        pytest.skip(
            f"pdsh/ssh multi-host test: {reason}; CI installs openssh-server and pdsh "
            "(or set KDCL_TEST_INSTALL_SSH=1 to let this test apt-get them)"
        )
    return netns_ssh.two_hosts(tmp_path / "hosts")


@pytest.mark.distributed
@pytest.mark.slow
def test_pdsh_ssh_two_namespaces(reference, tiny_assets, tmp_path):
    """`deepspeed --hostfile` over pdsh/ssh into two sshd's on two network-namespace hosts."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    with netns_hosts_or_skip(tmp_path) as hosts:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{a} slots=1\n" for a in hosts.addrs))
        # Environment propagation as on a cluster: a .deepspeed_env file (DS_ENV_FILE names it)
        # whose lines DeepSpeed exports on every host before starting the ranks.
        ds_env = tmp_path / "deepspeed_env"
        # PATH too: an ssh session starts with the login PATH, where another `ninja` would make
        # DeepSpeed rebuild its JIT comm op (ninja versions disagree about the build log).
        ds_env.write_text(
            "\n".join(
                [
                    f"PATH={Path(sys.executable).parent}:{os.environ['PATH']}",
                    f"GLOO_SOCKET_IFNAME={hosts.ifname}",
                    "OMP_NUM_THREADS=1",
                    "TOKENIZERS_PARALLELISM=false",
                    "HF_HUB_OFFLINE=1",
                    "TRANSFORMERS_OFFLINE=1",
                    "KDCL_PROBE_ENV=propagated",
                ]
            )
            + "\n"
        )
        env = hosts.env(base_env(DS_ENV_FILE=ds_env))
        launch = [
            *hosts.exec_prefix(0),
            LAUNCHER / "deepspeed_hostfile.sh",
            "--hostfile",
            hostfile,
            "--master-port",
            free_port(),
        ]

        # 1) a probe: ranks on distinct hosts, environment propagated
        penv = dict(env, KDCL_MODULE="launch_probe", PYTHONPATH=str(TESTS))
        p = run([*launch, tmp_path / "probe"], env=penv, cwd=tmp_path)
        me = read_probe(tmp_path / "probe", 2)
        assert me[0]["netns"] != me[1]["netns"], "both ranks ran in the same network namespace"
        assert all(
            m["master"].startswith(f"{hosts.addrs[0]}:") for m in me
        )  # from `ssh host0 hostname -I`
        assert all(m["env_probe"] == "propagated" for m in me)
        assert all(m["cwd"] == str(tmp_path) for m in me)  # the launch directory, on every host
        assert f"{hosts.addrs[1]}: " in p.stdout  # pdsh prefixes each remote line with its host

        # 2) the real job: a few training steps, same weights as the one-node reference
        launch[-1] = free_port()
        p = run(
            [*launch, *train_args(tiny_assets, reference["curriculum"], tmp_path / "train")],
            env=env,
            cwd=tmp_path,
        )
        for a in hosts.addrs:
            assert f"{a}: " in p.stdout
        assert_same_weights(final_weights(tmp_path / "train"), reference["weights"])
