"""Run every benchmark with its default settings, one after another."""

import argparse
import importlib

NAMES = ["ingest", "score", "sort", "train"]


def add_arguments(parser):
    parser.add_argument("--only", default=",".join(NAMES), help="comma-separated subset")


def run(args):
    rc = 0
    for name in args.only.split(","):
        mod = importlib.import_module(f"kdcl_dist.bench.{name}")
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        print(f"\n=== bench {name} ===", flush=True)
        rc |= int(mod.run(p.parse_args([])) or 0)
    return rc
