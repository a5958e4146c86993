"""Resume refusals, `--extend-steps` and its lr rule, sr-paper order refusal, two parameter groups.

Real runs (one process, ZeRO-0 fp32 on CPU) share one trained reference run of 8 steps
(checkpoints at 4 and 8); refusals and extensions start from copies of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _curriculum_fixture import curriculum_fixture, read_jsonl
from conftest import REPO, run_cli

from kdcl_dist.errors import UserError

cur = curriculum_fixture()

LR, WARMUP, MIN_RATIO, STEPS = 3e-3, 2, 0.1, 8
BASE = [
    "--global-batch",
    8,
    "--micro-batch",
    4,
    "--lr",
    LR,
    "--order",
    "sequential",
    "--reliance",
    "constant",
    "--ds-config",
    "ds_configs/cpu_fp32.json",
    "--num-workers",
    0,
    "--save-every",
    4,
]
OVERRIDES = [f"warmup_steps={WARMUP}", f"min_lr_ratio={MIN_RATIO}"]


def _train(assets, cur, out, *extra, overrides=(), check=True):
    return run_cli(
        "train",
        "--curriculum",
        cur,
        "--student",
        assets["student"],
        "--teacher",
        assets["teacher"],
        "--out",
        out,
        *BASE,
        *extra,
        *OVERRIDES,
        *overrides,
        check=check,
    )


def _factor(k: int, extensions=()) -> float:
    from kdcl_dist.kd.engine import lr_factor

    return lr_factor(
        k,
        warmup_steps=WARMUP,
        total_steps=STEPS,
        schedule="linear",
        min_ratio=MIN_RATIO,
        extensions=extensions,
    )


def _error_line(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ": error: " in ln]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    return lines[0]


def _marker(tag_dir: Path) -> dict:
    return json.loads((tag_dir / "kdcl_complete.json").read_text())


def _last_lr(tag_dir: Path) -> float:
    """The lr the optimizer holds after the checkpoint's last step (ZeRO-0: in the model states file)."""
    sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return float(sd["lr_scheduler"]["_last_lr"][0])


@pytest.fixture(scope="module")
def ref(tiny_assets, cur, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "train"
    _train(tiny_assets, cur, out, "--steps", STEPS)
    return out


def _copy(ref: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ref, tmp_path / "train"))


# ---- sr-paper with an order that makes its first-batch shift meaningless ---------------------


def test_sr_paper_with_random_or_reverse_order_refused():
    import argparse

    from kdcl_dist.commands import train as cmd
    from kdcl_dist.config import resolve
    from kdcl_dist.train import TrainConfig

    base = {"curriculum": "c", "student": "s", "out": "o", "teacher": "t", "reliance": "sr-paper"}
    for order in ("random", "reverse"):
        with pytest.raises(UserError) as e:  # raised by TrainConfig.validate: no model is loaded
            resolve(TrainConfig, "train", flags={**base, "order": order})
        msg = str(e.value)
        assert "\n" not in msg and "train.reliance" in msg and f"train.order {order}" in msg, msg
        assert "--allow-sr-any-order" in msg
    for order in ("sequential", "pacing-root"):
        resolve(TrainConfig, "train", flags={**base, "order": order})
    resolve(TrainConfig, "train", flags={**base, "reliance": "sr-minmax", "order": "random"})
    # the flag reaches the config (store_true; absent = no override)
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(
        [
            "--reliance",
            "sr-paper",
            "--order",
            "random",
            "--allow-sr-any-order",
            "--curriculum",
            "c",
            "--student",
            "s",
            "--out",
            "o",
            "--teacher",
            "t",
        ]
    )
    cfg = resolve(TrainConfig, "train", flags={f: getattr(args, k) for k, f in cmd.FLAGS.items()})
    assert cfg.allow_sr_any_order and not cfg.extend_steps
    args = parser.parse_args(["--curriculum", "c"])
    assert args.allow_sr_any_order is None and args.extend_steps is None


