"""How `kdcl-dist experiment` starts its training and scoring steps (`--launcher`), and which GPUs
each concurrent run gets (docs/cluster.md, "The study on a cluster").

Every launcher is one of the tested scripts in kdcl_dist/launcher (tests/test_launchers.py);
this module only builds the command prefix that goes before `<stage> <stage args>`:

  torchrun   `torch.distributed.run --standalone` on this machine (one node; the default)
  deepspeed  `deepspeed_hostfile.sh` (pdsh/ssh into the hosts of --hostfile), or with
             deepspeed_nodes=here one `deepspeed_node.sh` per node rank started on this machine
             (a multi-node job on one machine, as the launcher tests run it)
  slurm      `sbatch --wait slurm.sbatch`: every step is its own Slurm job (nnodes nodes,
             nproc ranks per node), so the scheduler places concurrent runs
  mpirun     `mpirun.sh -np nnodes*nproc [--hostfile H]`
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import queue
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from kdcl_dist.errors import UserError

LAUNCHERS = ("torchrun", "deepspeed", "slurm", "mpirun")
DS_NODES = ("pdsh", "here")
BASE_PORT = 29500  # multi-host rendezvous: concurrent runs take BASE_PORT + their slot

# Starts one deepspeed_node.sh per node rank on this machine and waits for all of them; a node
# that fails takes the others down (they would wait for the rendezvous timeout otherwise).
# $1 script, $2 hostfile, $3 nodes, $4 ranks per node, $5 python; then the stage and its args.
_HERE_NODES = r"""set -euo pipefail
node_sh=$1 hf=$2 n=$3 g=$4 py=$5; shift 5
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((r = 0; r < n; r++)); do
    bash "$node_sh" --hostfile "$hf" --node-rank "$r" --master-addr 127.0.0.1 \
        --master-port "$port" --num-nodes "$n" --gpus-per-node "$g" "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
    if ! wait "$p"; then rc=1; kill "${pids[@]}" 2>/dev/null || true; fi
