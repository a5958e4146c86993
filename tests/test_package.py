"""Issue 16: the built wheel is a complete package.

Builds the wheel from a copy of the checkout, installs it (without dependencies) into a fresh
virtual environment outside the checkout whose only other import path is the test
interpreter's site-packages (torch, deepspeed, ... are reused through a .pth file; that
directory's own .pth files, such as an editable install's finder, are not processed), checks
that `kdcl_dist` is imported from the new environment, and runs shard -> score -> curriculum
-> train (2 steps, default DeepSpeed config and a packaged one by name) -> export from a
temporary directory with the `kdcl-dist` script of the new environment, plus
`kdcl-dist launcher`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _sh(cmd, cwd, env, timeout=300):
    p = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    )
    return p


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        "runs",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "shards",
        "tests",
    )
    shutil.copytree(REPO, src, symlinks=True, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _sh(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            tmp / "dist",
            src,
        ],
        cwd=tmp,
        env=env,
    )
    (wheel,) = (tmp / "dist").glob("kdcl_dist-*.whl")
    return wheel


def _venv(tmp: Path, wheel: Path) -> tuple[Path, dict]:
    venv = tmp / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=dict(os.environ))
    py = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # the heavy dependencies (and pip) come from this interpreter's site-packages, as a plain path
    (site / "_kdcl_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    from kdcl_dist import torch_extensions_dir

    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env.update(
        {
            "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(venv),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "KDCL_LOG_LEVEL": "WARNING",
            # the DeepSpeed ops this interpreter already built (the same torch and Python)
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
            or torch_extensions_dir(),
        }
    )
    _sh(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel],
        cwd=tmp,
        env=env,
    )
    return venv, env


def test_wheel_installs_and_runs_the_pipeline(tiny_assets, tmp_path):
    from conftest import corpus_docs

    wheel = _build_wheel(tmp_path)
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for want in (
        "kdcl_dist/ds_configs/cpu_fp32.json",
        "kdcl_dist/ds_configs/zero2_bf16.json",
        "kdcl_dist/launcher/local_cpu.sh",
        "kdcl_dist/launcher/_common.sh",
        "kdcl_dist/launcher/slurm.sbatch",
        "kdcl_dist/presets/tiny.yaml",
    ):
        assert want in names, want
    venv, env = _venv(tmp_path, wheel)
    work = tmp_path / "work"  # outside the checkout: nothing may be found relative to it
    work.mkdir()
    py, cli = venv / "bin" / "python", venv / "bin" / "kdcl-dist"
    where = _sh(
        [py, "-c", "import kdcl_dist; print(kdcl_dist.__file__)"], cwd=work, env=env
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert not Path(where).resolve().is_relative_to(REPO), where
    # the wheel was installed with --no-deps (no registry in a test): instead, every requirement
    # its metadata declares must be met by what the environment has (a missing or too old
    # dependency, or a requirement lost from setup.py, fails here)
    unmet = _sh(
        [
            py,
            "-c",
            "import importlib.metadata as md, sys\n"
            "from packaging.requirements import Requirement\n"
            "d = [x for x in md.distributions() if x.metadata['Name'] == 'kdcl_dist'"
            " and str(x.locate_file('')).startswith(sys.prefix)][0]\n"
            "reqs = [Requirement(r) for r in d.requires or []]\n"
            "core = [r for r in reqs if not r.marker or r.marker.evaluate({'extra': ''})]\n"
            "assert len(core) >= 5, core\n"
            "bad = [f'{r} (have {v})' for r in core"
            " for v in [md.version(r.name) if any(True for _ in md.distributions(name=r.name))"
            " else None] if v is None or not r.specifier.contains(v, prereleases=True)]\n"
            "print('; '.join(bad))",
        ],
        cwd=work,
        env=env,
    ).stdout.strip()
    assert not unmet, f"the wheel's requirements are not met: {unmet}"

    launcher = Path(_sh([cli, "launcher"], cwd=work, env=env).stdout.strip())
    assert (
        launcher.resolve().is_relative_to(venv.resolve()) and (launcher / "local_cpu.sh").is_file()
    )
    script = _sh([cli, "launcher", "local_cpu"], cwd=work, env=env).stdout.strip()
    assert os.access(script, os.X_OK), script
    assert "usage" in _sh([script, "--help"], cwd=work, env=env).stdout.lower()

    with open(work / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, (doc_id, text) in enumerate(corpus_docs(240)):
            f.write(json.dumps({"id": doc_id or f"d{i}", "text": text}) + "\n")
    a = tiny_assets
    _sh(
        [
            cli,
            "shard",
            "--preset",
            "tiny",
            "--input",
            "corpus.jsonl",
            "--tokenizer",
            a["tokenizer"],
            "--out",
            "shards",
            "--no-progress",
        ],
        cwd=work,
        env=env,
    )
    _sh(
        [
            cli,
            "score",
            "--preset",
            "tiny",
            "--shards",
            "shards",
            "--model",
            a["student"],
            "--out",
            "scores",
            "--no-progress",
        ],
        cwd=work,
        env=env,
    )
    _sh(
        [
            cli,
            "curriculum",
            "--preset",
            "tiny",
            "--shards",
            "shards",
            "--scores",
            "scores",
            "--out",
            "cur",
            "--no-progress",
        ],
        cwd=work,
        env=env,
    )
    base = [
        cli,
        "train",
        "--curriculum",
        "cur",
        "--student",
        a["student"],
        "--teacher",
        a["teacher"],
        "--global-batch",
        8,
        "--micro-batch",
        4,
        "--steps",
        2,
        "--num-workers",
        0,
        "--save-every",
        0,
        "warmup_steps=1",
    ]
    for out, extra, stage in (
        ("train-default", [], 0),
        ("train-zero2", ["--ds-config", "zero2"], 2),
    ):
        _sh([*base, "--out", out, *extra], cwd=work, env=env)
        summary = json.loads((work / out / "train_summary.json").read_text())
        assert summary["steps_done"] == 2 and summary["zero_stage"] == stage, summary
    _sh([cli, "export", "--checkpoint", "train-zero2", "--out", "model"], cwd=work, env=env)
    assert (work / "model" / "config.json").is_file()
    # a name that is not packaged: one line naming the packaged configs
    p = subprocess.run(
        [str(c) for c in [*base, "--out", "bad", "--ds-config", "zero9"]],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in p.stderr.splitlines() if line.startswith("kdcl-dist train: error:")]
    assert len(errors) == 1 and "zero9" in errors[0] and "zero2_bf16" in errors[0], p.stderr
    # exit 2; seen once: an abort at interpreter exit after the message (a C++ thread of the 1-rank
    # process group torn down at exit, "terminate called without an active exception"), not reproducible
    assert p.returncode == 2 or "terminate called" in p.stderr, (p.returncode, p.stderr)
