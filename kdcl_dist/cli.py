"""`kdcl-dist <command>`: one subcommand per stage, each a thin call into one module.

Command modules live in `kdcl_dist/commands/<name>.py` and define
`add_arguments(parser)` and `run(args) -> int`. Only the chosen command's module is
imported, so `kdcl-dist --help` is fast and a broken optional dependency of one stage
does not break the others.

The deepspeed launcher passes `--local_rank=N` before the subcommand; it is accepted
anywhere on the line and exported as LOCAL_RANK.

`--print-config` (every command with a config section) prints the resolved config as YAML and
exits 0 before `run`: nothing is read, checked or written beyond the preset and --config files, and
the paths a command otherwise requires may be omitted.

Errors: a `UserError` is printed on one line (exit 2). A full disk or exceeded quota (an
OSError ENOSPC/EDQUOT anywhere in the exception's cause/context chain, or a library error
whose message carries it) is also printed on one line naming the path, the file system and
the fix (exit 2); every stage writes through temp files and renames, so nothing partial is
left under a final name. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from pathlib import Path

from kdcl_dist import __version__
from kdcl_dist.errors import UserError, exception_chain

COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("kdcl_dist.commands.tokenizer", "train a WordPiece tokenizer on a corpus"),
    "init-models": (
        "kdcl_dist.commands.init_models",
        "write a tiny teacher/student pair of HF models",
    ),
    "shard": ("kdcl_dist.commands.shard", "ingest a corpus into tokenized webdataset shards"),
    "score": (
        "kdcl_dist.commands.score",
        "distributed scoring pass: per-sample MLM loss under the student",
    ),
    "curriculum": (
        "kdcl_dist.commands.curriculum",
        "global sort of scores and easy->hard curriculum shards",
    ),
    "teacher-cache": (
        "kdcl_dist.commands.teacher_cache",
        "cache the teacher's sparse distribution at the training masks (shared by all arms)",
    ),
    "train": ("kdcl_dist.commands.train", "KD / KD-CL / KD-CL-SR training with DeepSpeed ZeRO"),
    "checkpoint": (
        "kdcl_dist.commands.checkpoint",
        "checkpoint tools (universal conversion, listing)",
    ),
    "export": ("kdcl_dist.commands.export", "export the trained student as an HF model directory"),
    "eval": (
        "kdcl_dist.commands.eval",
        "evaluate a model: held-out MLM perplexity, yes/no QA fine-tuning",
    ),
    "experiment": (
        "kdcl_dist.commands.experiment",
        "the paper's ablation grid with seeds and statistics",
    ),
    "demo": (
        "kdcl_dist.commands.demo",
        "the whole pipeline on the embedded default (tiny models, CPU)",
    ),
    "bench": ("kdcl_dist.commands.bench", "side-by-side benchmarks (ingest, score, sort, train)"),
    "launcher": (
        "kdcl_dist.commands.launcher",
        "print where the packaged cluster launcher scripts are",
    ),
}


def _strip_local_rank(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
            continue
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(a)
    return out


# library errors that wrap a full disk without an errno (safetensors' Rust IO error, torch's writer)
_DISK_FULL_TEXT = {
    errno.ENOSPC: ("No space left on device", "os error 28", "StorageFull"),
    errno.EDQUOT: ("Disk quota exceeded", "os error 122", "FilesystemQuotaExceeded"),
}


def disk_full(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, filename or None) when `exc` or anything in its cause/context chain is a full disk."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_TEXT:
            name = e.filename if isinstance(e.filename, str) else None
            return e.errno, name
        text = str(e)
        for code, needles in _DISK_FULL_TEXT.items():
            if any(n in text for n in needles):
                return code, None
    return None


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file system type) holding `path` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    fstype = "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[1] == str(p):
                fstype = parts[2]  # the last entry wins: a later mount hides earlier ones
    except OSError:
        pass
    return str(p), fstype


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_message(code: int, filename: str | None, args) -> str:
    path = filename or getattr(args, "out", None) or os.getcwd()
    mount, fstype = _mount_of(Path(path))
    try:
        st = os.statvfs(mount)
        free = f", {_size(st.f_bavail * st.f_frsize)} free now"
    except OSError:
        free = ""
    what = "free space" if code == errno.ENOSPC else "free space or raise your quota"
    return (
        f"{path}: {os.strerror(code)}; {what} on {mount} ({fstype}{free}) or point --out elsewhere, "
        "then re-run the same command (finished work is kept)"
    )


def _shown(value) -> str:
    """A default as the help shows it (as config.option_help does: lists comma-joined, '' quoted)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, str):
        return value if value else "''"
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its choices and default, as the config options' do.

    Used by every parser and sub-parser. Appends `(one of: a, b; default: x)` to a hand-written
    option's help unless the help already lists them (config options: config.option_help writes
    them, their argparse default is None). No default for `--x/--no-x` and store_true/false flags
    (the flag says it), for None/SUPPRESS and for an empty list (nothing given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if text == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            return text
        tail = []
        choices = action.choices
        if choices and "one of:" not in text:
            tail.append("one of: " + ", ".join(map(str, choices)).replace("%", "%%"))
        d = action.default
        if (
            d is not None
            and d is not argparse.SUPPRESS
            and not isinstance(d, bool)
            and d not in ([], ())
            and not re.search(rf"\bdefault:? {re.escape(_shown(d))}(?![\w.-])", text)
        ):
            tail.append("default: " + _shown(d).replace("%", "%%"))
        if not tail:
            return text
        return f"{text.rstrip()} ({'; '.join(tail)})" if text.strip() else f"({'; '.join(tail)})"


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one `kdcl-dist <cmd>: error: ...` line, exit 2
    (no usage block; --help shows it). Nested sub-parsers inherit the class (argparse's
    add_subparsers), so they too get HelpFormatter."""

    def __init__(self, *args, formatter_class=None, **kwargs):
        super().__init__(*args, formatter_class=formatter_class or HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kdcl-dist",
        description="Distributed knowledge distillation with curriculum learning and selective reliance.",
        epilog="commands:\n"
        + "\n".join(f"  {k:<12} {v[1]}" for k, v in COMMANDS.items())
        + "\n\nRun `kdcl-dist <command> --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"kdcl-dist {__version__}")
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="command")
    return p


def _relax_required(parser: argparse.ArgumentParser) -> None:
    """--print-config does no work, so the paths a command requires may be left out."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _relax_required(sub)
        else:
            action.required = False


def command_parser(name: str):
    """(module, parser) of `kdcl-dist <name>` with every option and nested command added."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = _Parser(
        prog=f"kdcl-dist {name}", description=(module.__doc__ or COMMANDS[name][1]).strip()
    )
    module.add_arguments(parser)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)
        top.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        top.error(f"unknown command '{name}'; choose from {', '.join(COMMANDS)}")
    module, parser = command_parser(name)
    if "--print-config" in argv:
        _relax_required(parser)
    args = parser.parse_args(argv[1:])
    try:
        if getattr(args, "print_config", False):
            from kdcl_dist.config import print_config

            print_config(args)
            return 0
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"kdcl-dist {name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise
        print(f"kdcl-dist {name}: error: {disk_full_message(*full, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdcl-dist {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