# ---- the lr rule as a pure function ------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_extension_rule(schedule):
    import math

    from kdcl_dist.kd.engine import lr_factor

    def f(k, ext=(), w=3, t=10, r=0.1):
        return lr_factor(
            k, warmup_steps=w, total_steps=t, schedule=schedule, min_ratio=r, extensions=ext
        )

    # no extension: the documented formula, unchanged
    for k in range(12):
        x = min(1.0, max(0, k - 3) / 7)
        want = (
            (k + 1) / 3
            if k < 3
            else (
                1 - 0.9 * x
                if schedule == "linear"
                else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x))
            )
        )
        assert f(k) == pytest.approx(want, abs=1e-12)
    ext = [(6, 20)]
    # the old curve up to the resume step (exactly), min_ratio at the new total, decreasing between
    assert [f(k, ext) for k in range(7)] == [f(k) for k in range(7)]
    assert f(20, ext) == pytest.approx(0.1) and f(25, ext) == pytest.approx(0.1)
    vals = [f(k, ext) for k in range(6, 21)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert vals[0] - vals[1] < f(6) - f(
        7
    )  # no jump at the resume step: the decay is only stretched
    # a second extension keeps the first one's curve up to its own resume step
    ext2 = [(6, 20), (15, 30)]
    assert [f(k, ext2) for k in range(16)] == [f(k, ext) for k in range(16)]
    assert f(30, ext2) == pytest.approx(0.1)
    # an extension during the warm-up: the warm-up is finished, not repeated, then the decay
    assert [f(k, [(1, 20)]) for k in range(4)] == [f(k) for k in range(4)]
    assert f(3, [(1, 20)]) == 1.0 and f(20, [(1, 20)]) == pytest.approx(0.1)
    # constant: extensions change nothing
    assert (
        lr_factor(
            9, warmup_steps=3, total_steps=10, schedule="constant", min_ratio=0.1, extensions=ext
        )
        == 1.0
    )


def test_lr_scheduler_with_extensions_reproduced_after_reload():
    from kdcl_dist.kd.engine import make_lr_scheduler

    def sched():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        return opt, make_lr_scheduler(
            warmup_steps=2, total_steps=10, schedule="cosine", min_ratio=0.0, extensions=[[5, 20]]
        )(opt)

    opt, s = sched()
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    opt2, s2 = sched()
    for _ in range(8):
        opt2.step()
        s2.step()
    state = s2.state_dict()
    opt3, s3 = sched()
    s3.load_state_dict(
        state
    )  # what DeepSpeed does on resume: the factor comes from the new partial
    opt3.param_groups[0]["lr"] = opt2.param_groups[0]["lr"]
    again = []
    for _ in range(8, 20):
        again.append(opt3.param_groups[0]["lr"])
        opt3.step()
        s3.step()
    assert again == lrs[8:]


# ---- run settings checked as a pure function ------------------------------------------------


def test_check_run_settings_pure(ref):
    from kdcl_dist.config import resolve
    from kdcl_dist.train import TrainConfig, check_run_settings

    saved = _marker(ref / "checkpoints" / "global_step4")["run_settings"]
    assert saved["total_steps"] == STEPS and saved["lr_segments"] == [[0, STEPS]]
    assert saved["lr"] == LR and saved["warmup_steps"] == WARMUP and saved["reliance"] == "constant"

    def cfg(**kw):
        return resolve(
            TrainConfig,
            "train",
            flags={
                "curriculum": "c",
                "student": "s",
                "out": "o",
                "teacher": "t",
                "lr": LR,
                "warmup_steps": WARMUP,
                "min_lr_ratio": MIN_RATIO,
                "global_batch": 8,
                **kw,
            },
        )

    assert check_run_settings(saved, cfg(), STEPS, start_step=4, path="ck") == [[0, STEPS]]
    with pytest.raises(
        UserError,
        match=r"^ck: train.temperature is 3.0 but the checkpoint was trained with 2.0; "
        r"resuming would silently change the run: pass --temperature 2.0",
    ):
        check_run_settings(saved, cfg(temperature=3.0), STEPS, start_step=4, path="ck")
    with pytest.raises(UserError, match=r"train.weight_decay is 0.1 .* pass --weight-decay 0.01"):
        check_run_settings(saved, cfg(weight_decay=0.1), STEPS, start_step=4, path="ck")
    # a setting the saved schedule does not use may change (λ_max of sr-minmax under constant λ)
    check_run_settings(saved, cfg(lambda_max=0.3), STEPS, start_step=4, path="ck")
    with pytest.raises(UserError, match="--extend-steps"):
        check_run_settings(saved, cfg(), 12, start_step=4, path="ck")
    assert check_run_settings(saved, cfg(extend_steps=True), 12, start_step=4, path="ck") == [
        [0, 8],
        [4, 12],
    ]
    assert check_run_settings(saved, cfg(extend_steps=True), STEPS, start_step=4, path="ck") == [
        [0, STEPS]
    ]
    with pytest.raises(UserError, match="below the checkpoint's step 4"):
        check_run_settings(saved, cfg(extend_steps=True), 3, start_step=4, path="ck")


# a changed value for each recorded key the saved run (constant λ, sequential order) uses
CHANGED = {
    "lr": 0.123,
    "lr_schedule": "constant",
    "warmup_steps": 3,
    "min_lr_ratio": 0.5,
    "weight_decay": 0.2,
    "grad_clip": 0.5,
    "temperature": 4.0,
    "kd_positions": "all",
    "cosine_weight": 0.5,
    "reliance": "none",
    "lambda_": 0.9,
    "order": "random",
    "seed": 99,
    "mask_seed": 77,
    "global_batch": 16,
}


@pytest.mark.parametrize("key", list(CHANGED))
def test_every_recorded_setting_change_is_refused_naming_the_key(ref, key):
    from kdcl_dist.config import resolve
    from kdcl_dist.train import RUN_SETTING_KEYS, TrainConfig, check_run_settings

    assert key in RUN_SETTING_KEYS
    saved = _marker(ref / "checkpoints" / "global_step4")["run_settings"]
    flags = {"curriculum": "c", "student": "s", "out": "o", "teacher": "t"}
    same = {k: saved[k] for k in RUN_SETTING_KEYS if saved.get(k) is not None}
    assert saved.get(key) != CHANGED[key], (key, saved.get(key))
    cfg = resolve(TrainConfig, "train", flags={**flags, **same, key: CHANGED[key]}, check=False)
    with pytest.raises(
        UserError, match=rf"^ck: train\.{key} is .* but the checkpoint was trained with"
    ):
        check_run_settings(saved, cfg, saved["total_steps"], start_step=4, path="ck")


# ---- refusals in real runs ------------------------------------------------------------------


def test_resume_with_changed_lr_refused(tiny_assets, cur, ref):
    before = sorted(p.name for p in (ref / "checkpoints").iterdir())
    line = _error_line(_train(tiny_assets, cur, ref, "--steps", STEPS, "--lr", 1e-3, check=False))
    tag = ref / "checkpoints" / f"global_step{STEPS}"
    assert (
        f"{tag}: train.lr is 0.001 but the checkpoint was trained with 0.003; resuming would silently "
        "change the run: pass --lr 0.003, or start a new --out (--resume none)" in line
    )
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == before


def test_resume_with_changed_temperature_refused(tiny_assets, cur, ref):
    line = _error_line(
        _train(
            tiny_assets,
            cur,
            ref,
            "--steps",
            STEPS,
            "--temperature",
            4,
            "--resume",
            ref / "checkpoints" / "global_step4",
            check=False,
        )
    )
    assert "train.temperature is 4.0 but the checkpoint was trained with 2.0" in line
    assert "pass --temperature 2.0" in line


def test_resume_with_changed_steps_needs_extend_steps(tiny_assets, cur, ref):
    line = _error_line(_train(tiny_assets, cur, ref, "--steps", 16, check=False))
    assert "train.total_steps is 16 but the checkpoint was trained with 8" in line
    assert "--extend-steps" in line and "--steps 8" in line


# ---- --extend-steps -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extended(tiny_assets, cur, ref, tmp_path_factory):
    """The reference run resumed at step 4 with --steps 16 --extend-steps, in one go."""
    out = Path(shutil.copytree(ref, tmp_path_factory.mktemp("ext") / "train"))
    p = _train(
        tiny_assets,
        cur,
        out,
        "--steps",
        16,
        "--extend-steps",
        "--resume",
        out / "checkpoints" / "global_step4",
    )
    return out, p


def test_extend_steps_lr_rule_in_a_real_run(ref, extended):
    out, p = extended
    m_ref, m = read_jsonl(ref / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in m] == list(range(1, 17))
    ext = [(4, 16)]
    # the resume step (0-based 4, logged as step 5) applies the original run's lr: the same step
    assert m[4]["lr"] == m_ref[4]["lr"] == pytest.approx(LR * _factor(4))
    assert m[4]["loss"] == m_ref[4]["loss"]
    for r in m[4:]:
        assert r["lr"] == pytest.approx(LR * _factor(r["step"] - 1, ext), rel=1e-12)
    assert all(a["lr"] > b["lr"] for a, b in zip(m[4:], m[5:]))
    assert m[5]["lr"] > m_ref[5]["lr"]  # the decay is stretched to the new total
    # after the last step the optimizer holds min_lr_ratio x peak
    tag = out / "checkpoints" / "global_step16"
    assert _last_lr(tag) == pytest.approx(LR * MIN_RATIO, rel=1e-9)
    rs = _marker(tag)["run_settings"]
    assert rs["total_steps"] == 16 and rs["lr_segments"] == [[0, 8], [4, 16]]
    # one log line with the old and new totals and the lr at the resume step
    lines = [
        ln
        for ln in p.stderr.splitlines()
        if "--extend-steps: total 8 -> 16 steps from step 4" in ln
    ]
    assert len(lines) == 1 and f"lr {LR * _factor(4):.6g} at the resume step" in lines[0], p.stderr[
        -2000:
    ]
    log = read_jsonl(out / "resume_log.jsonl")[-1]
    assert (log["step"], log["total_steps"], log["saved_total_steps"]) == (4, 16, 8)


def test_extended_run_resumed_again_is_identical(tiny_assets, cur, ref, extended, tmp_path):
    out_full, _ = extended
    out = _copy(ref, tmp_path)
    _train(
        tiny_assets,
        cur,
        out,
        "--steps",
        16,
        "--extend-steps",
        "--resume",
        out / "checkpoints" / "global_step4",
        overrides=["max_steps_per_run=5"],
    )
    assert json.loads((out / "train_summary.json").read_text())["stopped_by"] == "max_steps_per_run"
    assert _marker(out / "checkpoints" / "global_step9")["run_settings"]["lr_segments"] == [
        [0, 8],
        [4, 16],
    ]
    # the second resume (--extend-steps again is harmless: the total is the checkpoint's)
    _train(tiny_assets, cur, out, "--steps", 16, "--extend-steps")
    assert read_jsonl(out / "resume_log.jsonl")[-1]["step"] == 9
    a, b = read_jsonl(out_full / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 17))
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert _marker(out / "checkpoints" / "global_step16")["run_settings"]["lr_segments"] == [
        [0, 8],
        [4, 16],
    ]


