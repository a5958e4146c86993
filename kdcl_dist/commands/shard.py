"""Ingest a corpus into tokenized webdataset shards with an offset index and dataset.json.

  kdcl-dist shard --input abstracts.jsonl --tokenizer runs/tokenizer --out shards/pubmed

Inputs: jsonl, json (a list of records), plain text, PubMed/MEDLINE XML(.gz), parquet, HF
datasets (see docs/data.md).
Launched under torchrun, the deepspeed launcher or mpirun, every rank writes its share of
the shards and rank 0 writes dataset.json; the result does not depend on the world size.
Re-running skips finished shards.
"""

from __future__ import annotations

from pathlib import Path

from kdcl_dist.config import add_config_args, resolve
from kdcl_dist.data.ingest import FORMATS, TEXT_UNITS

# flag name -> config key
_FLAGS = {
    "max_length": int, "shard_size": int, "min_tokens": int, "format": str, "text_field": str,
    "title_field": str, "id_field": str, "text_unit": str, "too_long": str, "batch_size": int,
}


def add_arguments(p):
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="files or directories (jsonl, json, txt, xml/xml.gz, parquet, HF dataset dir or hub name)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub name (fast tokenizer)")
    p.add_argument("--out", required=True, help="output directory for shards and dataset.json")
    p.add_argument("--max-length", dest="max_length", type=int, help="tokens per sample incl. special tokens")
    p.add_argument("--shard-size", dest="shard_size", type=int,
                   help="most samples per shard (and documents per block; see docs/data.md)")
    p.add_argument("--min-tokens", dest="min_tokens", type=int, help="drop shorter documents")
    p.add_argument("--format", choices=FORMATS, help="input format (auto: by suffix; .json by content)")
    p.add_argument("--text-field", dest="text_field", help="jsonl/parquet/hf body field (default text)")
    p.add_argument("--title-field", dest="title_field", help="title field prefixed to the body ('' disables)")
    p.add_argument("--id-field", dest="id_field", help="id field ('' uses file:line)")
    p.add_argument("--text-unit", dest="text_unit", choices=TEXT_UNITS,
                   help="txt inputs: one document per line, per blank-line separated paragraph, or per file "
                        "(id = the file's path)")
    p.add_argument("--too-long", dest="too_long", choices=("truncate", "split"),
                   help="documents over --max-length: truncate or split into several samples")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="documents per tokenizer call")
    p.add_argument("--skip-bad-lines", dest="skip_bad_lines", action="store_true", default=None,
                   help="count and skip invalid JSON lines / records without the text field or with a bad id")
    p.add_argument("--keep-text", dest="keep_text", action="store_true", default=None,
                   help="also store each document's text in the shard")
    p.add_argument("--no-dedup", dest="dedup", action="store_false", default=None,
                   help="keep duplicate documents")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace shards in --out made with another tokenizer")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    add_config_args(p)


def split_overrides(inputs: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--input a.jsonl max_length=64`: argparse gives both to --input; move KEY=VALUE back."""
    keep, extra = [], []
    for item in inputs:
        if "=" in item and not Path(item).exists() and item.split("=", 1)[0].replace(".", "").replace("_", "").isalnum():
            extra.append(item)
        else:
            keep.append(item)
    return keep, extra + list(overrides)


def run(args) -> int:
    from kdcl_dist import dist
    from kdcl_dist.data.build import ShardConfig, build_dataset
    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.utils import check_output_path

    check_output_path(args.out, "dir")   # every rank, before the process group and any work
    inputs, overrides = split_overrides(args.input, args.overrides)
    flags = {k: getattr(args, k) for k in (*_FLAGS, "skip_bad_lines", "keep_text", "dedup", "overwrite")}
    cfg = resolve(ShardConfig, "shard", preset=args.preset, config_file=args.config, flags=flags,
                  overrides=overrides)
    with dist.stage() as info:
        tok = load_tokenizer(args.tokenizer)
        manifest = build_dataset(inputs, tok, args.out, cfg, tokenizer_name=args.tokenizer,
                                 rank=info.rank, world=info.world_size, progress=args.progress)
    if info.rank == 0:
        t = manifest["totals"]
        print(f"{args.out}: {t['input_documents']} documents read, {t['kept_documents']} kept, "
              f"{t['dropped_documents']} dropped -> {t['samples']} samples, {t['tokens']} tokens, "
              f"{len(manifest['shards'])} shards")
    return 0
