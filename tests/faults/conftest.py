"""Shared machinery of the fault suite (issue 7).

Stages run in *forked* children of the pytest process (`fork_run`): the parent has already
imported torch, transformers and deepspeed, so a stage run costs only its own work (a fresh
`python -m kdcl_dist` costs ~7 s of imports on a loaded 2-core machine). With world > 1 the
parent is a tiny torchrun: it forks one child per rank with RANK/WORLD_SIZE/MASTER_* set and,
like torchrun, kills the other ranks as soon as one rank dies.

Fault injection happens inside the child, before `kdcl_dist.cli.main` runs:
- kill points: every call of `os.replace` (the atomic writers' rename), `torch.save`
  (DeepSpeed checkpoint files, safetensors aside), `KDEngine.step` and the scorer's batch
  function is an *event*; `kill=(rank, n)` SIGKILLs that rank just before its n-th event.
  An undisturbed reference run reports how many events each rank had, so a seed picks n
  uniformly over the points where the stage really writes or computes.
- ENOSPC: a real, small tmpfs when mount works (root), else the n-th `os.replace` raises
  OSError(ENOSPC) (`enospc_fs`).

Expensive inputs are built once per session: a corpus, a tokenizer, a tiny teacher/student,
and an undisturbed reference run of every stage (`ref`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from _curriculum_fixture import free_port  # tests/ is on sys.path (tests/conftest.py)
from _curriculum_fixture import read_jsonl as read_jsonl  # re-exported to the fault tests
from _curriculum_fixture import student_weights as student_weights

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# settings of the tiny pipeline every fault test shares
N_DOCS = 240
SHARD_SIZE = 40  # 6 source shards
CUR_SHARD = 48  # 5 curriculum shards
GB, MB = 8, 4  # global batch, micro batch
STEPS = 8
SAVE_EVERY = 2
TRAIN_FLAGS = [
    "--global-batch",
    GB,
    "--micro-batch",
    MB,
    "--steps",
    STEPS,
    "--save-every",
    SAVE_EVERY,
    "--order",
    "random",
    "--reliance",
    "sr-paper",
    "--lr",
    3e-3,
    "--num-workers",
    0,
    "--ds-config",
    "ds_configs/zero2.json",
    "--allow-sr-any-order",
    "warmup_steps=2",
]


# ---------------------------------------------------------------------------------------
# forked runs with fault injection
# ---------------------------------------------------------------------------------------


@dataclass
class Run:
    rcs: list[int]  # exit status per rank (negative: killed by that signal)
    logs: list[str]  # stdout+stderr per rank
    events: list[int | None] = field(
        default_factory=list
    )  # fault events seen per rank (clean exits)
    wall: float = 0.0  # seconds from fork to the last exit

    @property
    def rc(self) -> int:
        bad = [r for r in self.rcs if r != 0]
        return bad[0] if bad else 0

    @property
    def ok(self) -> bool:
        return all(r == 0 for r in self.rcs)

    def error_lines(self) -> list[str]:
        return [ln for log in self.logs for ln in log.splitlines() if ": error: " in ln]

    def text(self) -> str:
        return "\n".join(
            f"--- rank {i} rc={r}\n{log[-4000:]}"
            for i, (r, log) in enumerate(zip(self.rcs, self.logs))
        )


def _install_faults(rank: int, kill: tuple | None, enospc_at: int | None, counter: list) -> None:
    """Wrap the event functions in this (child) process."""
    import torch

    from kdcl_dist.curriculum import scoring
    from kdcl_dist.kd import engine as kde

    kill_n = kill[1] if kill is not None and kill[0] == rank else None

    def event():
        counter[0] += 1
        if kill_n is not None and counter[0] >= kill_n:
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace, real_save = os.replace, torch.save
    replaces = [0]

    def replace(src, dst, *a, **k):
        event()
        replaces[0] += 1
        if enospc_at is not None and replaces[0] >= enospc_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **k)

    def save(*a, **k):
        event()
        return real_save(*a, **k)

    os.replace = replace
    torch.save = save
    real_step = kde.KDEngine.step

    def step(self, *a, **k):
        event()
        return real_step(self, *a, **k)

    kde.KDEngine.step = step
    real_losses = scoring.Scorer.losses

    def losses(self, *a, **k):
        event()
        return real_losses(self, *a, **k)

    scoring.Scorer.losses = losses


def _fresh_tqdm_lock() -> None:
    """Give this forked child its own tqdm write lock.

    tqdm's lock holds a multiprocessing semaphore created once per process tree and inherited
    across fork: a sibling SIGKILLed while drawing a progress bar leaves it held for good, and
    every later forked child would hang at its first bar. (Real launches start fresh processes.)
    """
    import threading

    from tqdm import std

    std.TqdmDefaultWriteLock.th_lock = threading.RLock()
    if hasattr(std.TqdmDefaultWriteLock, "mp_lock"):
        del std.TqdmDefaultWriteLock.mp_lock
    lock, todo = std.TqdmDefaultWriteLock(), [std.tqdm]
    while todo:  # tqdm.auto & co. are subclasses that may hold a lock of their own
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls is std.tqdm or "_lock" in cls.__dict__:
            cls._lock = lock


def _child(argv, rank, world, port, env, kill, enospc_at, log_path, events_path, pre):
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    rc = 1
    try:
        import logging

        _fresh_tqdm_lock()
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        # handlers created at import time (deepspeed's) still hold the parent's streams
        for lg in list(logging.Logger.manager.loggerDict.values()):
            for h in getattr(lg, "handlers", []):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.setStream(sys.stderr)
        for k in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "PMI_RANK",
            "PMI_SIZE",
        ):
            os.environ.pop(k, None)
        if world > 1:
            os.environ.update(
                {
                    "RANK": str(rank),
                    "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(world),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                }
            )
        os.environ.update({"KDCL_LOG_LEVEL": "WARNING", **(env or {})})
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        counter = [0]
        _install_faults(rank, kill, enospc_at, counter)
        if pre is not None:
            pre(rank)
        from kdcl_dist.cli import main

        try:
            rc = int(main([str(a) for a in argv]) or 0)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        with open(events_path, "w") as f:
            f.write(str(counter[0]))
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)


def _quiesce_threads() -> None:
    """fork() copies only the calling thread: a lock held by another thread stays locked in the
    child forever. tqdm's monitor thread holds tqdm's lock periodically (and zero_to_fp32, the
    exporter and the stages use tqdm), so stop it and never start it again."""
    import threading

    from tqdm import tqdm

    tqdm.monitor_interval = 0
    for t in threading.enumerate():
        if t.name == "tqdm_monitor" and hasattr(t, "exit"):
            t.exit()
    stack = [tqdm]
    while stack:  # the monitor is stored on the subclass that started it (tqdm.auto, ...)
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "monitor" in cls.__dict__:
            cls.monitor = None
    others = [
        t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
    ]
    assert not others, f"threads alive in the test process would make forked ranks unsafe: {others}"


def fork_run(
    argv,
    *,
    world: int = 1,
    env: dict | None = None,
    kill: tuple | None = None,
    enospc_at: int | None = None,
    timeout: float = 300,
    sigterm: tuple | None = None,
    pre=None,
    logdir: Path | None = None,
    kill_after: tuple | None = None,
    stop_others: bool = True,
) -> Run:
    """Run `kdcl-dist <argv>` on `world` forked ranks; see the module doc for the faults.

    sigterm=(rank, predicate): poll predicate() and send SIGTERM to that rank once it is true.
    kill_after=(rank, seconds): SIGKILL that rank from outside after `seconds` of wall time.
    stop_others=False: when a rank fails, let the other ranks finish on their own instead of
    killing them as torchrun does (to see that every rank fails the same way without hanging;
    `timeout` still applies).
    """
    import tempfile

    _quiesce_threads()
    logdir = Path(logdir or tempfile.mkdtemp(prefix="kdcl-faults-"))
    logdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    pids = []
    for r in range(world):
        log_path, ev_path = logdir / f"rank{r}.log", logdir / f"rank{r}.events"
        with contextlib.suppress(FileNotFoundError):
            ev_path.unlink()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(argv, r, world, port, env, kill, enospc_at, log_path, ev_path, pre)
        pids.append(pid)
    rcs: dict[int, int] = {}
    t0 = time.time()
    termed = False
    try:
        while len(rcs) < world:
            for r, pid in enumerate(pids):
                if r in rcs:
                    continue
                got, status = os.waitpid(pid, os.WNOHANG)
                if got:
                    rcs[r] = os.waitstatus_to_exitcode(status)
                    if (
                        rcs[r] != 0 and stop_others
                    ):  # torchrun's behaviour: one rank failed -> stop the others
                        for r2, p2 in enumerate(pids):
                            if r2 not in rcs:
                                with contextlib.suppress(ProcessLookupError):
                                    os.kill(p2, signal.SIGKILL)
            if (
                kill_after is not None
                and kill_after[0] not in rcs
                and time.time() - t0 >= kill_after[1]
            ):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[kill_after[0]], signal.SIGKILL)
            if sigterm is not None and not termed and sigterm[1]():
                os.kill(pids[sigterm[0]], signal.SIGTERM)
                termed = True
            if time.time() - t0 > timeout:
                raise AssertionError(
                    f"kdcl-dist {' '.join(map(str, argv))}: timed out after {timeout}s"
                )
            time.sleep(0.02)
    finally:
        for r, pid in enumerate(pids):
            if r not in rcs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    logs, events = [], []
    for r in range(world):
        logs.append((logdir / f"rank{r}.log").read_text(errors="replace"))
        ev = logdir / f"rank{r}.events"
        events.append(int(ev.read_text()) if ev.exists() else None)
    return Run([rcs[r] for r in range(world)], logs, events, time.time() - t0)


def must(run: Run, what: str = "") -> Run:
    assert run.ok, f"{what} failed:\n{run.text()}"
    return run


def one_line_error(run: Run, *needles: str) -> str:
    """The run failed with exit 2 and exactly one `kdcl-dist X: error:` line naming every needle."""
    assert run.rc == 2, f"expected a user error (exit 2):\n{run.text()}"
    lines = run.error_lines()
    assert lines, f"no one-line error:\n{run.text()}"
    for n in needles:
        assert any(n in ln for ln in lines), f"{n!r} not in the error: {lines}"
    assert "Traceback" not in "\n".join(run.logs), run.text()
    return lines[0]


def kill_point(seed: int, events: int, lo_frac: float = 0.0) -> int:
    """Seeded kill point in [lo, events] (1-based event number)."""
    import random

    lo = max(1, int(events * lo_frac))
    return random.Random(1000 + seed).randint(lo, max(lo, events))


def sigkill_one_rank(
    argv, ref_run: Run, seed: int, logdir, lo_frac: float = 0.0
) -> tuple[Run, int]:
    """Two ranks; rank `seed % 2` is SIGKILLed at its seeded kill point (from the reference run's
    event count). Asserts it really died by SIGKILL; returns the run and the kill point."""
    victim = seed % 2
    n = kill_point(seed, ref_run.events[victim], lo_frac)
    killed = fork_run(argv, world=2, kill=(victim, n), logdir=logdir)
    assert killed.rcs[victim] == -9, killed.text()
    return killed, n


def fork_refused(argv, logdir, *needles: str, **fork_kw) -> str:
    """Run a stage that must stop with one user-error line naming every needle; returns the line."""
    return one_line_error(fork_run(argv, logdir=logdir, **fork_kw), *needles)


def fork_out_of_space(argv, remount, logdir, enospc_at: int, **fork_kw) -> Run:
    """Run a stage on a full disk: the small tmpfs of `small_fs` when mounted (`remount` is not
    None), else the `enospc_at`-th atomic rename fails. The run must fail with ENOSPC."""
    run = fork_run(argv, enospc_at=None if remount else enospc_at, logdir=logdir, **fork_kw)
    assert run.rc != 0 and "No space left on device" in run.text(), run.text()
    return run


def rerun_with_space(argv, remount, logdir, size: str = "64m", **fork_kw) -> Run:
    """After `fork_out_of_space`: free space (grow the tmpfs) and re-run the stage to success."""
    if remount is not None:
        remount(size)
    return must(fork_run(argv, logdir=logdir, **fork_kw), "re-run")


def with_flag(argv, flag: str, value) -> list:
    """A copy of `argv` with the value after `flag` replaced."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def cut_file(path, keep: int) -> Path:
    """Truncate a file to its first `keep` bytes (negative: drop the last -keep bytes)."""
    path = Path(path)
    path.write_bytes(path.read_bytes()[:keep])
    return path


