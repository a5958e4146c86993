"""Checkpoints: completeness, rotation, refusals, and resume in real processes.

- resume parity: SIGKILL one rank at a random step, `--resume auto` -> the same final student
  weights (CPU fp32, exact) and the same sample ids at every step as an uninterrupted run;
- world size 2 -> 1 -> 2: universal conversion, consumed samples stay the prefix of the order;
- SIGTERM: a checkpoint at the current step and a clean exit.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _curriculum_fixture import (
    curriculum_fixture,
    read_jsonl,
    run_train,
    student_weights,
    train_cmd,
    train_env,
)

from kdcl_dist import checkpoint as ckpt
from kdcl_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]

cur = curriculum_fixture()


def _fake(root: Path, step: int, complete: bool, **marker):
    d = root / f"global_step{step}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / ckpt.MARKER).write_text(json.dumps({"step": step, **marker}))
    return d


# ---- pure parts -------------------------------------------------------------------------


def test_latest_complete_ignores_interrupted_and_latest_tag(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for s in (2, 4, 6):
        _fake(root, s, True)
    _fake(root, 3, False)
    _fake(root, 8, False)  # killed during save; DeepSpeed's `latest` already names it
    (root / "latest").write_text("global_step8")
    assert ckpt.latest_complete(root).name == "global_step6"
    assert ckpt.find_resume(tmp_path / "run", "auto").name == "global_step6"
    assert ckpt.find_resume(tmp_path / "run", "none") is None
    assert ckpt.find_resume(tmp_path / "run", str(root)).name == "global_step6"
    with pytest.raises(UserError, match="incomplete checkpoint"):
        ckpt.find_resume(tmp_path / "run", str(root / "global_step8"))
    with pytest.raises(UserError, match="not found"):
        ckpt.find_resume(tmp_path / "run", str(tmp_path / "nowhere"))
    removed = ckpt.rotate(root, keep=2)
    left = sorted(d.name for d in root.iterdir() if d.is_dir())
    assert left == [
        "global_step4",
        "global_step6",
        "global_step8",
    ]  # newer incomplete kept (may be in flight)
    assert {d.name for d in removed} == {"global_step2", "global_step3"}
    assert ckpt.find_resume(tmp_path / "empty", "auto") is None


def test_incompatible_checkpoints_refused():
    m = {
        "curriculum_fingerprint": "aaa",
        "global_batch": 16,
        "order": {"mode": "sequential", "seed": 1},
    }
    ckpt.check_compatible(
        m, fingerprint="aaa", global_batch=16, order={"mode": "sequential", "seed": 1}, path="c"
    )
    with pytest.raises(UserError, match="curriculum aaa but --curriculum has fingerprint bbb"):
        ckpt.check_compatible(m, fingerprint="bbb", global_batch=16, order=m["order"], path="c")
    with pytest.raises(UserError, match="global batch 16, this run uses 32"):
        ckpt.check_compatible(m, fingerprint="aaa", global_batch=32, order=m["order"], path="c")
    with pytest.raises(UserError, match="order"):
        ckpt.check_compatible(
            m, fingerprint="aaa", global_batch=16, order={"mode": "random", "seed": 1}, path="c"
        )


def test_rng_state_roundtrip():
    ckpt.seed_rng(3)
    st = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    ckpt.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert ckpt.restore_rank_rng({"rng": [st]}, 0, 1, 5) is True
    assert ckpt.restore_rank_rng({"rng": [st]}, 1, 1, 5) is False  # a new rank reseeds


# ---- real processes ---------------------------------------------------------------------

FLAGS = [
    "--teacher",
    None,
    "--ds-config",
    "ds_configs/zero2.json",
    "--global-batch",
    16,
    "--micro-batch",
    4,
    "--lr",
    3e-3,
    "--reliance",
    "sr-paper",
    "--allow-sr-any-order",
]


def _flags(assets, *extra):
    f = list(FLAGS)
    f[1] = assets["teacher"]
    return f + list(extra)


def _wait_step(out: Path, step: int, proc, timeout: float = 300) -> int:
    t0 = time.time()
    path = out / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode})")
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            if lines:
                try:
                    last = json.loads(lines[-1])["step"]
                except json.JSONDecodeError:
                    last = 0
                if last >= step:
                    return last
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _rank_pids(proc) -> list[int]:
    import psutil

    kids = psutil.Process(proc.pid).children(
        recursive=False
    )  # the ranks (workers are their children)
    return [k.pid for k in kids]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.faults
def test_resume_parity_after_sigkill(tiny_assets, cur, tmp_path):
    steps = 12
    extra = ["--steps", steps, "--save-every", 2, "--order", "random"]
    ref = tmp_path / "ref"
    run_train(2, cur, tiny_assets, ref, *_flags(tiny_assets, *extra), overrides=["warmup_steps=2"])

    out = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(3, 9)
    proc = subprocess.Popen(
        train_cmd(
            2, cur, tiny_assets, out, *_flags(tiny_assets, *extra), overrides=["warmup_steps=2"]
        ),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        reached = _wait_step(out, kill_at, proc)
        victim = random.Random(kill_at).choice(_rank_pids(proc))
        os.kill(victim, signal.SIGKILL)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0, "torchrun should report the killed rank"
    done_before = [s for s, _, ok in ckpt.list_checkpoints(out / "checkpoints") if ok]
    assert done_before and max(done_before) < steps

    run_train(
        2,
        cur,
        tiny_assets,
        out,
        *_flags(tiny_assets, *extra, "--resume", "auto"),
        overrides=["warmup_steps=2"],
    )
    resumed = read_jsonl(out / "resume_log.jsonl")
    assert resumed[-1]["step"] == max(done_before) and resumed[-1]["step"] <= reached

    # identical sample ids at every step: no duplicates, no gaps
    a, b = read_jsonl(ref / "samples.jsonl"), read_jsonl(out / "samples.jsonl")
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert a == b, f"killed at step {reached}"
    flat = [p for r in b for p in r["positions"]]
    assert len(flat) == len(set(flat)) == steps * 16
    # identical λ and losses, identical final weights (fp32 on CPU: bit for bit)
    ma, mb = read_jsonl(ref / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [m["lambda"] for m in ma] == [m["lambda"] for m in mb]
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    wa = student_weights(ref / "checkpoints" / f"global_step{steps}")
    wb = student_weights(out / "checkpoints" / f"global_step{steps}")
    assert set(wa) == set(wb)
    diff = {k: float((wa[k] - wb[k]).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diff, f"killed at step {reached}: weights differ {diff}"


@pytest.mark.distributed
@pytest.mark.slow
def test_world_size_2_1_2(tiny_assets, cur, tmp_path):
    from kdcl_dist.train import _tensor_sha

    out = tmp_path / "ws"
    extra = ["--steps", 9, "--save-every", 100, "--order", "sequential"]
    for nproc, limit in ((2, ["max_steps_per_run=3"]), (1, ["max_steps_per_run=3"]), (2, [])):
        run_train(
            nproc,
            cur,
            tiny_assets,
            out,
            *_flags(tiny_assets, *extra),
            overrides=["warmup_steps=2", *limit],
        )
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["world_size"] == nproc
    log = read_jsonl(out / "resume_log.jsonl")
    assert [(r["step"], r["saved_world_size"], r["world_size"], r["universal"]) for r in log] == [
        (3, 2, 1, True),
        (6, 1, 2, True),
    ]
    assert (out / "checkpoints" / "global_step3_universal" / ckpt.MARKER).exists()
    # the universal load restored exactly the saved weights
    for r in log:
        saved = student_weights(Path(r["checkpoint"]))
        common = set(saved) & set(r["student_sha"])
        assert len(common) >= len(saved) - 1
        for k in common:
            assert r["student_sha"][k] == _tensor_sha([(k, saved[k])])[:16], (r["step"], k)
    # consumed samples: exactly the prefix of the order, each once, at every world size
    samples = read_jsonl(out / "samples.jsonl")
    assert [s["step"] for s in samples] == list(range(1, 10))
    assert [p for s in samples for p in s["positions"]] == list(range(9 * 16))
    markers = {
        s: json.loads((d / ckpt.MARKER).read_text())
        for s, d, ok in ckpt.list_checkpoints(out / "checkpoints")
        if ok
    }
    assert all(m["consumed_samples"] == s * 16 for s, m in markers.items())
    assert markers[9]["world_size"] == 2
    m = read_jsonl(out / "metrics.jsonl")
    assert all(math.isfinite(x["loss"]) for x in m)
    assert np.mean([x["loss"] for x in m[-3:]]) < np.mean([x["loss"] for x in m[:3]])

    # the same conversion by hand, and the listing
    from conftest import run_cli

    p = run_cli("checkpoint", "universal", "--checkpoint", out, "--tag", "global_step9")
    assert (out / "checkpoints" / "global_step9_universal" / "zero").is_dir(), p.stdout
    listing = run_cli("checkpoint", "list", "--out", out).stdout
    assert "global_step9" in listing and "world=2" in listing and "complete" in listing


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.faults
def test_sigterm_saves_current_step(tiny_assets, cur, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(
        train_cmd(
            2, cur, tiny_assets, out, *_flags(tiny_assets, "--steps", 200, "--save-every", 1000)
        ),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_step(out, 3, proc)
        os.kill(_rank_pids(proc)[1], signal.SIGTERM)  # one rank only: the stop flag is all-reduced
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM"
    last = read_jsonl(out / "metrics.jsonl")[-1]["step"]
    assert summary["steps_done"] == last < 200
    latest = ckpt.latest_complete(out / "checkpoints")
    assert latest is not None and latest.name == f"global_step{last}"
    assert json.loads((latest / ckpt.MARKER).read_text())["consumed_samples"] == last * 16
