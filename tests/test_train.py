"""Training: DeepSpeed configs, loss scaling, ZeRO 1/2/3 x teacher hosting on 2 CPU ranks, λ per step.

Fast tests check the pure parts (config filling, lr schedule, steps/epochs). The distributed
tests launch `kdcl-dist train` with torchrun (gloo, DeepSpeed's CPU accelerator) on the tiny
teacher/student pair over a curriculum built from the tiny source shards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _curriculum_fixture import (
    checkpoint_tensors,
    curriculum_fixture,
    read_jsonl,
    run_train,
    student_weights,
)

from kdcl_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]

cur = curriculum_fixture()


# ---- pure parts -------------------------------------------------------------------------


def test_ds_configs_are_concrete_json():
    names = {p.stem for p in (REPO / "ds_configs").glob("*.json")}
    for want in (
        "zero1",
        "zero2",
        "zero3",
        "zero3_offload",
        "cpu_fp32",
        "zero2_bf16",
        "zero3_bf16",
        "teacher_zero3",
        "teacher_zero3_bf16",
    ):
        assert want in names
    for p in (REPO / "ds_configs").glob("*.json"):
        text = p.read_text()
        cfg = json.loads(text)
        assert "{{" not in text and "auto" not in text, p
        assert "train_batch_size" not in cfg, f"{p}: batch sizes are filled by the code"
    off = json.loads((REPO / "ds_configs/zero3_offload.json").read_text())["zero_optimization"]
    assert off["offload_param"]["device"] == "cpu" and off["offload_optimizer"]["device"] == "cpu"


def test_batch_sizes_filled_and_contradictions_refused():
    from kdcl_dist.kd.engine import fill_batch_sizes, prepare_student_config

    cfg = prepare_student_config(
        REPO / "ds_configs/zero2.json",
        global_batch=64,
        micro_batch=4,
        world_size=2,
        lr=1e-3,
        warmup_steps=5,
        total_steps=100,
        on_gpu=False,
    )
    assert (
        cfg["train_batch_size"],
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
    ) == (64, 4, 8)
    assert (
        cfg["optimizer"]["params"]["lr"] == 1e-3
        and cfg["optimizer"]["params"]["torch_adam"] is True
    )
    assert "scheduler" not in cfg
    with pytest.raises(UserError, match="train_batch_size=32 contradicts"):
        fill_batch_sizes({"train_batch_size": 32}, 64, 4, 2)
    with pytest.raises(UserError, match="gradient_accumulation_steps=2 contradicts"):
        fill_batch_sizes({"gradient_accumulation_steps": 2}, 64, 4, 2)
    with pytest.raises(UserError, match="not divisible"):
        fill_batch_sizes({}, 60, 4, 4)
    with pytest.raises(UserError, match="bf16 needs a GPU"):
        prepare_student_config(
            REPO / "ds_configs/zero2_bf16.json",
            global_batch=8,
            micro_batch=4,
            world_size=2,
            lr=1e-3,
            warmup_steps=1,
            total_steps=10,
            on_gpu=False,
        )
    t = __import__("kdcl_dist.kd.engine", fromlist=["x"]).prepare_teacher_config(
        REPO / "ds_configs/teacher_zero3.json", micro_batch=4, world_size=2, on_gpu=False
    )
    assert t["zero_optimization"]["stage"] == 3 and "optimizer" not in t


def test_lr_schedule_factors():
    from kdcl_dist.kd.engine import lr_factor

    f = [
        lr_factor(s, warmup_steps=4, total_steps=12, schedule="linear", min_ratio=0.0)
        for s in range(12)
    ]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0 and f[-1] == pytest.approx(1 - 7 / 8)
    c = [
        lr_factor(s, warmup_steps=2, total_steps=10, schedule="cosine", min_ratio=0.1)
        for s in range(10)
    ]
    assert c[2] == 1.0 and c[-1] > 0.1 and all(a >= b for a, b in zip(c[2:], c[3:]))


def test_steps_and_epochs():
    from kdcl_dist.train import resolve_steps

    assert resolve_steps(400, 16, None, None) == (25, 25)  # neither given: one epoch
    assert resolve_steps(400, 16, None, 2) == (50, 25)
    assert resolve_steps(400, 16, 60, None) == (60, 25)  # wraps into a third epoch
    with pytest.raises(UserError, match="exceed"):
        resolve_steps(400, 16, 60, 2)
    with pytest.raises(UserError, match="exceeds the curriculum"):
        resolve_steps(10, 16, None, 1)
    with pytest.raises(UserError, match="below the minimum 1"):  # 0 is not "unset"
        resolve_steps(400, 16, 0, None)


def test_loss_scaling_equals_global_batch_gradient():
    """(W*G/N)·S_{r,g}, averaged over W ranks and divided by G, is the gradient of (1/N)·ΣS."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    W, G = 2, 3
    chunks = [torch.randn(int(torch.randint(1, 6, ())), 5) for _ in range(W * G)]
    N = sum(len(c) for c in chunks)
    ref = torch.autograd.grad(sum((c @ w).pow(2).sum() for c in chunks) / N, w)[0]
    grads = [torch.autograd.grad((W * G / N) * (c @ w).pow(2).sum() / G, w)[0] for c in chunks]
    # per rank: sum of its G micro-batch grads (each already /G); DeepSpeed averages over ranks
    per_rank = [sum(grads[r * G : (r + 1) * G]) for r in range(W)]
    assert torch.allclose(sum(per_rank) / W, ref, atol=1e-6)


