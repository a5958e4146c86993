"""Evaluate a model: `kdcl-dist eval mlm` (held-out perplexity) or `kdcl-dist eval yesno`."""

from kdcl_dist.commands._dispatch import add_nested, run_nested

EVALS = {
    "mlm": ("kdcl_dist.evaluate.mlm", "held-out masked-LM loss and perplexity with fixed masks"),
    "yesno": (
        "kdcl_dist.evaluate.yesno",
        "fine-tune and test on a BLURB-format yes/no task over N seeds",
    ),
}


def add_arguments(parser):
    add_nested(parser, EVALS)


def run(args):
    return run_nested(args)