# ---- checkpoints from before run settings ----------------------------------------------------

_OLD_STYLE = """
import sys
from kdcl_dist import checkpoint as ckpt
from kdcl_dist.cli import main
from kdcl_dist.kd import engine as kde

# what kdcl-dist wrote before run settings: one optimizer group, no run_settings/param_groups
kde.weight_decay_groups = lambda m: [{"params": [p for p in m.parameters() if p.requires_grad]}]
real = ckpt.save
def save(engine, out, step, client, keep, rank, marker):
    for d in (client, marker):
        d.pop("run_settings", None)
        d.pop("param_groups", None)
    return real(engine, out, step, client, keep, rank, marker)
ckpt.save = save
sys.exit(main(sys.argv[1:]))
"""


def test_old_checkpoint_without_run_settings_resumes_with_a_warning(tiny_assets, cur, tmp_path):
    out = tmp_path / "old"
    argv = [
        "train",
        "--curriculum",
        cur,
        "--student",
        tiny_assets["student"],
        "--teacher",
        tiny_assets["teacher"],
        "--out",
        out,
        *BASE,
        "--steps",
        6,
        "--save-every",
        2,
        *OVERRIDES,
        "max_steps_per_run=4",
    ]
    p = subprocess.run(
        [sys.executable, "-c", _OLD_STYLE, *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    old = _marker(out / "checkpoints" / "global_step4")
    assert "run_settings" not in old and "param_groups" not in old
    sd = torch.load(
        out / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    assert len(sd["optimizer"]["param_groups"]) == 1
    # resumed by the current code: a warning, the single group kept, settings recorded from now on
    p = _train(tiny_assets, cur, out, "--steps", 6, "--save-every", 2)
    warn = [ln for ln in p.stderr.splitlines() if "records no run settings" in ln]
    assert len(warn) == 1 and "could not be checked" in warn[0], p.stderr[-3000:]
    assert read_jsonl(out / "resume_log.jsonl")[-1]["step"] == 4
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 7))
    new = _marker(out / "checkpoints" / "global_step6")
    assert new["param_groups"] == "single" and new["run_settings"]["total_steps"] == 6


# ---- two parameter groups ----------------------------------------------------------------------


def _tiny_models():
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=50,
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=32,
        )
    )
    distil = DistilBertForMaskedLM(
        DistilBertConfig(
            vocab_size=50, dim=8, n_layers=2, n_heads=2, hidden_dim=16, max_position_embeddings=32
        )
    )
    return {"bert": bert, "distilbert": distil}


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_weight_decay_groups_split(kind):
    from kdcl_dist.kd.engine import weight_decay_groups

    model = _tiny_models()[kind]
    groups = weight_decay_groups(model)
    assert len(groups) == 2 and "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    decay = {id(p) for p in groups[0]["params"]}
    plain = {id(p) for p in groups[1]["params"]}
    names = dict(model.named_parameters())
    assert decay.isdisjoint(plain) and decay | plain == {id(p) for p in names.values()}
    n_norm = 0
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if isinstance(mod, torch.nn.LayerNorm) or pname == "bias":
                assert id(p) in plain, f"{mname}.{pname} is decayed"
                n_norm += isinstance(mod, torch.nn.LayerNorm)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                assert id(p) in decay, f"{mname}.{pname} is not decayed"
    assert n_norm >= 2 * (2 + 2)  # embeddings + 2 per layer + the head, weight and bias each
    for name in names:
        if name.endswith("bias") or "LayerNorm." in name or "layer_norm" in name:
            assert id(names[name]) in plain, name


