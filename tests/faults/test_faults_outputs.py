"""Issue 17 (bad input, round two): outputs.

- Modes: a whole pipeline (tokenizer, init-models, shard, score, curriculum, train 1 step,
  export, eval mlm, eval yesno) run under umask 002 and 022: every file and directory it
  writes has 0666 / 0777 less the umask (mkstemp/mkdtemp/safetensors gave 0600 / 0700).
- An output path that cannot be written: every one of the nine commands on a real read-only
  mount (tmpfs mounted `ro`; skipped without mount rights, unless a non-root user can use a
  chmod 0555 directory instead), `--out` naming an existing file (or, for eval, a path through a
  file or a directory). Each: one line `kdcl-dist <cmd>: error: ...` naming the path and the fix,
  exit 2, no traceback, nothing written, and no work started: the child's work entry points
  (process group, tokenizer/model loads, input reading, the stage functions) are replaced by a
  sentinel that exits 99, so reaching any of them fails the test.
- The distributed stages (shard, score, curriculum, train) on 2 ranks: both ranks fail with the
  same line (the other rank is not killed for them), neither hangs.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import fork_run, must

pytestmark = pytest.mark.faults

# entry points of real work, per module: a command that reaches one has started its work
WORK = {
    "kdcl_dist.dist": ("init", "stage"),
    "kdcl_dist.train": ("train", "init_distributed"),
    "kdcl_dist.data.tokenizer": ("load_tokenizer", "train_wordpiece"),
    "kdcl_dist.data.ingest": ("resolve_inputs", "resolve_inputs_skipped", "read_documents"),
    "kdcl_dist.kd.models": ("load_mlm", "load_pretrained", "init_model_dir"),
    "kdcl_dist.curriculum.scoring": ("score_shards",),
    "kdcl_dist.curriculum.build": ("build_curriculum",),
    "kdcl_dist.data.build": ("build_dataset",),
    "kdcl_dist.export": ("export_checkpoint", "resolve_checkpoint"),
    "kdcl_dist.evaluate.mlm": ("evaluate_mlm", "select_samples"),
    "kdcl_dist.evaluate.yesno": ("evaluate_yesno", "load_task"),
}


def no_work(_rank) -> None:
    """fork_run pre-hook: any work entry point prints `WORK STARTED: <name>` and exits 99."""
    import importlib

    def sentinel(name):
        def f(*_a, **_k):
            print(f"WORK STARTED: {name}", file=sys.stderr, flush=True)
            os._exit(99)

        return f

    for mod, names in WORK.items():
        m = importlib.import_module(mod)
        for n in names:
            setattr(m, n, sentinel(f"{mod}.{n}"))


def umask_hook(mask: int):
    def pre(_rank):
        os.umask(mask)

    return pre


# ---------------------------------------------------------------------------------------
# a small pipeline, all through the CLI
# ---------------------------------------------------------------------------------------


def _task(d: Path) -> Path:
    """A BLURB-format yes/no task of a few rows (the majority baseline needs nothing else)."""
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 12), ("dev", 4), ("test", 6)):
        rows = [
            {
                "sentence1": f"question {i}?",
                "sentence2": "some context words here",
                "label": "yes" if i % 3 else "no",
            }
            for i in range(n)
        ]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _corpus(path: Path, n: int = 90) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import corpus_docs

    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in corpus_docs(n)))
    return path


def run_pipeline(root: Path, mask: int | None) -> dict:
    """Every command of the pipeline in a forked child (umask `mask` when given); the paths."""
    root.mkdir(parents=True, exist_ok=True)
    corpus, task = _corpus(root / "corpus.jsonl"), _task(root / "task")
    o = root / "out"
    p = {
        "corpus": corpus,
        "task": task,
        "out": o,
        "tok": o / "tok",
        "models": o / "models",
        "student": o / "models" / "student",
        "teacher": o / "models" / "teacher",
        "shards": o / "shards",
        "scores": o / "scores",
        "cur": o / "cur",
        "train": o / "train",
        "export": o / "export",
        "eval": o / "eval",
    }
    stages = [
        ["tokenizer", "--input", corpus, "--out", p["tok"], "--vocab-size", 500],
        ["init-models", "--preset", "tiny", "--tokenizer", p["tok"], "--out", p["models"]],
        [
            "shard",
            "--input",
            corpus,
            "--tokenizer",
            p["tok"],
            "--out",
            p["shards"],
            "--max-length",
            64,
            "--shard-size",
            30,
            "--no-progress",
        ],
        [
            "score",
            "--shards",
            p["shards"],
            "--model",
            p["student"],
            "--out",
            p["scores"],
            "--no-progress",
        ],
        [
            "curriculum",
            "--shards",
            p["shards"],
            "--scores",
            p["scores"],
            "--out",
            p["cur"],
            "--shard-size",
            25,
            "--no-progress",
        ],
        [
            "train",
            "--curriculum",
            p["cur"],
            "--student",
            p["student"],
            "--teacher",
            p["teacher"],
            "--out",
            p["train"],
            "--steps",
            1,
            "--global-batch",
            2,
            "--micro-batch",
            2,
            "--save-every",
            1,
            "--num-workers",
            0,
        ],
        ["export", "--checkpoint", p["train"], "--out", p["export"]],
        [
            "eval",
            "mlm",
            "--model",
            p["export"],
            "--shards",
            p["shards"],
            "--split",
            "all",
            "--max-samples",
            12,
            "--out",
            p["eval"] / "mlm.json",
            "--per-sample",
            p["eval"] / "mlm.npz",
            "--no-progress",
        ],
        [
            "eval",
            "yesno",
            "--baseline-only",
            "--data",
            task,
            "--out",
            p["eval"] / "yesno.json",
            "--no-progress",
        ],
    ]
    for argv in stages:
        must(
            fork_run(
                argv, pre=None if mask is None else umask_hook(mask), logdir=root / "logs" / argv[0]
            ),
            " ".join(map(str, argv[:2])),
        )
    return p


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The pipeline under umask 002: its outputs are the modes test's subject and the other tests' inputs."""
    import kdcl_dist.kd.engine  # noqa: F401  (deepspeed imported once here, not in every forked child)

    return run_pipeline(tmp_path_factory.mktemp("out17") / "u002", 0o002)