def test_train_config_errors(tmp_path):
    from kdcl_dist.config import resolve
    from kdcl_dist.train import TrainConfig

    with pytest.raises(UserError, match="needs a teacher"):
        resolve(
            TrainConfig,
            "train",
            flags={"curriculum": "c", "student": "s", "out": "o", "reliance": "constant"},
        )
    with pytest.raises(UserError, match="order"):
        resolve(
            TrainConfig,
            "train",
            flags={
                "curriculum": "c",
                "student": "s",
                "out": "o",
                "teacher": "t",
                "order": "sorted",
            },
        )
    cfg = resolve(
        TrainConfig,
        "train",
        flags={"curriculum": "c", "student": "s", "out": "o", "reliance": "none"},
    )
    assert cfg.teacher is None


# ---- λ recomputed from the curriculum ----------------------------------------------------


def recompute_lambda(
    schedule: str, params: dict, manifest: dict, batch_scores: np.ndarray, first_scores: np.ndarray
) -> float:
    """The schedules' formulas (docs/design.md §6), written out independently of kd/reliance.py."""
    stats = manifest["score_stats"]
    if schedule == "none":
        return 0.0
    if schedule == "constant":
        return params["lambda_"]
    if schedule == "sr-paper":
        cmax = math.exp(-stats["min"])
        c_first = float(np.mean(np.exp(-first_scores)))
        s = (1 - c_first) / cmax
        return float(np.clip((1 - float(np.mean(np.exp(-batch_scores)))) / cmax - s, 0, 1))
    lo = stats["quantiles"][f"{params['q_low']:.2f}"]
    hi = stats["quantiles"][f"{params['q_high']:.2f}"]
    if schedule == "sr-minmax":
        return float(params["lambda_max"] * np.clip((np.mean(batch_scores) - lo) / (hi - lo), 0, 1))
    return float(np.mean(params["lambda_max"] * np.clip((batch_scores - lo) / (hi - lo), 0, 1)))


def check_lambda(out: Path, cur: Path, schedule: str, params: dict):
    from kdcl_dist.data.reader import ShardSet

    manifest = json.loads((cur / "curriculum.json").read_text())
    shards = ShardSet(cur, "curriculum.json")
    metrics = {m["step"]: m for m in read_jsonl(out / "metrics.jsonl")}
    samples = {s["step"]: s["positions"] for s in read_jsonl(out / "samples.jsonl")}
    first = np.array([shards.get(p).meta["score"] for p in samples[1]], dtype=np.float64)
    for step, positions in samples.items():
        scores = np.array([shards.get(p).meta["score"] for p in positions], dtype=np.float64)
        assert [shards.get(p).meta["position"] for p in positions] == positions
        want = recompute_lambda(schedule, params, manifest, scores, first)
        assert metrics[step]["lambda"] == pytest.approx(want, abs=1e-6), (schedule, step)
        assert metrics[step]["score_mean"] == pytest.approx(scores.mean(), rel=1e-5)