_GROUPS_SCRIPT = """
import json, sys
import torch
from kdcl_dist.train import init_distributed
from kdcl_dist.kd import engine as kde
from kdcl_dist.kd.models import load_mlm

init_distributed()
res = {}
for name in ("cpu_fp32", "zero1", "zero2", "zero3"):
    cfg = kde.prepare_student_config(f"ds_configs/{name}.json", global_batch=4, micro_batch=4, world_size=1, lr=0.1,
                                     warmup_steps=0, total_steps=10, weight_decay=0.5, on_gpu=False)
    student = load_mlm(sys.argv[1])
    eng = kde.KDEngine(student, None, cfg, world_size=1, options=kde.EngineOptions())
    res[name] = [g["weight_decay"] for g in eng.optimizer.param_groups]
    if name == "cpu_fp32":  # zero gradients, one step: AdamW's decoupled decay alone moves the weights
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        for p in student.parameters():
            p.grad = torch.zeros_like(p)
        eng.optimizer.step()
        res["moved"] = sorted(n for n, p in student.named_parameters() if not torch.equal(p, before[n]))
        res["scaled"] = all(torch.allclose(p, before[n] * (1 - 0.1 * 0.5)) for n, p in student.named_parameters()
                            if n in res["moved"])
print("RESULT " + json.dumps(res))
"""


def test_deepspeed_optimizer_gets_two_groups(tiny_assets):
    """ZeRO 0-3 (torch AdamW on CPU): the config's weight decay on the first group, 0.0 on the second."""
    p = subprocess.run(
        [sys.executable, "-c", _GROUPS_SCRIPT, str(tiny_assets["student"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    for name in ("cpu_fp32", "zero1", "zero2", "zero3"):
        assert res[name] == [0.5, 0.0], (name, res[name])
    moved = res["moved"]
    assert moved and res["scaled"]
    assert not [n for n in moved if n.endswith("bias") or "layer_norm" in n or "LayerNorm" in n], (
        moved
    )
    assert any("word_embeddings" in n for n in moved) and any("lin1.weight" in n for n in moved)
