"""Training faults: SIGKILL of one rank at seeded points + `--resume auto`, SIGTERM (preemption),
ENOSPC while checkpointing, a `latest` tag naming an interrupted checkpoint, a corrupt checkpoint,
a checkpoint resumed against another curriculum, NaN losses, and bad flags/configs.

Proof that nothing is lost: the resumed run's per-step sample positions (samples.jsonl), losses
and final student weights (fp32 on CPU: bit for bit) equal those of the undisturbed reference run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from .conftest import (
    STEPS,
    curriculum_argv,
    cut_file,
    fork_refused,
    fork_run,
    must,
    read_jsonl,
    same_weights,
    sigkill_one_rank,
    small_fs,
    student_weights,
    train_argv,
    with_flag,
)

pytestmark = pytest.mark.faults


def _same_as_ref(out: Path, ref) -> None:
    a, b = read_jsonl(ref["train"] / "samples.jsonl"), read_jsonl(out / "samples.jsonl")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert a == b, "per-step sample positions differ from the undisturbed run"
    ma, mb = read_jsonl(ref["train"] / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    assert [m["lambda"] for m in ma] == [m["lambda"] for m in mb]
    tag = f"global_step{STEPS}"
    diff = same_weights(
        student_weights(ref["train"] / "checkpoints" / tag),
        student_weights(out / "checkpoints" / tag),
    )
    assert not diff, f"final weights differ: {diff[:5]}"


def _ref_final(ref) -> dict:
    return student_weights(ref["train"] / "checkpoints" / f"global_step{STEPS}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_train_sigkill_one_rank_then_resume_auto(base, ref, tmp_path, seed):
    out = tmp_path / "train"
    sigkill_one_rank(
        train_argv(base, ref["cur"], out), ref["train_run"], seed, tmp_path / "k", lo_frac=0.2
    )
    resumed = must(
        fork_run(
            train_argv(base, ref["cur"], out, "--resume", "auto"), world=2, logdir=tmp_path / "r"
        ),
        "resume",
    )
    assert resumed.ok
    _same_as_ref(out, ref)


@pytest.mark.distributed
@pytest.mark.slow
def test_train_sigterm_checkpoints_current_step_and_resumes_identically(base, ref, tmp_path):
    out = tmp_path / "train"

    def reached_step_3():
        try:
            return any(
                json.loads(ln)["step"] >= 3
                for ln in (out / "metrics.jsonl").read_text().splitlines()
            )
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False

    # SAVE_EVERY=2: a checkpoint at an odd step can only come from the SIGTERM handler
    run = fork_run(
        train_argv(base, ref["cur"], out),
        world=2,
        sigterm=(1, reached_step_3),
        logdir=tmp_path / "k",
    )
    assert run.ok, f"SIGTERM must end in a clean exit:\n{run.text()}"
    summary = json.loads((out / "train_summary.json").read_text())
    last = read_jsonl(out / "metrics.jsonl")[-1]["step"]
    assert summary["stopped_by"] == "SIGTERM" and summary["steps_done"] == last < STEPS
    from kdcl_dist import checkpoint as ckpt

    latest = ckpt.latest_complete(out / "checkpoints")
    assert latest.name == f"global_step{last}", "no checkpoint at the step SIGTERM interrupted"
    assert json.loads((latest / ckpt.MARKER).read_text())["consumed_samples"] == last * 8
    must(
        fork_run(
            train_argv(base, ref["cur"], out, "--resume", "auto"), world=2, logdir=tmp_path / "r"
        ),
        "resume",
    )
    assert read_jsonl(out / "resume_log.jsonl")[-1]["step"] == last
    _same_as_ref(out, ref)


@pytest.mark.distributed
@pytest.mark.slow
def test_train_latest_tag_points_to_incomplete_checkpoint(base, ref, tmp_path):
    out = shutil.copytree(ref["train"], tmp_path / "train")
    ck = out / "checkpoints"
    (ck / f"global_step{STEPS}" / "kdcl_complete.json").unlink()  # the save never completed ...
    cut_file(
        ck / f"global_step{STEPS}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 1000
    )  # ... one rank's file cut
    assert (ck / "latest").read_text().strip() == f"global_step{STEPS}"
    for name in ("train_summary.json",):
        (out / name).unlink()
    must(
        fork_run(
            train_argv(base, ref["cur"], out, "--resume", "auto"), world=2, logdir=tmp_path / "r"
        ),
        "resume",
    )
    assert read_jsonl(out / "resume_log.jsonl")[-1]["step"] == STEPS - 2
    _same_as_ref(out, ref)


def _damage(tag_dir: Path, name: str, how: str) -> Path:
    """Damage one file of a complete checkpoint after its marker was written (disk/copy fault)."""
    f = tag_dir / name
    b = bytearray(f.read_bytes())
    if how == "cut":
        f.write_bytes(bytes(b[:5000]))
    else:  # one flipped bit in the middle, same size
        b[len(b) // 2] ^= 0x10
        f.write_bytes(bytes(b))
    return f


@pytest.mark.distributed
@pytest.mark.slow
def test_train_damaged_newest_checkpoint_resume_auto_falls_back(base, ref, tmp_path):
    """A file of the newest *complete* checkpoint is cut: `--resume auto` warns, takes the newest
    intact one (step 6), and the run ends exactly as the undisturbed one (ids, losses, weights)."""
    out = shutil.copytree(ref["train"], tmp_path / "train")
    ck = out / "checkpoints"
    _damage(ck / f"global_step{STEPS}", "mp_rank_00_model_states.pt", "cut")
    (out / "train_summary.json").unlink()
    run = must(
        fork_run(
            train_argv(base, ref["cur"], out, "--resume", "auto"), world=2, logdir=tmp_path / "r"
        ),
        "resume",
    )
    warn = [ln for ln in run.logs[0].splitlines() if "skipping the damaged checkpoint" in ln]
    assert warn and "mp_rank_00_model_states.pt" in warn[0] and "was cut" in warn[0], run.text()
    assert read_jsonl(out / "resume_log.jsonl")[-1]["step"] == STEPS - 2
    _same_as_ref(out, ref)
    from kdcl_dist import checkpoint as ckpt

    # the damaged tag was replaced by a fresh, intact save of the same step
    assert ckpt.damage(ck / f"global_step{STEPS}") is None


@pytest.mark.parametrize(
    "name,how,needle",
    [
        ("mp_rank_00_model_states.pt", "cut", "was cut"),
        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "flip", "sha256"),
    ],
)
def test_train_explicit_resume_of_damaged_checkpoint_one_line_error(
    base, ref, tmp_path, name, how, needle
):
    out = shutil.copytree(ref["train"], tmp_path / "train")
    tag = out / "checkpoints" / f"global_step{STEPS}"
    _damage(tag, name, how)
    before = {p.name: p.stat().st_mtime_ns for p in tag.iterdir()}
    fork_refused(
        train_argv(base, ref["cur"], out, "--steps", STEPS + 2, "--resume", tag),
        tmp_path / "r",
        name,
        needle,
        "damaged",
    )
    assert {p.name: p.stat().st_mtime_ns for p in tag.iterdir()} == before  # nothing rewritten


def test_train_every_checkpoint_damaged_one_line_error(base, ref, tmp_path):
    out = shutil.copytree(ref["train"], tmp_path / "train")
    ck = out / "checkpoints"
    tags = sorted(d for d in ck.iterdir() if d.is_dir())
    for d in tags:
        _damage(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "cut")
    fork_refused(
        train_argv(base, ref["cur"], out),
        tmp_path / "r",
        "every complete checkpoint is damaged",
        "--resume none",
    )
    assert sorted(d for d in ck.iterdir() if d.is_dir()) == tags


def test_checkpoint_command_on_damaged_checkpoint(ref, tmp_path):
    """`kdcl-dist checkpoint list` flags it; `checkpoint universal` refuses it before DeepSpeed reads it."""
    out = shutil.copytree(ref["train"], tmp_path / "train")
    tag = out / "checkpoints" / f"global_step{STEPS}"
    _damage(tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt", "cut")
    run = must(fork_run(["checkpoint", "list", "--out", out], logdir=tmp_path / "l"), "list")
    states = {
        ln.split()[0]: ln.split()[1]
        for ln in run.logs[0].splitlines()
        if ln.startswith("global_step")
    }
    assert states == {
        f"global_step{STEPS - 4}": "complete",
        f"global_step{STEPS - 2}": "complete",
        f"global_step{STEPS}": "DAMAGED",
    }, run.text()
    fork_refused(
        ["checkpoint", "universal", "--checkpoint", tag],
        tmp_path / "u",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "damaged",
    )
    assert not (out / "checkpoints" / f"global_step{STEPS}_universal").exists()
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_train_resume_against_other_curriculum_refused(base, ref, tmp_path):
    other = tmp_path / "cur2"
    must(
        fork_run(
            with_flag(curriculum_argv(ref["shards"], ref["scores"], other), "--shard-size", 60),
            logdir=tmp_path / "c",
        ),
        "other curriculum",
    )
    out = shutil.copytree(ref["train"], tmp_path / "train")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    fork_refused(
        train_argv(base, other, out),
        tmp_path / "t",
        "checkpoint was made for curriculum",
        "--resume none",
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


@pytest.mark.distributed
@pytest.mark.slow
def test_train_enospc_during_checkpoint_then_resume(base, ref, tmp_path):
    out = tmp_path / "fs"
    with small_fs(out, "2600k") as remount:
        if remount is None:
            pytest.skip("needs root for a real tmpfs (torch.save writes without the atomic writer)")
        run = fork_run(train_argv(base, ref["cur"], out), world=2, logdir=tmp_path / "k")
        assert run.rc != 0, run.text()
        # the rank whose write failed says so in one line (exit 2, no traceback); the other rank
        # is stopped by the launcher
        failed = [i for i, rc in enumerate(run.rcs) if rc == 2]
        assert failed, run.text()
        lines = [ln for ln in run.logs[failed[0]].splitlines() if ": error: " in ln]
        assert (
            lines and "No space left on device" in lines[0] and "point --out elsewhere" in lines[0]
        ), run.text()
        assert "Traceback" not in run.logs[failed[0]], run.text()
        from kdcl_dist import checkpoint as ckpt

        items = ckpt.list_checkpoints(out / "checkpoints")
        done = [s for s, _, ok in items if ok]
        assert done and max(done) < STEPS
        # nothing partial under a final name: the failed save's directory and temp files are gone
        assert all(ok for _, _, ok in items), items
        assert not [p for p in out.rglob(".tmp-*")]
        assert all(ckpt.damage(d) is None for _, d, _ in items)
        remount("256m")
        must(fork_run(train_argv(base, ref["cur"], out), world=2, logdir=tmp_path / "r"), "resume")
        _same_as_ref(out, ref)


def _torch_save_fails_in(tag: str):
    """A `pre` hook: the first torch.save into checkpoint `tag` writes part of its file, then fails as
    torch's zip writer does on a full disk (no errno), and the file system reports no free space."""

    def pre(_rank):
        import torch

        from kdcl_dist import checkpoint as ckpt

        real = torch.save

        def save(obj, f, *a, **k):
            if isinstance(f, (str, Path)) and Path(f).parent.name == tag:
                Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 1000)
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 1004"
                )
            return real(obj, f, *a, **k)

        torch.save = save
        ckpt._free_bytes = lambda path: 0

    return pre


