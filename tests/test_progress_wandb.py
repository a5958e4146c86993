"""Issue 16: packaged DeepSpeed configs by name, `kdcl-dist launcher`, cluster-friendly progress
output (no carriage returns in a log file, a periodic progress line instead) and the optional
Weights & Biases backend (offline mode: the run directory is written locally, nothing is sent).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _curriculum_fixture import curriculum_fixture

from kdcl_dist.errors import UserError

cur = curriculum_fixture()


# ---- packaged DeepSpeed configs and launchers (fast) --------------------------------------


def test_ds_config_by_name_by_path_and_error(tmp_path, monkeypatch):
    from kdcl_dist.kd.engine import load_ds_config
    from kdcl_dist.packaged import ds_config_names, ds_configs_dir, find_ds_config

    monkeypatch.chdir(tmp_path)  # not the checkout: names must resolve inside the package
    assert {"cpu_fp32", "zero2_bf16", "teacher_zero3"} <= set(ds_config_names())
    assert find_ds_config("zero2_bf16") == ds_configs_dir() / "zero2_bf16.json"
    assert find_ds_config("zero2_bf16.json") == ds_configs_dir() / "zero2_bf16.json"
    assert (
        find_ds_config("ds_configs/zero2.json") == ds_configs_dir() / "zero2.json"
    )  # the old spelling
    assert load_ds_config("zero3")["zero_optimization"]["stage"] == 3
    # a relative path is taken from the CWD and wins over a packaged name
    (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert load_ds_config("zero2.json")["zero_optimization"]["stage"] == 1
    with pytest.raises(UserError) as e:
        find_ds_config("zero9")
    msg = str(e.value)
    assert "\n" not in msg and "zero9" in msg and "zero2_bf16" in msg and "cpu_fp32" in msg


def test_launcher_command_prints_packaged_paths(capsys):
    from kdcl_dist.cli import main

    assert main(["launcher"]) == 0
    d = Path(capsys.readouterr().out.strip())
    assert d.is_dir() and (d / "local_cpu.sh").is_file() and (d / "_common.sh").is_file()
    assert d.parent.name == "kdcl_dist"
    assert main(["launcher", "slurm"]) == 0
    assert Path(capsys.readouterr().out.strip()) == d / "slurm.sbatch"
    assert main(["launcher", "local_cpu.sh"]) == 0
    assert os.access(capsys.readouterr().out.strip(), os.X_OK)
    assert main(["launcher", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "local_cpu.sh" in err


def test_log_progress_lines():
    from kdcl_dist.progress import LogProgress, progress_bar

    assert isinstance(
        progress_bar(10, "x", "step"), LogProgress
    )  # pytest's stderr is not a terminal
    assert progress_bar(10, "x", progress=False, lines=False) is None
    bar = LogProgress(total=10, desc="train", unit="step", initial=2, every=1e9)
    bar.update(3)
    bar.set_postfix({"loss": "1.5"})
    line = bar.line()
    assert (
        line.startswith("train: 5/10 step (50.0%)")
        and "ETA" in line
        and line.endswith("| loss=1.5")
    )


# ---- train output in a log file ------------------------------------------------------------


def _train(cur, assets, out, *flags, env=None, log=None, timeout=420):
    cmd = [
        sys.executable,
        "-m",
        "kdcl_dist",
        "train",
        "--curriculum",
        cur,
        "--student",
        assets["student"],
        "--teacher",
        assets["teacher"],
        "--out",
        out,
        "--global-batch",
        8,
        "--micro-batch",
        4,
        "--num-workers",
        0,
        "--seed",
        3,
        "--save-every",
        0,
        *flags,
        "warmup_steps=1",
    ]
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e.update(env or {})
    with open(log, "w") as f:
        p = subprocess.run(
            [str(c) for c in cmd],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=e,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    text = Path(log).read_text(errors="replace")
    assert p.returncode == 0, text[-4000:]
    return text


def test_train_log_file_has_progress_lines_not_bars(tiny_assets, cur, tmp_path):
    out = tmp_path / "run"
    text = _train(
        cur,
        tiny_assets,
        out,
        "--steps",
        3,
        env={"KDCL_PROGRESS_EVERY": "0"},
        log=tmp_path / "log.txt",
    )
    assert "\r" not in text, "a carriage-return progress bar reached a log file"
    lines = re.findall(
        r"train: (\d+)/3 step \([\d.]+%\), [\d.e+-]+ step/s, ETA [\d:?]+ \| .*samples_per_s=", text
    )
    assert lines and lines[-1] == "3", text[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["steps_done"] == 3


# ---- Weights & Biases, offline ---------------------------------------------------------------


def test_wandb_offline_run_and_resume(tiny_assets, cur, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'kdcl_dist[wandb]')")
    from PIL import Image

    if not (
        cur / "curriculum.png"
    ).exists():  # the fixture curriculum has no plots: one image to log
        Image.new("RGB", (8, 8)).save(cur / "curriculum.png")
    out = tmp_path / "run"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "wbcache"),
    }
    flags = ("--steps", 4, "--wandb", "--wandb-project", "kdcl-test", "max_steps_per_run=2")
    _train(cur, tiny_assets, out, *flags, env=env, log=tmp_path / "log1.txt")
    run_id = (out / "wandb_run_id").read_text().strip()
    assert run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    _train(cur, tiny_assets, out, *flags, env=env, log=tmp_path / "log2.txt")
    assert json.loads((out / "train_summary.json").read_text())["start_step"] == 2
    assert (
        out / "wandb_run_id"
    ).read_text().strip() == run_id  # the resumed run continues the same W&B run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    for r in runs:
        # offline, wandb-core keeps config, history and media in the run's .wandb log (protobuf records;
        # wandb ships no reader for it): the keys must be in there
        data = (r / f"run-{run_id}.wandb").read_bytes()
        for key in (
            b"train/loss",
            b"train/loss_kd",
            b"train/lambda",
            b"train/lr",
            b"train/samples_per_s",
            b"train/score_mean",
            b"train/step",
            b"reliance",
            b"global_batch",
            b"zero_stage",
        ):
            assert key in data, (r, key)
        if (
            r / "files" / "config.yaml"
        ).exists():  # versions that also write the config file offline
            assert "reliance" in (r / "files" / "config.yaml").read_text()
    assert (
        b"curriculum/curriculum" in (runs[0] / f"run-{run_id}.wandb").read_bytes()
    )  # logged once, not on resume
    assert list((runs[0] / "files" / "media" / "images").rglob("curriculum*.png"))
    summary = runs[-1] / "files" / "wandb-summary.json"
    if summary.exists():  # written at finish by the wandb versions that keep it offline
        assert json.loads(summary.read_text())["train/step"] == 4


def test_wandb_two_ranks_log_from_rank_0_only(tiny_assets, cur, tmp_path, monkeypatch):
    """A real 2-process torchrun job with --wandb: one W&B run (rank 0's), nothing from rank 1."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'kdcl_dist[wandb]')")
    from _curriculum_fixture import run_train

    for k, v in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "wbcache"),
        "WANDB_DIR": str(tmp_path / "wbdir"),  # where a stray run of another rank would land
    }.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    run_train(
        2,
        cur,
        tiny_assets,
        out,
        "--teacher",
        tiny_assets["teacher"],
        "--global-batch",
        8,
        "--micro-batch",
        4,
        "--steps",
        2,
        "--save-every",
        0,
        "--wandb",
        "--wandb-project",
        "kdcl-test",
    )
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id), runs
    assert b"train/loss" in (runs[0] / f"run-{run_id}.wandb").read_bytes()
    stray = (
        list((tmp_path / "wbdir").rglob("offline-run-*")) if (tmp_path / "wbdir").exists() else []
    )
    assert not stray, stray
