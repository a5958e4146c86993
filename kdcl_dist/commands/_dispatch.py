"""Nested sub-commands (`kdcl-dist bench score`, `kdcl-dist eval mlm`) loaded lazily."""

from __future__ import annotations

import argparse
import importlib


def add_nested(parser: argparse.ArgumentParser, table: dict[str, tuple[str, str]]) -> None:
    sub = parser.add_subparsers(dest="nested", metavar="{" + ",".join(table) + "}", required=True)
    for name, (module_name, help_text) in table.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        try:
            importlib.import_module(module_name).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            p.set_defaults(_missing=True)


def run_nested(args) -> int:
    if getattr(args, "_missing", False):
        raise SystemExit(f"{args._module} is not available in this build")
    return int(importlib.import_module(args._module).run(args) or 0)