def test_train_checkpoint_write_fails_like_a_full_disk(base, ref, tmp_path):
    """Without root (no tmpfs): torch.save fails mid-file with "unexpected pos" at the 2nd checkpoint.
    One line names the checkpoint and the fix; the partial directory is gone; the resume completes."""
    out = tmp_path / "train"
    argv = train_argv(base, ref["cur"], out, "--steps", 4, "--save-every", 2)
    fork_refused(
        argv,
        tmp_path / "k",
        "global_step4",
        "No space left on device",
        "point --out elsewhere",
        pre=_torch_save_fails_in("global_step4"),
    )
    from kdcl_dist import checkpoint as ckpt

    items = ckpt.list_checkpoints(out / "checkpoints")
    assert [(s, ok) for s, _, ok in items] == [(2, True)], items
    assert ckpt.damage(items[0][1]) is None and not list(out.rglob(".tmp-*"))
    must(fork_run(argv, logdir=tmp_path / "r"), "resume after freeing space")
    assert read_jsonl(out / "resume_log.jsonl")[-1]["step"] == 2
    assert [r["step"] for r in read_jsonl(out / "samples.jsonl")] == [1, 2, 3, 4]
    assert ckpt.damage(out / "checkpoints" / "global_step4") is None


def test_cli_names_a_full_disk_in_one_line(tmp_path, capsys):
    """ENOSPC/EDQUOT found through __cause__/__context__ and in wrapped library messages; other errors
    keep their traceback."""
    import errno

    from kdcl_dist import cli

    def wrapped():
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "x.tar"))
        except OSError as e:
            raise RuntimeError("writer failed") from e

    for exc, code, name in [
        (OSError(errno.ENOSPC, "No space left on device", "/a/b"), errno.ENOSPC, "/a/b"),
        (_raised(wrapped), errno.EDQUOT, str(tmp_path / "x.tar")),
        (
            RuntimeError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                'left on device" })'
            ),
            errno.ENOSPC,
            None,
        ),
    ]:
        assert cli.disk_full(exc) == (code, name)
    assert cli.disk_full(RuntimeError("unexpected pos 10 vs 8")) is None
    assert cli.disk_full(ValueError("bad")) is None
    msg = cli.disk_full_message(errno.ENOSPC, None, type("A", (), {"out": str(tmp_path / "o")})())
    assert (
        msg.startswith(f"{tmp_path / 'o'}: No space left on device; free space on /")
        and "point --out elsewhere" in msg
    )


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("did not raise")


