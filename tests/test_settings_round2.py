"""Issue 17, round two: training and evaluation settings that were ignored, silently wrong, or
checked only after both models were loaded.

Each bad input must stop with exactly one `kdcl-dist <stage>: error: ...` line (exit 2), write
nothing, and (train) come before any model is loaded: the in-process runs below replace
`kd.models.load_mlm` by a function that fails the test, and stand in for the launcher's world
size without starting a process group. `run_cli` runs the real command for one case per stage.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _curriculum_fixture import curriculum_fixture
from conftest import REPO, real_data_dir, run_cli

from kdcl_dist.errors import UserError

cur = curriculum_fixture()


def _ds(tmp_path, base: str, edit) -> Path:
    cfg = json.loads((REPO / "ds_configs" / f"{base}.json").read_text())
    edit(cfg)
    p = tmp_path / f"my_{base}.json"
    p.write_text(json.dumps(cfg, indent=2))
    return p


def _rename(section: dict, old: str, new: str) -> None:
    section[new] = section.pop(old)


# ---- DeepSpeed configs against DeepSpeed's own schema -------------------------------------


def test_shipped_ds_configs_pass_the_check():
    from kdcl_dist.kd.engine import prepare_student_config, prepare_teacher_config

    for p in sorted((REPO / "ds_configs").glob("*.json")):
        if p.stem.startswith("teacher"):
            prepare_teacher_config(p, micro_batch=4, world_size=2, on_gpu=True)
        else:
            prepare_student_config(
                p,
                global_batch=16,
                micro_batch=4,
                world_size=2,
                lr=1e-3,
                warmup_steps=1,
                total_steps=10,
                on_gpu=True,
            )


@pytest.mark.parametrize(
    "base, edit, key, fix",
    [
        (
            "zero2",
            lambda c: _rename(c, "zero_optimization", "zero_optimisation"),
            "zero_optimisation",
            "did you mean 'zero_optimization'?",
        ),
        (
            "zero2",
            lambda c: _rename(c["zero_optimization"], "overlap_comm", "overlap_com"),
            "zero_optimization.overlap_com",
            "did you mean 'overlap_comm'?",
        ),
        (
            "zero3_offload",
            lambda c: _rename(c["zero_optimization"]["offload_optimizer"], "device", "devicee"),
            "zero_optimization.offload_optimizer.devicee",
            "did you mean 'device'?",
        ),
        (
            "zero2",
            lambda c: _rename(c["optimizer"], "params", "parms"),
            "optimizer.parms",
            "did you mean 'params'?",
        ),
        (
            "zero2",
            lambda c: c.update(checkpoint={"load_universl": True}),
            "checkpoint.load_universl",
            "did you mean 'load_universal'?",
        ),
        (
            "zero2_bf16",
            lambda c: _rename(c["bf16"], "enabled", "enable"),
            "bf16.enable",
            "did you mean 'enabled'?",
        ),
    ],
)
def test_unknown_ds_config_key_named_with_the_closest_known_key(tmp_path, base, edit, key, fix):
    from kdcl_dist.kd.engine import prepare_student_config

    p = _ds(tmp_path, base, edit)
    with pytest.raises(UserError) as e:
        prepare_student_config(
            p,
            global_batch=8,
            micro_batch=4,
            world_size=1,
            lr=1e-3,
            warmup_steps=1,
            total_steps=10,
            on_gpu=True,
        )
    ignored = (
        " (DeepSpeed would ignore it silently)"
        if "." not in key or key.split(".")[0] in ("optimizer", "checkpoint")
        else ""
    )
    assert (
        str(e.value)
        == f"{p}: unknown DeepSpeed config key '{key}'{ignored}; {fix} (fix or remove the key)"
    )


def test_ds_config_refusals_of_deepspeed_and_duplicates(tmp_path):
    from kdcl_dist.kd.engine import prepare_student_config, prepare_teacher_config

    kw = dict(
        global_batch=8,
        micro_batch=4,
        world_size=1,
        lr=1e-3,
        warmup_steps=1,
        total_steps=10,
        on_gpu=True,
    )
    p = _ds(tmp_path, "zero2", lambda c: c["zero_optimization"].update(stage=7))
    with pytest.raises(
        UserError,
        match=r"my_zero2.json: DeepSpeed config key 'zero_optimization.stage': .* \(got 7\)",
    ):
        prepare_student_config(p, **kw)
    p = _ds(tmp_path, "zero2", lambda c: c.update(fp16={"enabled": True}, bf16={"enabled": True}))
    with pytest.raises(
        UserError, match="DeepSpeed refuses this config: bfloat16 and fp16 modes cannot"
    ):
        prepare_student_config(p, **kw)
    dup = tmp_path / "dup.json"
    dup.write_text('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(
        UserError, match=f"^{dup}: key 'zero_optimization' appears twice in one object; keep one$"
    ):
        prepare_student_config(dup, **kw)
    t = _ds(
        tmp_path,
        "teacher_zero3",
        lambda c: _rename(
            c["zero_optimization"], "stage3_prefetch_bucket_size", "stage3_prefetch_bucket_sise"
        ),
    )
    with pytest.raises(UserError) as e:
        prepare_teacher_config(t, micro_batch=4, world_size=2, on_gpu=True)
    assert str(e.value) == (
        f"{t}: unknown DeepSpeed config key 'zero_optimization.stage3_prefetch_bucket_sise'; did "
        "you mean 'stage3_prefetch_bucket_size'? (fix or remove the key)"
    )


# ---- train: every check that needs no model runs before the models are loaded ---------------


def _train_in_process(monkeypatch, capsys, argv: list, world: int = 1) -> str:
    """`kdcl-dist train ARGV` in this process at world size `world` (no process group): the one
    error line; fails the test when a model would be loaded or the exit is not 2."""
    import kdcl_dist.kd.models as models
    import kdcl_dist.train as train_mod
    from kdcl_dist import dist
    from kdcl_dist.cli import main

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(models, "load_mlm", no_model)
    monkeypatch.setattr(train_mod, "init_distributed", lambda: dist.DistInfo(0, world, 0))
    capsys.readouterr()
    rc = main(["train", *map(str, argv)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err
    return lines[0]


def _argv(tiny_assets, cur, out, *extra):
    return [
        "--curriculum",
        cur,
        "--student",
        tiny_assets["student"],
        "--teacher",
        tiny_assets["teacher"],
        "--out",
        out,
        "--reliance",
        "constant",
        "--num-workers",
        "0",
        "--global-batch",
        "8",
        "--micro-batch",
        "4",
        "--ds-config",
        "ds_configs/cpu_fp32.json",
        *extra,
    ]


def _n(cur) -> int:
    return json.loads((Path(cur) / "curriculum.json").read_text())["num_samples"]


STEPS_HINT = "omit --steps (or set steps: null) to train by --epochs, one epoch by default"
EPOCHS_HINT = "omit --epochs (or set epochs: null) for one epoch, or give --steps"


@pytest.mark.parametrize(
    "extra, world, want",
    [
        (["--steps", "0"], 1, f"train.steps: 0 is below the minimum 1; {STEPS_HINT}"),
        (["--steps", "-5"], 1, f"train.steps: -5 is below the minimum 1; {STEPS_HINT}"),
        (["--epochs", "0"], 1, f"train.epochs: 0 is below the minimum 1; {EPOCHS_HINT}"),
        (
            ["--micro-batch", "16"],
            1,
            "train.micro_batch: 16 exceeds train.global_batch 8 (the micro batch is one rank's "
            "share of a step); lower --micro-batch or raise --global-batch",
        ),
        (
            ["--global-batch", "12"],
            2,
            "train.global_batch: 12 is not divisible by micro_batch x world_size = 4 x 2; "
            "pick a global batch that is a multiple of 8",
        ),
        (
            ["--global-batch", "8"],
            4,
            "train.micro_batch: micro_batch x world_size = 4 x 4 exceeds train.global_batch 8; "
            "lower --micro-batch to at most 2 or raise --global-batch",
        ),
        (
            ["--global-batch", "100000"],
            1,
            "train.global_batch: 100000 exceeds the curriculum's {n} samples; use a global "
            "batch of at most {n}",
        ),
        (
            ["--steps", "10000", "--epochs", "1"],
            1,
            "train.steps: 10000 steps exceed the 1 epoch(s) of {n} samples",
        ),
    ],
    ids=[
        "steps0",
        "steps-5",
        "epochs0",
        "micro>global",
        "indivisible-w2",
        "micro*world>global",
        "global>samples",
        "steps>epochs",
    ],
)
def test_train_settings_refused_before_any_model(
    tiny_assets, cur, tmp_path, monkeypatch, capsys, extra, world, want
):
    out = tmp_path / "run"
    line = _train_in_process(monkeypatch, capsys, _argv(tiny_assets, cur, out, *extra), world=world)
    want = want.format(n=_n(cur))
    assert line.startswith(f"kdcl-dist train: error: {want}"), line
    assert not out.exists()


def test_train_ds_configs_refused_before_any_model(tiny_assets, cur, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    p = _ds(tmp_path, "zero2", lambda c: _rename(c, "zero_optimization", "zero_optimisation"))
    line = _train_in_process(monkeypatch, capsys, _argv(tiny_assets, cur, out, "--ds-config", p))
    assert line == (
        f"kdcl-dist train: error: {p}: unknown DeepSpeed config key 'zero_optimisation' (DeepSpeed "
        "would ignore it silently); did you mean 'zero_optimization'? (fix or remove the key)"
    )
    t = _ds(tmp_path, "teacher_zero3", lambda c: _rename(c["zero_optimization"], "stage", "stag"))
    line = _train_in_process(
        monkeypatch,
        capsys,
        _argv(tiny_assets, cur, out, "--teacher-hosting", "zero3", f"teacher_ds_config={t}"),
        world=2,
    )
    assert line == (
        f"kdcl-dist train: error: {t}: unknown DeepSpeed config key 'zero_optimization.stag'; did you "
        "mean 'stage'? (fix or remove the key)"
    )
    assert not out.exists()


def test_train_cli_exit_2_and_nothing_written(tiny_assets, cur, tmp_path):
    """The real command: a misspelled DeepSpeed key and --steps 0, one line each, exit 2, no --out."""
    out = tmp_path / "run"
    p = _ds(tmp_path, "cpu_fp32", lambda c: _rename(c, "gradient_clipping", "gradient_cliping"))
    r = run_cli("train", *_argv(tiny_assets, cur, out, "--ds-config", p), check=False)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert errors == [
        f"kdcl-dist train: error: {p}: unknown DeepSpeed config key 'gradient_cliping' (DeepSpeed "
        "would ignore it silently); did you mean 'gradient_clipping'? (fix or remove the key)"
    ]
    r = run_cli("train", *_argv(tiny_assets, cur, out, "--steps", "0"), check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"kdcl-dist train: error: train.steps: 0 is below the minimum 1; {STEPS_HINT}"
    )
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_steps_and_epochs_unset_is_explicit(tmp_path):
    from kdcl_dist.config import resolve, write_resolved
    from kdcl_dist.train import TrainConfig, resolve_steps

    flags = {"curriculum": "c", "student": "s", "out": "o", "reliance": "none"}
    cfg = resolve(TrainConfig, "train", flags=flags)
    assert cfg.steps is None and cfg.epochs is None
    assert resolve_steps(400, 16, cfg.steps, cfg.epochs) == (25, 25)  # unset: one epoch
    assert resolve_steps(400, 16, None, 2) == (50, 25)
    assert resolve_steps(400, 16, 60, None) == (60, 25)
    write_resolved(cfg, tmp_path, "train")  # the resolved config reads back unset
    assert "steps: null" in (tmp_path / "config.yaml").read_text()
    again = resolve(TrainConfig, "train", config_file=str(tmp_path / "config.yaml"))
    assert again.steps is None and again.epochs is None
    assert resolve(TrainConfig, "train", flags=flags, overrides=["steps=null"]).steps is None
    with pytest.raises(UserError, match=r"^train.steps: 0 is below the minimum 1; omit --steps"):
        resolve_steps(400, 16, 0, None)
    with pytest.raises(UserError, match=r"^train.curriculum: the curriculum holds no samples"):
        resolve_steps(0, 16, None, None)


# ---- curriculum: an empty curriculum is refused where it is made ----------------------------


def test_curriculum_heldout_100_refused_at_config_and_cli(tiny_assets, tmp_path):
    from test_curriculum import fake_scores

    from kdcl_dist.config import resolve
    from kdcl_dist.curriculum.build import CurriculumConfig

    want = (
        "curriculum.exclude_heldout_percent: 100 is above the maximum 99; 100 would leave every document out "
        "(0 keeps them all)"
    )
    with pytest.raises(UserError) as e:
        resolve(CurriculumConfig, "curriculum", flags={"exclude_heldout_percent": 100})
    assert str(e.value) == want
    scores = tmp_path / "scores"
    fake_scores(tiny_assets["shards"], scores)
    out = tmp_path / "cur"
    r = run_cli(
        "curriculum",
        "--shards",
        tiny_assets["shards"],
        "--scores",
        scores,
        "--out",
        out,
        "--exclude-heldout-percent",
        "100",
        "--no-progress",
        check=False,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"kdcl-dist curriculum: error: {want}"
    ]
    assert not out.exists()


@pytest.mark.parametrize("in_memory_max", [20_000_000, 0], ids=["in_memory", "external"])
def test_empty_curriculum_refused_naming_the_option(tiny_assets, tmp_path, in_memory_max):
    from test_curriculum import fake_scores

    from kdcl_dist.curriculum.build import CurriculumConfig, build_curriculum
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.evaluate.mlm import is_heldout

    ids = [s.meta["id"] for s in ShardSet(tiny_assets["shards"])]
    scores = tmp_path / "scores"
    fake_scores(tiny_assets["shards"], scores, nan_ids=set(ids))  # every score NaN
    kw = dict(progress=False, plots=False, nonfinite="exclude", in_memory_max=in_memory_max)
    out = tmp_path / "cur"
    with pytest.raises(UserError) as e:
        build_curriculum(
            tiny_assets["shards"], scores, out, CurriculumConfig(exclude_heldout_percent=0, **kw)
        )
    assert str(e.value) == (
        f"curriculum.nonfinite: the curriculum would be empty: all {len(ids)} samples are left "
        f"out ({len(ids)} with a non-finite score dropped by curriculum.nonfinite=exclude); use "
        "--nonfinite last (or re-score)"
    )
    assert not out.exists()
    held = sum(is_heldout(i, 50) for i in ids)
    with pytest.raises(UserError) as e:
        build_curriculum(
            tiny_assets["shards"], scores, out, CurriculumConfig(exclude_heldout_percent=50, **kw)
        )
    assert str(e.value) == (
        f"curriculum.exclude_heldout_percent: the curriculum would be empty: all {len(ids)} samples are left out "
        f"({held} held out by curriculum.exclude_heldout_percent=50, {len(ids) - held} with a non-finite score "
        "dropped by curriculum.nonfinite=exclude); lower --exclude-heldout-percent (0 keeps every document) or use "
        "--nonfinite last (or re-score)"
    )
    assert not out.exists()
    out.mkdir()  # an existing --out is kept, and nothing is written into it
    with pytest.raises(UserError, match="curriculum would be empty"):
        build_curriculum(
            tiny_assets["shards"], scores, out, CurriculumConfig(exclude_heldout_percent=0, **kw)
        )
    assert out.is_dir() and not any(out.iterdir())


# ---- eval yesno: BLURB's .json files, labels, stratified --max-train --------------------------


def _rows(n: int, labels=("no", "yes"), shares=(0.2, 0.8), sort=True) -> list[dict]:
    rng = np.random.default_rng(0)
    out = [
        {
            "id": f"q{i}",
            "sentence1": f"question {i}?",
            "sentence2": f"context {i}.",
            "label": str(rng.choice(labels, p=shares)),
        }
        for i in range(n)
    ]
    return sorted(out, key=lambda r: r["label"]) if sort else out


def _task(root: Path, splits: dict, fmt: str = "jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s, rows in splits.items():
        if fmt == "jsonl":
            (root / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif fmt == "list":
            (root / f"{s}.json").write_text(json.dumps(rows, indent=2))
        elif fmt == "data":
            (root / f"{s}.json").write_text(json.dumps({"version": 1, "data": rows}))
        else:  # records keyed by id
            (root / f"{s}.json").write_text(
                json.dumps({r["id"]: {k: v for k, v in r.items() if k != "id"} for r in rows})
            )
    return root


def _splits():
    return {"train": _rows(120), "dev": _rows(20, sort=False), "test": _rows(30, sort=False)}


@pytest.mark.parametrize("fmt", ["list", "data", "by_id", "jsonl_named_json"])
def test_blurb_json_files_read_like_jsonl(tmp_path, fmt):
    from kdcl_dist.evaluate.yesno import evaluate_yesno, load_task

    splits = _splits()
    ref = load_task(_task(tmp_path / "jsonl", splits))
    if fmt == "jsonl_named_json":  # BLURB's HF-format files: JSON Lines under a .json name
        d = _task(tmp_path / fmt, splits)
        for s in splits:
            (d / f"{s}.jsonl").rename(d / f"{s}.json")
    else:
        d = _task(tmp_path / fmt, splits, fmt)
    assert load_task(d) == ref
    assert evaluate_yesno(None, d)["files"] == {
        "train": "train.json",
        "dev": "dev.json",
        "test": "test.json",
    }


def test_bioasq_as_json_list_gives_the_same_data(tmp_path):
    from kdcl_dist.evaluate.yesno import load_task

    d = real_data_dir()
    if d is None or not (d / "bioasq" / "train.jsonl").exists():
        pytest.skip("real data not found: set KDCL_DATA_DIR (default ../shared/data)")
    splits = {
        s: [json.loads(ln) for ln in open(d / "bioasq" / f"{s}.jsonl")]
        for s in ("train", "dev", "test")
    }
    assert load_task(_task(tmp_path / "t", splits, "list")) == load_task(d / "bioasq")


@pytest.mark.parametrize("label", [None, True, "", "  ", ["yes"], {"v": "yes"}, 0.5])
def test_yesno_bad_label_names_file_and_line(tmp_path, label):
    from kdcl_dist.evaluate.yesno import load_task

    splits = _splits()
    splits["train"][4]["label"] = label
    d = _task(tmp_path / "jl", splits)
    with pytest.raises(UserError) as e:
        load_task(d)
    want = (
        f': label {json.dumps(label)} is not a class name; give every record a label such as "yes" '
        'or "no" (or remove the record)'
    )
    assert str(e.value) == f"{d / 'train.jsonl'}:5" + want
    d = _task(tmp_path / "list", splits, "list")  # a JSON list: the line the record starts on
    with pytest.raises(UserError) as e:
        load_task(d)
    assert str(e.value) == f"{d / 'train.json'}:{2 + 4 * 6}" + want


def test_yesno_labels_differing_in_case_and_unseen_labels(tmp_path):
    from kdcl_dist.evaluate.yesno import load_task

    splits = _splits()
    splits["train"][7]["label"] = "Yes "
    d = _task(tmp_path / "a", splits)
    with pytest.raises(UserError) as e:
        load_task(d)
    assert str(e.value) == (
        f"{d / 'train.jsonl'}:8: label 'Yes ' differs from the label 'yes' only in case or "
        "spaces; write it as 'yes' (or the two become different classes)"
    )
    splits = _splits()
    splits["test"][3]["label"] = "maybe"
    d = _task(tmp_path / "b", splits)
    with pytest.raises(UserError) as e:
        load_task(d)
    assert str(e.value) == (
        f"{d / 'test.jsonl'}:4: label 'maybe' never occurs in train.jsonl (train's labels are "
        "no, yes); fix the label"
    )


def test_yesno_cli_null_label_exit_2_nothing_written(tmp_path):
    splits = _splits()
    splits["dev"][2]["label"] = None
    d = _task(tmp_path / "task", splits)
    out = tmp_path / "yesno.json"
    r = run_cli("eval", "yesno", "--data", d, "--baseline-only", "--out", out, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"kdcl-dist eval: error: {d / 'dev.jsonl'}:3: label null is not a class name; give every record a label "
        'such as "yes" or "no" (or remove the record)'
    ]
    assert not out.exists()


def test_max_train_is_a_seeded_stratified_subset(tmp_path):
    from kdcl_dist.config import resolve
    from kdcl_dist.evaluate.yesno import YesNoConfig, evaluate_yesno, stratified_subset

    splits = _splits()
    train = splits["train"]  # sorted by label: the first N rows would be all "no"
    counts = collections.Counter(r["label"] for r in train)
    n = 50
    sub = stratified_subset(train, n, seed=0)
    got = collections.Counter(r["label"] for r in sub)
    assert len(sub) == n and set(got) == {"no", "yes"}
    for lab in counts:  # each label keeps its share (largest remainder: within one row)
        assert abs(got[lab] - n * counts[lab] / len(train)) < 1
    ids = [r["id"] for r in train]
    assert [ids.index(r["id"]) for r in sub] == sorted(
        ids.index(r["id"]) for r in sub
    )  # file order kept
    assert stratified_subset(train, n, seed=0) == sub  # seeded
    other = stratified_subset(train, n, seed=1)
    assert other != sub and collections.Counter(r["label"] for r in other) == got
    assert collections.Counter(r["label"] for r in stratified_subset(train, 3, seed=0)) == {
        "no": 1,
        "yes": 2,
    }
    assert stratified_subset(train, 10_000, seed=0) == train
    with pytest.raises(
        UserError, match=r"^eval_yesno.max_train: 1 is below the 2 labels of the train split"
    ):
        stratified_subset(train, 1, seed=0)
    cfg = resolve(YesNoConfig, "eval_yesno", flags={"max_train": n, "subset_seed": 0})
    r = evaluate_yesno(None, _task(tmp_path / "t", splits), cfg)
    assert r["sizes"]["train"] == n
    assert r["train_subset"] == {
        "n": n,
        "seed": 0,
        "stratified_by": "label",
        "label_counts": dict(sorted(got.items())),
    }
    assert r["majority_baseline"]["label"] == "yes"


def test_bioasq_max_train_keeps_both_classes(tmp_path):
    d = real_data_dir()
    if d is None or not (d / "bioasq" / "train.jsonl").exists():
        pytest.skip("real data not found: set KDCL_DATA_DIR (default ../shared/data)")
    # a label-sorted copy of BLURB's train split (as some conversions write it)
    t = tmp_path / "bioasq"
    t.mkdir()
    for s in ("dev", "test"):
        shutil.copyfile(d / "bioasq" / f"{s}.jsonl", t / f"{s}.jsonl")
    rows = sorted(
        (json.loads(ln) for ln in open(d / "bioasq" / "train.jsonl")), key=lambda r: r["label"]
    )
    (t / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli(
        "eval",
        "yesno",
        "--data",
        t,
        "--baseline-only",
        "--max-train",
        "67",
        "--out",
        tmp_path / "r.json",
    )
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["train_subset"]["label_counts"] == {"no": 12, "yes": 55}  # 118/670 and 552/670 of 67
    assert "train: stratified subset of 67 (seed 0): {'no': 12, 'yes': 55}" in r.stdout


# ---- TORCH_EXTENSIONS_DIR -------------------------------------------------------------------


def test_torch_extensions_dir_is_per_environment(tmp_path):
    import os
    import subprocess
    import sys

    import kdcl_dist

    d = kdcl_dist.torch_extensions_dir()
    assert sys.prefix not in d and Path(d).name.startswith(
        f"py{sys.version_info.major}{sys.version_info.minor}-torch"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    code = "import os, kdcl_dist; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    p = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert p.stdout.strip() == d
    p = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert p.stdout.strip() == str(tmp_path)  # the user's setting wins
