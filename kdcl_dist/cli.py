"""`kdcl-dist <command>`: one subcommand per stage, each a thin call into one module.

Command modules live in `kdcl_dist/commands/<name>.py` and define
`add_arguments(parser)` and `run(args) -> int`. Only the chosen command's module is
imported, so `kdcl-dist --help` is fast and a broken optional dependency of one stage
does not break the others.

The deepspeed launcher passes `--local_rank=N` before the subcommand; it is accepted
anywhere on the line and exported as LOCAL_RANK.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kdcl_dist import __version__
from kdcl_dist.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("kdcl_dist.commands.tokenizer", "train a WordPiece tokenizer on a corpus"),
    "init-models": ("kdcl_dist.commands.init_models", "write a tiny teacher/student pair of HF models"),
    "shard": ("kdcl_dist.commands.shard", "ingest a corpus into tokenized webdataset shards"),
    "score": ("kdcl_dist.commands.score", "distributed scoring pass: per-sample MLM loss under the student"),
    "curriculum": ("kdcl_dist.commands.curriculum", "global sort of scores and easy->hard curriculum shards"),
    "train": ("kdcl_dist.commands.train", "KD / KD-CL / KD-CL-SR training with DeepSpeed ZeRO"),
    "checkpoint": ("kdcl_dist.commands.checkpoint", "checkpoint tools (universal conversion, listing)"),
    "export": ("kdcl_dist.commands.export", "export the trained student as an HF model directory"),
    "eval": ("kdcl_dist.commands.eval", "evaluate a model: held-out MLM perplexity, yes/no QA fine-tuning"),
    "experiment": ("kdcl_dist.commands.experiment", "the paper's ablation grid with seeds and statistics"),
    "demo": ("kdcl_dist.commands.demo", "the whole pipeline on the embedded default (tiny models, CPU)"),
    "bench": ("kdcl_dist.commands.bench", "side-by-side benchmarks (ingest, score, sort, train)"),
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


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdcl-dist",
        description="Distributed knowledge distillation with curriculum learning and selective reliance.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<12} {v[1]}" for k, v in COMMANDS.items())
        + "\n\nRun `kdcl-dist <command> --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"kdcl-dist {__version__}")
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="command")
    return p


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
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(
        prog=f"kdcl-dist {name}", description=(module.__doc__ or COMMANDS[name][1]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"kdcl-dist {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdcl-dist {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
