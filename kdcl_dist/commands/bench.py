"""Benchmarks that print side-by-side measurements and their ratios in one run.

`kdcl-dist bench ingest|score|sort|train|all`. Medians over repeats; this machine may be
shared and noisy, so compare the ratios, not absolute times across runs.
"""

from kdcl_dist.commands._dispatch import add_nested, run_nested

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


def run(args):
    return run_nested(args)