# ---------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------


def ids_multiset(shard_dir) -> list[tuple[str, bytes]]:
    """Sorted (sample id, token ids) of every sample of a shard set."""
    from kdcl_dist.data.reader import ShardSet

    ss = ShardSet(shard_dir)
    return sorted((s.meta["id"], np.asarray(s.ids).tobytes()) for s in ss)


def shard_entries(manifest_path) -> list[tuple]:
    m = json.loads(Path(manifest_path).read_text())
    return [(s["name"], s["count"], s["sha256"]) for s in m["shards"]]


def scores_table(scores_dir) -> dict[str, float]:
    out = {}
    for f in sorted(Path(scores_dir).glob("*.scores.npz")):
        with np.load(f, allow_pickle=False) as d:
            for i, s in zip(d["ids"], d["score"]):
                out[str(i)] = float(s)
    return out


def json_pair(name: str, out, ref_dir) -> tuple[dict, dict]:
    """The JSON file `name` (a stage's manifest) of a run's output and of the reference's."""
    a, b = (json.loads((Path(d) / name).read_text()) for d in (out, ref_dir))
    return a, b


def assert_finished_equal(
    out, ref_dir, pattern: str, rename: tuple[str, str] | None = None, what: str = ""
) -> None:
    """Whatever a killed or failed run left under a final name (`pattern`) is whole: it equals the
    reference's file of that name byte for byte. With `rename=(old, new)` the matched files only
    mark what is finished, and the file compared is the match's name with `old` replaced by `new`
    (a shard's `.stats.json` is written after its `.tar`)."""
    for f in Path(out).glob(pattern):
        name = f.name.replace(*rename) if rename else f.name
        assert (Path(out) / name).read_bytes() == (Path(ref_dir) / name).read_bytes(), (
            f"{name} differs{what}"
        )


