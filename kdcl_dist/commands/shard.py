"""Ingest a corpus into tokenized webdataset shards with an offset index and dataset.json.

  kdcl-dist shard --input abstracts.jsonl --tokenizer runs/tokenizer --out shards/pubmed

Inputs: jsonl, json (a list of records), plain text, PubMed/MEDLINE XML(.gz), parquet, HF
datasets (see docs/data.md).
Launched under torchrun, the deepspeed launcher or mpirun, every rank writes its share of
the shards and rank 0 writes dataset.json; the result does not depend on the world size.
Re-running skips finished shards.
"""

from __future__ import annotations

import shutil

from kdcl_dist.config import add_config_args, add_options, resolve_args, split_overrides
from kdcl_dist.errors import UserError

__all__ = ["add_arguments", "run", "split_overrides"]  # split_overrides: kept importable from here


def add_arguments(p):
    from kdcl_dist.progress import add_progress_flag

    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files or directories (jsonl, json, txt, xml/xml.gz, parquet, HF dataset dir or hub "
        "name), local or URLs (s3://, gs://, https://)",
    )
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer directory or hub name (fast tokenizer)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory for shards and dataset.json, or a URL (s3://bucket/prefix)",
    )
    from kdcl_dist.data.build import ShardConfig

    add_options(p, ShardConfig, "shard")
    add_progress_flag(p)
    add_config_args(p, "shard")


def run(args) -> int:
    from kdcl_dist import dist, storage
    from kdcl_dist.data.build import build_dataset
    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.utils import check_output_path

    check_output_path(
        args.out, "dir", allow_url=True
    )  # every rank, before the process group and any work
    inputs, overrides = split_overrides(args.input, args.overrides)
    cfg = resolve_args(args, overrides)
    with dist.stage() as info:
        # URL inputs are downloaded to a staging directory (kdcl_dist/storage.py), an --out URL
        # is written there and uploaded at the end, dataset.json last
        local_inputs, to_url, staged_in = storage.fetch_inputs(inputs, info.rank)
        try:
            with storage.staged_output(args.out, info.rank, info.world_size) as out:
                tok = load_tokenizer(args.tokenizer)
                manifest = build_dataset(
                    local_inputs,
                    tok,
                    out,
                    cfg,
                    tokenizer_name=args.tokenizer,
                    rank=info.rank,
                    world=info.world_size,
                    progress=args.progress,
                )
                if staged_in is not None and info.rank == 0:
                    manifest = storage.relabel_inputs(out, to_url)
        except UserError as e:  # name the URL, not the staged copy
            raise UserError(to_url(str(e))) from e
        finally:
            if staged_in is not None:
                shutil.rmtree(staged_in, ignore_errors=True)
    if info.rank == 0:
        t = manifest["totals"]
        print(
            f"{storage.redact(args.out)}: {t['input_documents']} documents read, {t['kept_documents']} kept, "
            f"{t['dropped_documents']} dropped -> {t['samples']} samples, {t['tokens']} tokens, "
            f"{len(manifest['shards'])} shards"
        )
    return 0