# ---- ZeRO 1/2/3 x teacher hosting on 2 CPU ranks -----------------------------------------

CASES = [  # (ZeRO config, teacher hosting, reliance schedule exercised by this run)
    ("zero1", "replicated", "constant"),
    ("zero2", "replicated", "sr-paper"),
    ("zero3", "replicated", "sr-minmax"),
    ("zero1", "zero3", "sr-sample"),
    ("zero2", "zero3", "sr-paper"),
    ("zero3", "zero3", "constant"),
]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("zero,hosting,schedule", CASES, ids=[f"{a}-{b}" for a, b, _ in CASES])
def test_two_ranks_zero_stages(tiny_assets, cur, tmp_path, zero, hosting, schedule):
    from kdcl_dist.kd.models import load_mlm
    from kdcl_dist.train import _tensor_sha

    out = tmp_path / "run"
    params = {"lambda_": 0.5, "lambda_max": 1.0, "q_low": 0.05, "q_high": 0.95}
    run_train(
        2,
        cur,
        tiny_assets,
        out,
        "--teacher",
        tiny_assets["teacher"],
        "--ds-config",
        f"ds_configs/{zero}.json",
        "--teacher-hosting",
        hosting,
        "--reliance",
        schedule,
        "--global-batch",
        16,
        "--micro-batch",
        4,
        "--steps",
        10,
        "--save-every",
        5,
        "--lr",
        3e-3,
        "--order",
        "random",
        overrides=["warmup_steps=1", f"lambda_={params['lambda_']}", "allow_sr_any_order=true"],
    )
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 11))
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.01, losses  # the loss falls
    assert all(math.isfinite(m["grad_norm"]) and m["lr"] > 0 for m in metrics)
    for key in (
        "loss_mlm",
        "loss_kd",
        "lambda",
        "score_mean",
        "score_min",
        "score_max",
        "curriculum_progress",
        "pool_fraction",
        "agreement",
        "samples_per_s",
        "tokens_per_s",
        "step_time",
        "memory_mb",
    ):
        assert key in metrics[0], key

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["zero_stage"] == int(zero[-1])
    # random order over 10 steps x 16 of n samples: every item distinct within the first epoch
    n = json.loads((cur / "curriculum.json").read_text())["num_samples"]
    assert summary["distinct_samples"] == metrics[-1]["distinct_samples"] == min(n, 160)
    assert summary["lambda_mean"] == pytest.approx(np.mean([m["lambda"] for m in metrics]))
    teacher = load_mlm(str(tiny_assets["teacher"]))
    disk_sha = _tensor_sha(sorted(teacher.state_dict().items()))
    assert summary["teacher_sha_start"] == summary["teacher_sha_end"] == disk_sha  # bit for bit
    assert summary["teacher_trainable"] == 0
    if hosting == "zero3":  # partitioned: each rank holds about half
        assert summary["teacher_local_numel"] <= summary["teacher_numel"] // 2 + 4096
    else:
        assert summary["teacher_local_numel"] == summary["teacher_numel"]

    # no checkpoint holds teacher weights; the student's full weights are there
    student_sd = load_mlm(str(tiny_assets["student"])).state_dict()
    student_keys = set(student_sd)
    student_numel = sum(
        v.numel() for k, v in student_sd.items() if "vocab_projector.weight" not in k
    )
    teacher_only = {tuple(v.shape) for v in teacher.state_dict().values()} - {
        tuple(v.shape) for v in student_sd.values()
    }
    assert teacher_only  # the tiny pair has teacher-only shapes to look for
    for tag in ("global_step5", "global_step10"):
        tdir = out / "checkpoints" / tag
        assert (tdir / "kdcl_complete.json").exists()
        for fname, tensors in checkpoint_tensors(tdir).items():
            for key, shape in tensors.items():
                parts = key.split(".")
                assert "bert" not in parts, f"{fname}: teacher tensor {key}"
                assert shape not in teacher_only, f"{fname}: {key} has a teacher-only shape {shape}"
            total = sum(int(np.prod(s)) for s in tensors.values())
            # module + fp32 master + two Adam moments at most: a teacher would not fit
            assert total <= 3 * student_numel + 4096, f"{fname} holds {total} values"
        weights = student_weights(tdir)
        assert set(weights) <= student_keys and len(weights) >= len(student_keys) - 1
    check_lambda(out, cur, schedule, params)