def dir_digest(d, pattern: str = "*") -> dict[str, str]:
    from kdcl_dist.utils import sha256_file

    return {p.name: sha256_file(p) for p in sorted(Path(d).glob(pattern)) if p.is_file()}


def same_weights(a: dict, b: dict) -> list[str]:
    import torch

    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


# ---------------------------------------------------------------------------------------
# ENOSPC
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_fs(path: Path, size: str):
    """A real tmpfs of `size` at `path` (root only); yields a remount(size) function, or None."""
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        yield None
        return

    def remount(new_size: str):
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)

    try:
        yield remount
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---------------------------------------------------------------------------------------
# session fixtures: inputs and one undisturbed run of every stage
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _free_shm_of_killed_runs():
    """SIGKILLed 2-rank CPU DeepSpeed runs leave their all-reduce segments (~66 MiB a rank) in
    /dev/shm. The next train run frees them (`dist.release_stale_shm`); so does the suite's end."""
    yield
    from kdcl_dist.dist import remove_stale_shm

    remove_stale_shm(min_age_s=2)


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """Corpus jsonl, tokenizer, tiny teacher/student, second tokenizer (for fingerprint faults)."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_STUDENT, TINY_TEACHER, corpus_docs

    from kdcl_dist.data.tokenizer import train_wordpiece
    from kdcl_dist.kd.models import init_model_dir

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    docs = corpus_docs(N_DOCS)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    tok = train_wordpiece((t for _, t in docs), root / "tokenizer", vocab_size=1000)
    init_model_dir(TINY_TEACHER, tok, root / "teacher", seed=1, max_positions=256)
    init_model_dir(TINY_STUDENT, tok, root / "student", seed=2, max_positions=256)
    tok2 = train_wordpiece((t for _, t in docs), root / "tokenizer2", vocab_size=900)
    init_model_dir(TINY_TEACHER, tok2, root / "teacher2", seed=1, max_positions=256)
    return {
        "root": root,
        "corpus": corpus,
        "tokenizer": root / "tokenizer",
        "teacher": root / "teacher",
        "student": root / "student",
        "tokenizer2": root / "tokenizer2",
        "teacher2": root / "teacher2",
    }


def shard_argv(base, out):
    return [
        "shard",
        "--input",
        base["corpus"],
        "--tokenizer",
        base["tokenizer"],
        "--out",
        out,
        "--max-length",
        96,
        "--shard-size",
        SHARD_SIZE,
        "--min-tokens",
        4,
        "--no-progress",
    ]


def score_argv(base, shards, out):
    return [
        "score",
        "--shards",
        shards,
        "--model",
        base["student"],
        "--out",
        out,
        "--masks",
        2,
        "--token-budget",
        2048,
        "--no-progress",
    ]


def curriculum_argv(shards, scores, out):
    return [
        "curriculum",
        "--shards",
        shards,
        "--scores",
        scores,
        "--out",
        out,
        "--shard-size",
        CUR_SHARD,
        "--no-plots",
        "--no-progress",
    ]


def train_argv(base, cur, out, *extra):
    return [
        "train",
        "--curriculum",
        cur,
        "--student",
        base["student"],
        "--teacher",
        base["teacher"],
        "--out",
        out,
        *TRAIN_FLAGS,
        *extra,
    ]


def export_argv(train_out, out, *extra):
    return ["export", "--checkpoint", train_out, "--out", out, *extra]


def eval_argv(model, shards, out, *extra):
    return [
        "eval",
        "mlm",
        "--model",
        model,
        "--shards",
        shards,
        "--out",
        out,
        "--split",
        "all",
        "--masks",
        2,
        "--batch-size",
        16,
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="session")
def ref(base):
    """Undisturbed runs of every stage (2 ranks where the stage is distributed) + event counts."""
    root = base["root"] / "ref"
    logs = root / "logs"
    r = {}
    r["shard_run"] = must(
        fork_run(shard_argv(base, root / "shards"), world=2, logdir=logs / "shard"), "shard"
    )
    r["score_run"] = must(
        fork_run(
            score_argv(base, root / "shards", root / "scores"), world=2, logdir=logs / "score"
        ),
        "score",
    )
    r["cur_run"] = must(
        fork_run(
            curriculum_argv(root / "shards", root / "scores", root / "cur"),
            world=2,
            logdir=logs / "cur",
        ),
        "curriculum",
    )
    r["train_run"] = must(
        fork_run(train_argv(base, root / "cur", root / "train"), world=2, logdir=logs / "train"),
        "train",
    )
    r["export_run"] = must(
        fork_run(export_argv(root / "train", root / "export"), logdir=logs / "export"), "export"
    )
    r["eval_run"] = must(
        fork_run(
            eval_argv(root / "export", root / "shards", root / "eval.json"), logdir=logs / "eval"
        ),
        "eval",
    )
    r.update(
        {
            "shards": root / "shards",
            "scores": root / "scores",
            "cur": root / "cur",
            "train": root / "train",
            "export": root / "export",
            "eval": root / "eval.json",
        }
    )
    return r


def copy_tree(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)
