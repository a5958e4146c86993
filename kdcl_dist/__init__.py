"""kdcl_dist: distributed knowledge distillation with curriculum learning and selective reliance."""

__version__ = "0.1.0"
FORMAT_VERSION = 1


def torch_extensions_dir() -> str:
    """This Python environment's own JIT-extension cache: `<cache>/torch_extensions/py<XY>-torch<version>-<hash>`.

    `<cache>` is $XDG_CACHE_HOME or ~/.cache (torch's own default root); the hash is of
    sys.prefix, the torch version and the Python version, so every environment (venv, conda
    env, torch build) gets its own directory and keeps its builds.
    """
    import hashlib
    import os
    import sys
    from importlib import metadata

    try:  # the installed version, without importing torch (kdcl-dist --help stays fast)
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    tag = hashlib.sha256(f"{sys.prefix}\n{torch_version}\n{sys.version}".encode()).hexdigest()[:10]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(root, "torch_extensions", f"{py}-torch{torch_version}-{tag}")


def _set_torch_extensions_dir() -> None:
    """Set TORCH_EXTENSIONS_DIR to `torch_extensions_dir()` unless the user set it.

    DeepSpeed JIT-compiles its ops (the CPU accelerator's shared-memory comm op, ~1-2 min; CPU
    Adam for offload) into torch's extension cache, by default ~/.cache/torch_extensions/py<XY>_cpu,
    one directory for every environment of the user: two environments with other torch builds
    or paths then rebuild the op at every switch (ninja sees other flags). Done when the package
    is imported, i.e. before deepspeed is (it is imported lazily), in every rank that torchrun or
    the deepspeed launcher starts (they run `-m kdcl_dist`), and in the test processes; torch
    reads the variable only when it builds an op. docs/training.md, "First DeepSpeed run".
    """
    import os

    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir()


_set_torch_extensions_dir()
