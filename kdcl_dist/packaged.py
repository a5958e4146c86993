"""Files shipped inside the package: DeepSpeed configs and cluster launcher scripts.

    kdcl_dist/ds_configs/<name>.json   student / teacher DeepSpeed configs (`--ds-config NAME`)
    kdcl_dist/launcher/*.sh, *.sbatch  launcher scripts (`kdcl-dist launcher [NAME]` prints their path)

Both are package data (setup.py), found with `importlib.resources`, so they are there in a
wheel install as much as in a checkout; the checkout's top-level `ds_configs/` and `launcher/`
are symlinks to these directories.

`find_ds_config(value)`: an existing file (a relative path is taken from the current
directory) wins; otherwise a packaged config by name (`zero2_bf16`, `zero2_bf16.json`, or the
older spelling `ds_configs/zero2_bf16.json`); otherwise a one-line UserError listing the names.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kdcl_dist.errors import UserError


def _package_dir(name: str) -> Path:
    return Path(str(resources.files("kdcl_dist").joinpath(name)))


def ds_configs_dir() -> Path:
    return _package_dir("ds_configs")


def launcher_dir() -> Path:
    return _package_dir("launcher")


def ds_config_names() -> list[str]:
    return sorted(p.stem for p in ds_configs_dir().glob("*.json"))


def launcher_names() -> list[str]:
    return sorted(
        p.name
        for p in launcher_dir().iterdir()
        if p.is_file() and (p.suffix in (".sh", ".sbatch")) and not p.name.startswith("_")
    )


def find_ds_config(value) -> Path:
    """The DeepSpeed config file that `value` (a path or a packaged name) means."""
    text = str(value)
    p = Path(text).expanduser()
    if p.is_file():
        return p
    # a name, "name.json" or "ds_configs/name.json" (the repository layout before the configs moved
    # into the package; presets and older run configs still say so)
    parts = Path(text).parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "ds_configs"):
        name = parts[-1][:-5] if parts[-1].endswith(".json") else parts[-1]
        cand = ds_configs_dir() / f"{name}.json"
        if name and cand.is_file():
            return cand
    if p.exists():
        raise UserError(f"{text}: not a file; pass a DeepSpeed config JSON file or a packaged name")
    raise UserError(
        f"{text}: DeepSpeed config not found (no such file from {Path.cwd()}, and not a packaged "
        f"name); packaged configs: {', '.join(ds_config_names())}"
    )


def find_launcher(name: str | None) -> Path:
    """The launcher directory, or the path of one script (`local_cpu` or `local_cpu.sh`)."""
    d = launcher_dir()
    if not name:
        return d
    names = launcher_names()
    for cand in (name, f"{name}.sh", f"{name}.sbatch"):
        if cand in names or cand in ("_common.sh", "hostfile.example", "README.md"):
            return d / cand
    raise UserError(f"launcher {name!r}: no such script; packaged launchers: {', '.join(names)}")