@pytest.mark.distributed
@pytest.mark.slow
def test_student_only_mlm_and_all_positions(tiny_assets, cur, tmp_path):
    """No teacher: --reliance none trains MLM alone; with a teacher, --kd-positions all runs."""
    a = tmp_path / "mlm"
    run_train(
        1,
        cur,
        tiny_assets,
        a,
        "--reliance",
        "none",
        "--global-batch",
        8,
        "--micro-batch",
        4,
        "--steps",
        8,
        "--lr",
        3e-3,
        "--ds-config",
        "ds_configs/cpu_fp32.json",
        overrides=["warmup_steps=1"],
    )
    m = read_jsonl(a / "metrics.jsonl")
    assert all(x["lambda"] == 0.0 and x["loss_kd"] == 0.0 for x in m)
    assert m[-1]["loss"] < m[0]["loss"]
    assert (a / "student_config" / "config.json").exists() and (
        a / "student_config" / "tokenizer.json"
    ).exists()
    assert "train:" in (a / "config.yaml").read_text()
    # KL at every position plus the hidden-state cosine term (self-distillation: equal hidden sizes)
    b = tmp_path / "all"
    run_train(
        1,
        cur,
        tiny_assets,
        b,
        "--teacher",
        tiny_assets["student"],
        "--kd-positions",
        "all",
        "--global-batch",
        8,
        "--micro-batch",
        4,
        "--steps",
        4,
        "--ds-config",
        "ds_configs/cpu_fp32.json",
        overrides=["cosine_weight=0.1"],
    )
    mb = read_jsonl(b / "metrics.jsonl")
    assert len(mb) == 4 and all(math.isfinite(x["loss_kd"]) and x["loss_kd"] >= 0 for x in mb)
    assert all(x["loss_cos"] is not None and 0 <= x["loss_cos"] < 1 for x in mb)
    # identical weights at step 1: student and teacher agree on every masked token
    assert mb[0]["agreement"] > 0.5


def test_cosine_term_needs_equal_hidden_sizes(tiny_assets):
    from kdcl_dist.kd.engine import EngineOptions, KDEngine
    from kdcl_dist.kd.models import load_mlm

    s, t = load_mlm(str(tiny_assets["student"])), load_mlm(str(tiny_assets["teacher"]))
    with pytest.raises(UserError, match="cosine term needs equal sizes"):
        KDEngine(
            s,
            t,
            {"gradient_accumulation_steps": 1},
            world_size=1,
            options=EngineOptions(cosine_weight=0.1),
        )


def test_bad_inputs_fail_with_one_line(tiny_assets, cur, tmp_path):
    from conftest import run_cli

    p = run_cli(
        "train",
        "--curriculum",
        tmp_path / "nope",
        "--student",
        tiny_assets["student"],
        "--out",
        tmp_path / "o",
        "--reliance",
        "none",
        check=False,
    )
    assert p.returncode == 2 and "curriculum.json" in p.stderr
    p = run_cli(
        "train",
        "--curriculum",
        cur,
        "--student",
        tiny_assets["student"],
        "--out",
        tmp_path / "o",
        "--reliance",
        "constant",
        check=False,
    )
    assert p.returncode == 2 and "needs a teacher" in p.stderr
