"""Benchmarks that print side-by-side measurements and their ratios in one run.

`kdcl-dist bench ingest|score|sort|train|all`. Medians over repeats; this machine may be
shared and noisy, so compare the ratios, not absolute times across runs.
"""

import argparse

from kdcl_dist.commands._dispatch import add_nested, run_nested
from kdcl_dist.progress import PROGRESS_HELP, add_progress_flag, quiet_libraries

BENCHES = {
    "ingest": ("kdcl_dist.bench.ingest", "shard stage throughput vs the tokenizer alone"),
    "score": (
        "kdcl_dist.bench.score",
        "scoring pipeline vs tight loop, vs naive per-abstract loop, 2 vs 1 rank",
    ),
    "sort": ("kdcl_dist.bench.sort", "global sort + curriculum re-shard of 1.8M synthetic scores"),
    "train": (
        "kdcl_dist.bench.train",
        "KD step vs student-only step vs FLOP prediction; masked-only LM head",
    ),
    "teacher-cache": (
        "kdcl_dist.bench.teacher_cache",
        "KD step from the cached sparse teacher vs live KD vs student-only; cache bytes",
    ),
    "all": ("kdcl_dist.bench.all", "every benchmark above with its default (CPU-sized) settings"),
    "stats": (
        "kdcl_dist.bench.stats",
        "false-positive rate and power of the arm comparisons (simulation)",
    ),
}


def add_arguments(parser):
    add_nested(parser, BENCHES)
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                if any("--no-progress" in x.option_strings for x in sub._actions):
                    continue
                # the benches draw no bars of their own (stages they start get --no-progress)
                add_progress_flag(sub, PROGRESS_HELP + "; here the bars of the libraries it calls")


def run(args):
    if not args.progress:
        quiet_libraries()
    return run_nested(args)