# every kind of output the pipeline writes; the modes test checks these exist before checking modes
EXPECTED = [
    "tok/tokenizer.json",
    "tok/config.yaml",
    "models/config.yaml",
    "models/student/model.safetensors",
    "models/teacher/config.json",
    "shards/dataset.json",
    "shards/shard-000000.tar",
    "shards/shard-000000.idx.json",
    "shards/shard-000000.stats.json",
    "scores/scores.json",
    "scores/shard-000000.scores.npz",
    "scores/config.yaml",
    "cur/curriculum.json",
    "cur/order_scores.npy",
    "cur/shard-000000.tar",
    "cur/curriculum.png",
    "train/checkpoints/global_step1/kdcl_complete.json",
    "train/checkpoints/global_step1/mp_rank_00_model_states.pt",
    "train/metrics.jsonl",
    "train/train_summary.json",
    "train/student_config/config.json",
    "train/ds_config.json",
    "export/model.safetensors",
    "export/export.json",
    "export/tokenizer.json",
    "eval/mlm.json",
    "eval/mlm.npz",
    "eval/yesno.json",
]


def wrong_modes(root: Path, mask: int) -> list[str]:
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    bad = []
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        m = stat.S_IMODE(p.lstat().st_mode)
        want = dmode if p.is_dir() else fmode | (0o111 & dmode if m & 0o111 else 0)
        if m != want:
            bad.append(f"{m:04o} (want {want:04o}) {p.relative_to(root)}")
    return bad


@pytest.mark.parametrize("mask", [0o002, 0o022], ids=["umask002", "umask022"])
def test_every_output_follows_the_umask(pipe, tmp_path, mask):
    out = pipe["out"] if mask == 0o002 else run_pipeline(tmp_path / "u022", mask)["out"]
    missing = [e for e in EXPECTED if not (out / e).exists()]
    assert not missing, missing
    n = sum(1 for _ in out.rglob("*"))
    assert n > 60, n
    bad = wrong_modes(out, mask)
    assert not bad, f"{len(bad)} of {n} paths:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------