def _nan_at(calls: set[int], ranks=None):
    """A `pre` hook for fork_run: the KD loss is NaN at the given (1-based) loss calls.

    One rank, global batch 8, micro batch 4: two calls per step, so call 5 is step 3; two ranks:
    one call per step and rank. `ranks`: the ranks that see the NaN (default: all).
    """

    def pre(rank):
        if ranks is not None and rank not in ranks:
            return
        import torch

        from kdcl_dist.kd import losses

        real, state = losses.masked_kd_losses, {"n": 0}

        def fake(*a, **k):
            state["n"] += 1
            res = real(*a, **k)
            if state["n"] in calls:
                res = dict(res, loss=res["loss"] * torch.tensor(float("nan")))
            return res

        losses.masked_kd_losses = fake

    return pre


def _record_states(logdir: Path):
    """A `pre` hook: after every engine step each rank appends digests of its student weights and
    of its optimizer state (the innermost torch optimizer: ZeRO-2/3 ranks hold their partition) to
    `logdir/state{rank}.jsonl`."""

    def pre(rank):
        import hashlib

        from kdcl_dist.kd import engine as kde

        real = kde.KDEngine.step

        def digest(tensors) -> str:
            h = hashlib.sha256()
            for t in tensors:
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        def step(self, *a, **k):
            res = real(self, *a, **k)
            opt = self.engine.optimizer
            while hasattr(opt, "optimizer"):  # DeepSpeed's ZeRO wrapper -> torch's AdamW
                opt = opt.optimizer
            state = [v for p in opt.state for v in opt.state[p].values() if hasattr(v, "float")]

            # ZeRO-3: a rank holds its partition of each parameter (ds_tensor), padded to an
            # equal size per rank; the padding is never written (uninitialised memory), so
            # hash only the elements that belong to the parameter
            def held(p):
                t = getattr(p, "ds_tensor", None)
                if t is None:
                    return p
                t = t.view(-1)
                start = self.engine.global_rank * t.numel()
                return t[: max(0, min(t.numel(), p.ds_numel - start))]

            weights = (held(p) for _, p in self.engine.module.named_parameters())
            rec = {
                "step": self.global_steps,
                "weights": digest(weights),
                "optim": digest(state),
                "lr": self.lr(),
            }
            with open(logdir / f"state{rank}.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            return res

        kde.KDEngine.step = step

    return pre


def _override(argv: list, kv: str) -> list:
    """argv with KEY=VALUE added to its one trailing group of overrides (TRAIN_FLAGS' warmup_steps=2)."""
    i = next(i for i, a in enumerate(argv) if isinstance(a, str) and a.startswith("warmup_steps="))
    return [*argv[: i + 1], kv, *argv[i + 1 :]]


def _both(*hooks):
    def pre(rank):
        for h in hooks:
            h(rank)

    return pre


def _finite(tag_dir) -> bool:
    import torch

    return all(bool(torch.isfinite(v).all()) for v in student_weights(tag_dir).values())


def _is_nan(x) -> bool:  # metrics.jsonl writes NaN as null
    return x is None or x != x


def test_train_nan_loss_step_skipped_zero2(base, ref, tmp_path):
    """ZeRO-1/2: DeepSpeed's overflow check skips the optimizer step; training goes on."""
    out = tmp_path / "train"
    run = must(
        fork_run(
            train_argv(base, ref["cur"], out, "--steps", 4, "--save-every", 4),
            pre=_nan_at({5}),
            logdir=tmp_path / "t",
        ),
        "train with one NaN step",
    )
    assert "step 3: non-finite loss on rank 0; step skipped" in run.text()
    m = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert _is_nan(m[2]["loss"]) and not any(_is_nan(r["loss"]) for i, r in enumerate(m) if i != 2)
    assert [r["nonfinite_steps"] for r in m] == [0, 0, 1, 1]
    assert _finite(out / "checkpoints" / "global_step4"), "NaN reached the weights"


def test_train_nan_loss_step_skipped_zero0(base, ref, tmp_path):
    """ZeRO-0 (the default cpu_fp32.json): torch's AdamW has no overflow check; the engine skips."""
    out = tmp_path / "train"
    must(
        fork_run(
            train_argv(
                base,
                ref["cur"],
                out,
                "--steps",
                4,
                "--save-every",
                4,
                "--ds-config",
                "ds_configs/cpu_fp32.json",
            ),
            pre=_nan_at({5}),
            logdir=tmp_path / "t",
        ),
        "train",
    )
    assert _finite(out / "checkpoints" / "global_step4"), "NaN reached the weights"
    summary = json.loads((out / "train_summary.json").read_text())
    assert (
        summary["zero_stage"] == 0
        and summary["nonfinite_steps"] == 1
        and summary["skipped_steps"] == [3]
    )


def test_train_nan_loss_step_counted(base, ref, tmp_path):
    out = tmp_path / "train"
    must(
        fork_run(
            train_argv(base, ref["cur"], out, "--steps", 4, "--save-every", 4),
            pre=_nan_at({5}),
            logdir=tmp_path / "t",
        ),
        "train with one NaN step",
    )
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["skipped_steps"] == [3]
    assert summary["loss_scale_overflows"] == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert [e.value for e in ea.Scalars("train/nonfinite_steps")] == [0, 0, 1, 1]


def test_train_nan_teacher_logits_named(base, ref, tmp_path):
    """The warning names the culprit: NaN teacher logits (and the KD term they poison), not the total."""

    def pre(_rank):
        import torch

        from kdcl_dist.kd import engine as kde

        real, state = kde.KDEngine._teacher_forward, {"n": 0}

        def fake(self, *a, **k):
            state["n"] += 1
            h, logits = real(self, *a, **k)
            return h, logits * torch.tensor(float("nan")) if state["n"] == 3 else logits

        kde.KDEngine._teacher_forward = fake

    out = tmp_path / "train"
    run = must(
        fork_run(
            train_argv(
                base,
                ref["cur"],
                out,
                "--steps",
                3,
                "--save-every",
                3,
                "--ds-config",
                "ds_configs/cpu_fp32.json",
            ),
            pre=pre,
            logdir=tmp_path / "t",
        ),
        "train",
    )
    assert "step 2: non-finite teacher logits + kd loss on rank 0; step skipped" in run.text()
    assert json.loads((out / "train_summary.json").read_text())["skipped_steps"] == [2]
    assert _finite(out / "checkpoints" / "global_step3")


def test_train_nan_loss_in_a_row_aborts(base, ref, tmp_path):
    out = tmp_path / "train"
    line = fork_refused(
        train_argv(base, ref["cur"], out, "--steps", 8, "--save-every", 100),
        tmp_path / "t",
        "non-finite",
        "train.max_nonfinite_steps",
        "steps 1-5",
        pre=_nan_at(set(range(2, 100))),
    )
    assert "weights are those after step 0" in line
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # the limit is an option: 0 never aborts
    out2 = tmp_path / "train2"
    must(
        fork_run(
            _override(
                train_argv(base, ref["cur"], out2, "--steps", 3, "--save-every", 100),
                "max_nonfinite_steps=0",
            ),
            pre=_nan_at(set(range(2, 100))),
            logdir=tmp_path / "t2",
        ),
        "max_nonfinite_steps=0",
    )
    assert json.loads((out2 / "train_summary.json").read_text())["skipped_steps"] == [1, 2, 3]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ds", ["cpu_fp32", "zero2", "zero3"])
def test_train_nan_on_one_rank_skipped_by_both(base, ref, tmp_path, ds):
    """2 ranks, the loss is NaN on rank 1 only at step 3: both ranks skip that step (weights and
    optimizer state after step 3 are those after step 2, bit for bit, on each rank; the ranks stay
    identical), the lr schedule, data order and counters go on exactly as in an undisturbed run,
    and a resume from a checkpoint taken right after the skipped step is bit-exact and continues
    the count."""
    flags = ("--steps", 5, "--save-every", 100, "--keep", 5, "--ds-config", f"ds_configs/{ds}.json")
    nan = _nan_at({3}, ranks={1})

    def run(out, name, pre, *extra, override=None):
        logdir = tmp_path / name
        argv = train_argv(base, ref["cur"], out, *flags, *extra)
        must(
            fork_run(
                _override(argv, override) if override else argv,
                world=2,
                pre=_both(pre, _record_states(logdir)),
                logdir=logdir,
            ),
            name,
        )
        return [read_jsonl(logdir / f"state{r}.jsonl") for r in (0, 1)], logdir

    (a0, a1), a_logs = run(tmp_path / "a", "a", nan)
    (b0, b1), _ = run(tmp_path / "b", "b", lambda r: None)
    # the decision was taken on both ranks: rank 0 saw a finite loss and still skipped
    for a in (a0, a1):
        assert [r["step"] for r in a] == [1, 2, 3, 4, 5]
        assert a[2]["weights"] == a[1]["weights"] and a[2]["optim"] == a[1]["optim"], (
            "step 3 changed the state"
        )
        assert a[3]["weights"] != a[2]["weights"], "training did not go on after the skipped step"
    if ds != "zero3":  # ZeRO-3 ranks hold different partitions
        assert [r["weights"] for r in a0] == [r["weights"] for r in a1], "the ranks' weights differ"
    if ds == "cpu_fp32":  # ZeRO-0: every rank holds the whole optimizer state
        assert [r["optim"] for r in a0] == [r["optim"] for r in a1]
    # before the NaN: the undisturbed run; after step 3: still the undisturbed run's step-2 state
    for a, b in ((a0, b0), (a1, b1)):
        assert a[:2] == b[:2]
        assert (a[2]["weights"], a[2]["optim"]) == (b[1]["weights"], b[1]["optim"])
        assert [r["lr"] for r in a] == [r["lr"] for r in b], (
            "the lr schedule must follow the global step"
        )
    assert read_jsonl(tmp_path / "a" / "samples.jsonl") == read_jsonl(
        tmp_path / "b" / "samples.jsonl"
    )
    ma, mb = (
        read_jsonl(tmp_path / "a" / "metrics.jsonl"),
        read_jsonl(tmp_path / "b" / "metrics.jsonl"),
    )
    assert [m["lr"] for m in ma] == [m["lr"] for m in mb]
    assert [m["consumed_samples"] for m in ma] == [8, 16, 24, 32, 40]
    assert _is_nan(ma[2]["loss"]) and not any(
        _is_nan(m["loss"]) for i, m in enumerate(ma) if i != 2
    )
    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["skipped_steps"] == [3]
    rank0 = (a_logs / "rank0.log").read_text()
    assert "step 3: non-finite loss on rank 1; step skipped" in rank0
    assert "non-finite" not in (a_logs / "rank1.log").read_text(), "the warning is rank 0's alone"
    assert _finite(tmp_path / "a" / "checkpoints" / "global_step5")

    # preempted right after the skipped step (checkpoint at 3), resumed without the fault
    c = tmp_path / "c"
    run(c, "c1", nan, override="max_steps_per_run=3")
    assert json.loads((c / "train_summary.json").read_text())["stopped_by"] == "max_steps_per_run"
    run(c, "c2", lambda r: None, "--resume", "auto")
    assert read_jsonl(c / "resume_log.jsonl")[-1]["step"] == 3
    summary = json.loads((c / "train_summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["skipped_steps"] == [3], (
        "the count was not resumed"
    )
    mc = read_jsonl(c / "metrics.jsonl")
    assert [m["loss"] for m in mc] == [m["loss"] for m in ma] and [m["lr"] for m in mc] == [
        m["lr"] for m in ma
    ]
    assert [m["nonfinite_steps"] for m in mc] == [0, 0, 1, 1, 1]
    diff = same_weights(
        student_weights(tmp_path / "a" / "checkpoints" / "global_step5"),
        student_weights(c / "checkpoints" / "global_step5"),
    )
    assert not diff, f"resume after a skipped step is not bit-exact: {diff[:5]}"


def test_train_teacher_student_vocabulary_mismatch(base, ref, tmp_path):
    argv = with_flag(
        train_argv(base, ref["cur"], tmp_path / "train"), "--teacher", base["teacher2"]
    )
    t0 = time.time()
    fork_refused(argv, tmp_path / "t", "teacher2")
    assert not (tmp_path / "train" / "checkpoints").exists()
    assert time.time() - t0 < 120


def test_train_ds_config_batch_sizes_contradict_world_size(base, ref, tmp_path):
    cfg = json.loads(
        (Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json").read_text()
    )
    # 8 = 4 x 1 x 2 would hold on two ranks; this run has one rank (-> accumulation 2)
    cfg.update(
        {
            "train_batch_size": 8,
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
        }
    )
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(cfg))
    fork_refused(
        train_argv(base, ref["cur"], tmp_path / "train", "--ds-config", p),
        tmp_path / "t",
        "ds.json",
        "gradient_accumulation_steps",
        "world size 1",
    )


def test_train_missing_model_path(base, ref, tmp_path):
    argv = with_flag(
        train_argv(base, ref["cur"], tmp_path / "train"), "--student", tmp_path / "no-student"
    )
    fork_refused(argv, tmp_path / "t", "no-student")


def test_train_steps_beyond_the_data(base, ref, tmp_path):
    fork_refused(
        train_argv(base, ref["cur"], tmp_path / "train", "--steps", 10_000, "--epochs", 1),
        tmp_path / "t",
        "train.steps",
        "--epochs",
    )
    fork_refused(
        train_argv(base, ref["cur"], tmp_path / "train2", "--global-batch", 100_000),
        tmp_path / "t2",
        "train.global_batch",
    )