done
exit $rc
"""


def launcher_script(name: str) -> Path:
    from kdcl_dist.packaged import launcher_dir

    return launcher_dir() / name


def visible_gpus(env: dict | None = None, count=None) -> list[str]:
    """The GPU ids runs may use: CUDA_VISIBLE_DEVICES when set, else 0..N-1 of torch's count.

    `count`: a stand-in for torch.cuda.device_count (tests)."""
    env = os.environ if env is None else env
    v = env.get("CUDA_VISIBLE_DEVICES")
    if v is not None:
        return [g.strip() for g in v.split(",") if g.strip() and g.strip() != "-1"]
    if count is None:
        try:
            import torch

            count = torch.cuda.device_count()
        except Exception:  # no torch CUDA build: a CPU machine
            count = 0
    return [str(i) for i in range(count)]


def partition_gpus(gpus: list[str], concurrent: int, per_run: int) -> list[list[str]]:
    """Disjoint GPU sets, one per concurrent run, `per_run` GPUs each (one per rank).

    No GPUs (a CPU machine): every run gets [] and nothing is restricted."""
    if not gpus:
        return [[] for _ in range(concurrent)]
    need = concurrent * per_run
    if need > len(gpus):
        raise UserError(
            f"experiment.parallel: {concurrent} concurrent runs x {per_run} ranks need {need} GPUs, "
            f"{len(gpus)} visible ({','.join(gpus)}); lower parallel or nproc"
        )
    return [gpus[i * per_run : (i + 1) * per_run] for i in range(concurrent)]


class GpuSlots:
    """A pool of (slot, GPU set): a run holds one for its whole duration, so runs that execute at
    the same time never share a GPU (or, on several hosts, a rendezvous port)."""

    def __init__(self, sets: list[list[str]]):
        self._q: queue.Queue = queue.Queue()
        for i, s in enumerate(sets):
            self._q.put((i, s))

    @contextmanager
    def take(self):
        item = self._q.get()
        try:
            yield item
        finally:
            self._q.put(item)


def _hostfile_hosts(path: Path) -> list[tuple[str, int]]:
    hosts = []
    for line in path.read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[1].startswith("slots=") and parts[1][6:].isdigit():
            hosts.append((parts[0], int(parts[1][6:])))
    return hosts


@dataclasses.dataclass
class Launch:
    """The launcher of one experiment (from ExperimentConfig), bound to a slot by `bind`."""

    launcher: str = "torchrun"
    nproc: int = 1
    nnodes: int = 1
    hostfile: str = ""
    deepspeed_nodes: str = "pdsh"
    master_addr: str = ""
    slurm_args: str = ""
    slot: int = 0
    gpus: list[str] | None = None  # CUDA_VISIBLE_DEVICES of this run (None: leave as is)

    @classmethod
    def from_config(cls, cfg) -> Launch:
        return cls(
            launcher=cfg.launcher,
            nproc=cfg.nproc,
            nnodes=cfg.nnodes,
            hostfile=cfg.hostfile,
            deepspeed_nodes=cfg.deepspeed_nodes,
            master_addr=cfg.master_addr,
            slurm_args=cfg.slurm_args,
        )

    def bind(self, slot: int, gpus: list[str] | None) -> Launch:
        return dataclasses.replace(self, slot=slot, gpus=gpus)

    def single(self) -> Launch:
        """One rank on one node (evaluations): local for every launcher but slurm."""
        if self.launcher == "slurm":
            return dataclasses.replace(self, nproc=1, nnodes=1)
        return dataclasses.replace(self, launcher="torchrun", nproc=1, nnodes=1)

    @property
    def local(self) -> bool:
        """Every rank on this machine: the GPU partition applies (--parallel)."""
        return self.launcher == "torchrun" or (self.launcher == "mpirun" and not self.hostfile)

    @property
    def local_ranks(self) -> int:
        """Processes of one run on this machine (for the OMP threads of each)."""
        if self.launcher == "slurm":
            return 1
        if self.launcher == "deepspeed" and self.deepspeed_nodes == "here":
            return self.nproc * self.nnodes
        return self.nproc

    # -- checks: one line each, before any work -------------------------------------------
    def check(self, out: Path, programs: bool = True) -> None:
        """`programs=False` (writing a plan): only the settings and the hostfile."""
        c = self
        if c.launcher not in LAUNCHERS:
            raise UserError(
                f"experiment.launcher: {c.launcher!r} is not one of {', '.join(LAUNCHERS)}"
            )
        hf = Path(c.hostfile) if c.hostfile else None
        if hf is not None and c.launcher in ("torchrun", "slurm"):
            raise UserError(
                f"experiment.hostfile: {c.launcher} does not read a hostfile (deepspeed and mpirun do); "
                + (
                    "drop --hostfile"
                    if c.launcher == "torchrun"
                    else "Slurm allocates the nodes: drop --hostfile"
                )
            )
        if hf is not None and not hf.is_file():
            raise UserError(
                f"{hf}: hostfile not found; write one line '<host> slots=<n>' per node "
                "(see launcher/hostfile.example)"
            )
        if c.launcher == "torchrun" and c.nnodes > 1:
            raise UserError(
                f"experiment.nnodes: torchrun runs one node (got nnodes={c.nnodes}); use --launcher "
                "deepspeed, slurm or mpirun for runs across nodes"
            )
        if c.launcher == "deepspeed":
            if programs and importlib.util.find_spec("deepspeed") is None:
                raise UserError(
                    "experiment.launcher: deepspeed is not installed in this Python; pip install deepspeed"
                )
            if c.deepspeed_nodes == "pdsh":
                if hf is None:
                    raise UserError(
                        "experiment.hostfile: --launcher deepspeed needs --hostfile (lines '<host> slots=<n>'), "
                        "or deepspeed_nodes=here for every node on this machine"
                    )
                if programs and shutil.which("pdsh") is None:
                    raise UserError(
                        "pdsh not found on PATH: --launcher deepspeed starts the hosts through pdsh/ssh; "
                        "install pdsh, or use --launcher slurm"
                    )
            if hf is not None:
                hosts = _hostfile_hosts(hf)
                if len(hosts) < c.nnodes:
                    raise UserError(
                        f"{hf}: {len(hosts)} host line(s) '<host> slots=<n>' but nnodes={c.nnodes}"
                    )
            elif c.deepspeed_nodes == "here":
                # the node launcher only reads the count of lines and their slots
                self.hostfile = str(self._here_hostfile(out))
        if c.launcher == "slurm" and programs:
            for prog in ("sbatch", "srun", "scontrol"):
                if shutil.which(prog) is None:
                    raise UserError(
                        f"{prog} not found on PATH: --launcher slurm submits every step with sbatch --wait "
                        "(launcher/slurm.sbatch); run on a Slurm login node, or write the steps with --plan"
                    )
        if c.launcher == "mpirun" and programs:
            if (
                not (Path(sys.executable).parent / "mpirun").exists()
                and shutil.which("mpirun") is None
            ):
                raise UserError(
                    "mpirun not found (next to this Python or on PATH); pip install -e '.[mpi]' or load an MPI"
                )
            if importlib.util.find_spec("mpi4py") is None:
                raise UserError("mpi4py is not installed in this Python; pip install -e '.[mpi]'")

    def _here_hostfile(self, out: Path) -> Path:
        path = Path(out) / "hostfile.nodes"
        text = "".join(f"node{i} slots={self.nproc}\n" for i in range(self.nnodes))
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return path

    # -- the command ------------------------------------------------------------------------
    def prefix(self, log: Path | str, name: str = "", in_allocation: bool = False) -> list[str]:
        """The command that goes before `<stage> <args>`. `log`: where a Slurm job appends its
        output; `in_allocation`: already inside a Slurm job (a plan's jobs) -> run slurm.sbatch
        directly instead of submitting it."""
        from kdcl_dist.experiment import python_cli, torchrun_cli

        c = self
        if c.launcher == "torchrun":
            return torchrun_cli(c.nproc) if c.nproc > 1 else python_cli()
        if c.launcher == "deepspeed" and c.deepspeed_nodes == "here":
            return [
                "bash",
                "-c",
                _HERE_NODES,
                "kdcl-nodes",
                str(launcher_script("deepspeed_node.sh")),
                str(Path(c.hostfile).resolve()),
                str(c.nnodes),
                str(c.nproc),
                sys.executable,
            ]
        if c.launcher == "deepspeed":
            a = ["bash", str(launcher_script("deepspeed_hostfile.sh")), "--hostfile", c.hostfile]
            a += ["--num-nodes", str(c.nnodes), "--gpus-per-node", str(c.nproc)]
            a += ["--master-port", str(BASE_PORT + c.slot)]
            return a + (["--master-addr", c.master_addr] if c.master_addr else [])
        if c.launcher == "mpirun":
            a = ["bash", str(launcher_script("mpirun.sh")), "-np", str(c.nnodes * c.nproc)]
            if c.hostfile:
                a += ["--hostfile", c.hostfile, "--master-port", str(BASE_PORT + c.slot)]
            return a + (["--master-addr", c.master_addr] if c.master_addr else [])
        script = str(launcher_script("slurm.sbatch"))
        if in_allocation:
            return ["bash", script]
        import shlex

        job = "kdcl-" + (name or "step").replace("/", "-")
        return [
            "sbatch",
            "--wait",
            "--parsable",
            f"--job-name={job}",
            f"--nodes={c.nnodes}",
            f"--output={log}",
            "--open-mode=append",
            *shlex.split(c.slurm_args),
            script,
        ]

    def env(self) -> dict:
        """Variables the launcher reads (slurm.sbatch: ranks per node; every script: the Python)."""
        e = {"PYTHON": sys.executable}
        if self.launcher == "slurm":
            e["GPUS_PER_NODE"] = str(self.nproc)
        if self.gpus:
            e["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return e