# output paths that cannot be written
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A real read-only directory: a tmpfs mounted `ro` (root), else a chmod 0555 directory for a
    non-root user (root writes there regardless: skipped)."""
    d = tmp_path_factory.mktemp("ro") / "ro"
    d.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)],
        capture_output=True,
        text=True,
    )
    if p.returncode == 0:
        yield d
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
        return
    if os.geteuid() == 0:
        pytest.skip(
            f"cannot mount a read-only tmpfs ({p.stderr.strip()[:80]}) and root ignores chmod 0555"
        )
    os.chmod(d, 0o555)
    yield d
    os.chmod(d, 0o755)


def unwritable_reason(d: Path) -> str:
    """The end of the error line for `d`: a read-only mount (root), or a chmod 0555 directory that
    a non-root user may not write (`utils.check_output_path` names the mode and owner then)."""
    if os.statvfs(d).f_flag & os.ST_RDONLY:
        return "on a read-only file system; choose a writable --out"
    st = d.stat()
    return (
        f"not writable by this user (mode {st.st_mode & 0o7777:04o}, owner uid {st.st_uid}); "
        "choose a writable --out or get write permission there"
    )


def argv_for(cmd: str, p: dict, out) -> list:
    """The command line of `cmd` with real inputs from the pipeline and `out` as its --out."""
    return {
        "tokenizer": ["tokenizer", "--input", p["corpus"], "--out", out, "--vocab-size", 500],
        "init-models": ["init-models", "--preset", "tiny", "--tokenizer", p["tok"], "--out", out],
        "shard": [
            "shard",
            "--input",
            p["corpus"],
            "--tokenizer",
            p["tok"],
            "--out",
            out,
            "--no-progress",
        ],
        "score": [
            "score",
            "--shards",
            p["shards"],
            "--model",
            p["student"],
            "--out",
            out,
            "--no-progress",
        ],
        "curriculum": [
            "curriculum",
            "--shards",
            p["shards"],
            "--scores",
            p["scores"],
            "--out",
            out,
            "--no-progress",
        ],
        "train": [
            "train",
            "--curriculum",
            p["cur"],
            "--student",
            p["student"],
            "--teacher",
            p["teacher"],
            "--out",
            out,
            "--steps",
            1,
            "--global-batch",
            2,
            "--micro-batch",
            2,
        ],
        "export": ["export", "--checkpoint", p["train"], "--out", out],
        "eval mlm": [
            "eval",
            "mlm",
            "--model",
            p["export"],
            "--shards",
            p["shards"],
            "--split",
            "all",
            "--out",
            out,
        ],
        "eval yesno": [
            "eval",
            "yesno",
            "--model",
            p["export"],
            "--data",
            p["task"],
            "--out",
            out,
            "--seeds",
            1,
        ],
    }[cmd]


DISTRIBUTED = ("shard", "score", "curriculum", "train")


def refused(argv, logdir, line: str, world: int = 1):
    """The run stopped on every rank with exactly `line` (one error line), exit 2, before any work."""
    run = fork_run(argv, world=world, pre=no_work, logdir=logdir, timeout=120, stop_others=False)
    text = run.text()
    assert "WORK STARTED" not in text, text
    assert "Traceback" not in text, text
    assert run.rcs == [2] * world, text
    for log in run.logs:
        errors = [ln for ln in log.splitlines() if ": error: " in ln]
        assert errors == [line], (errors, line)
    return run


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# (command, where --out points in the read-only directory, the tail of the error line)
RO_CASES = [
    (
        "tokenizer",
        "tok",
        "cannot be written there: {ro} is {reason}",
    ),
    ("init-models", "", "is {reason}"),
    (
        "shard",
        "shards",
        "cannot be written there: {ro} is {reason}",
    ),
    ("score", "", "is {reason}"),
    (
        "curriculum",
        "a/cur",
        "cannot be written there: {ro} is {reason}",
    ),
    ("train", "", "is {reason}"),
    ("export", "", "is {reason}"),
    (
        "eval mlm",
        "mlm.json",
        "cannot be written there: {ro} is {reason}",
    ),
    (
        "eval yesno",
        "yesno.json",
        "cannot be written there: {ro} is {reason}",
    ),
]


@pytest.mark.parametrize("cmd,sub,tail", RO_CASES, ids=[c[0] for c in RO_CASES])
def test_read_only_output_refused_before_any_work(pipe, read_only, tmp_path, cmd, sub, tail):
    out = read_only / sub if sub else read_only
    name = cmd.split()[0]
    tail = tail.format(ro=read_only, reason=unwritable_reason(read_only))
    line = f"kdcl-dist {name}: error: {out}: --out {tail}"
    run = refused(argv_for(cmd, pipe, out), tmp_path / "logs", line)
    assert run.wall < 10, run.wall  # forked child, no imports: ~0.2 s when nothing else runs
    assert _listing(read_only) == []


@pytest.mark.parametrize("cmd", DISTRIBUTED)
def test_read_only_output_two_ranks_fail_alike(pipe, read_only, tmp_path, cmd):
    line = (
        f"kdcl-dist {cmd}: error: {read_only / 'x'}: --out cannot be written there: {read_only} is "
        f"{unwritable_reason(read_only)}"
    )
    refused(argv_for(cmd, pipe, read_only / "x"), tmp_path / "logs", line, world=2)


@pytest.mark.parametrize(
    "cmd", ["tokenizer", "init-models", "shard", "score", "curriculum", "train", "export"]
)
def test_out_naming_a_file_refused_before_any_work(pipe, tmp_path, cmd):
    f = tmp_path / "existing.txt"
    f.write_text("keep me\n")
    before = _listing(tmp_path)
    line = (
        f"kdcl-dist {cmd}: error: {f}: exists and is a file; --out must name a directory: remove the file "
        "or choose another --out"
    )
    refused(argv_for(cmd, pipe, f), tmp_path / "logs", line, world=2 if cmd in DISTRIBUTED else 1)
    assert f.read_text() == "keep me\n"
    assert [x for x in _listing(tmp_path) if not x.startswith("logs")] == before


@pytest.mark.parametrize("cmd", ["eval mlm", "eval yesno"])
def test_eval_out_through_a_file_or_naming_a_directory_refused(pipe, tmp_path, cmd):
    f = tmp_path / "existing.json"
    f.write_text("{}")
    refused(
        argv_for(cmd, pipe, f / "r.json"),
        tmp_path / "l1",
        f"kdcl-dist eval: error: {f / 'r.json'}: cannot create --out here, {f} is a file, not a directory; "
        "choose another --out",
    )
    d = tmp_path / "results"
    d.mkdir()
    refused(
        argv_for(cmd, pipe, d),
        tmp_path / "l2",
        f"kdcl-dist eval: error: {d}: is a directory; --out must name a file (e.g. {d / 'result.json'})",
    )
    assert f.read_text() == "{}" and list(d.iterdir()) == []


def test_eval_mlm_per_sample_checked_before_work(pipe, tmp_path):
    f = tmp_path / "existing.json"
    f.write_text("{}")
    argv = argv_for("eval mlm", pipe, tmp_path / "ok.json") + ["--per-sample", f / "x.npz"]
    refused(
        argv,
        tmp_path / "l",
        f"kdcl-dist eval: error: {f / 'x.npz'}: cannot create --per-sample here, {f} is "
        "a file, not a directory; choose another --per-sample",
    )
    assert not (tmp_path / "ok.json").exists()


def test_not_writable_for_this_user_simulated(pipe, tmp_path):
    """A directory without write permission (as root chmod does not stop writes, so `os.access`,
    which the check uses, is made to answer as it does for a non-root user)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)

    def pre(rank):
        real = os.access
        os.access = lambda p, m, *a, **k: False if Path(p) == locked else real(p, m, *a, **k)
        no_work(rank)

    run = fork_run(
        argv_for("score", pipe, locked),
        world=2,
        pre=pre,
        logdir=tmp_path / "l",
        timeout=120,
        stop_others=False,
    )
    line = (
        f"kdcl-dist score: error: {locked}: --out is not writable by this user (mode 0555, owner uid "
        f"{os.getuid()}); choose a writable --out or get write permission there"
    )
    assert run.rcs == [2, 2], run.text()
    assert all(
        [ln for ln in log.splitlines() if ": error: " in ln] == [line] for log in run.logs
    ), run.text()
    assert "WORK STARTED" not in run.text()
