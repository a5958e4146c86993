"""Train a BERT-style WordPiece tokenizer (HF tokenizers) on a corpus.

  kdcl-dist tokenizer --input abstracts.jsonl --out runs/tokenizer --vocab-size 8000

Reads the same inputs as `kdcl-dist shard` (jsonl, json, txt, MEDLINE XML, parquet, HF
datasets), cleaned the same way (empty and duplicate documents skipped). The directory is
written under a temporary name and renamed when complete; it loads with AutoTokenizer.

WordPiece keeps only pieces seen at least twice, so a small corpus can yield far fewer
tokens than --vocab-size asks for: the command then warns (or, with --strict-vocab-size,
refuses), and records the requested and the actual size in `<out>/kdcl_tokenizer.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass

from kdcl_dist.config import (
    add_config_args,
    add_options,
    option,
    resolve_args,
    split_overrides,
    write_resolved,
)
from kdcl_dist.data import ingest
from kdcl_dist.errors import UserError

log = logging.getLogger("kdcl_dist.tokenizer")


@dataclass
class TokenizerConfig:
    vocab_size: int = option(8000, help="WordPiece vocabulary size", min=100)
    lowercase: bool = option(False, help="lowercase and strip accents (uncased model)")
    max_length: int = option(512, help="model_max_length recorded in the tokenizer", min=8)
    max_docs: int = option(0, help="train on the first N documents only (0 = all)", min=0)
    format: str = option(
        "auto",
        help="input format; auto = by file suffix (.json by content)",
        choices=ingest.FORMATS,
    )
    text_field: str = option("text", help="jsonl/parquet/hf: field holding the document body")
    title_field: str = option("title", help="field prefixed to the body when present; '' disables")
    id_field: str = option("id", help="field holding the document id; '' uses <file>:<line>")
    text_unit: str = option(
        "line",
        help="txt inputs: one document per line, per blank-line separated paragraph, or per file",
        choices=ingest.TEXT_UNITS,
    )
    skip_bad_lines: bool = option(
        False, help="count and skip invalid JSON lines / records without the text field"
    )
    strict_vocab_size: bool = option(
        False,
        help="refuse (instead of warning) when the corpus yields fewer tokens than vocab_size",
    )


def add_arguments(p):
    from kdcl_dist.progress import add_progress_flag

    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files or directories (jsonl, json, txt, xml/xml.gz, parquet, HF dataset dir or hub name)",
    )
    p.add_argument("--out", required=True, help="tokenizer directory to write")
    add_options(p, TokenizerConfig, "tokenizer")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing tokenizer in --out"
    )
    add_progress_flag(p)
    add_config_args(p, "tokenizer")


def run(args) -> int:
    from kdcl_dist.data.tokenizer import train_wordpiece
    from kdcl_dist.utils import check_output_path, make_temp_dir, setup_logging

    setup_logging(0)
    inputs, overrides = split_overrides(args.input, args.overrides)
    cfg = resolve_args(args, overrides)
    out = check_output_path(args.out, "dir", replace=True)  # before reading any input
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(
            f"{out}: already exists and is not empty; pass --overwrite or choose another --out"
        )
    opts = ingest.ReadOptions(
        format=cfg.format,
        text_field=cfg.text_field,
        title_field=cfg.title_field,
        id_field=cfg.id_field,
        text_unit=cfg.text_unit,
        skip_bad_lines=cfg.skip_bad_lines,
    )
    stats = ingest.IngestStats()
    specs = ingest.resolve_inputs(inputs, cfg.format)  # errors before any work
    n = 0

    def texts():
        nonlocal n
        for doc in ingest.clean(ingest.read_documents(specs, opts, stats), opts, stats):
            n += 1
            yield doc.text
            if cfg.max_docs and n >= cfg.max_docs:
                return

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(
        out.parent, f".tmp-{out.name}."
    )  # 0777 less the umask, like the files in it
    try:
        tok = train_wordpiece(
            texts(),
            tmp,
            vocab_size=cfg.vocab_size,
            lowercase=cfg.lowercase,
            max_length=cfg.max_length,
            show_progress=None if args.progress else False,
        )
        if n == 0:
            raise UserError(
                f"{', '.join(inputs)}: no documents to train on (dropped: {ingest.describe_drops(stats)})"
            )
        short = len(tok) < cfg.vocab_size
        if short:
            why = (
                f"{', '.join(inputs)}: the corpus yields only {len(tok)} tokens, fewer than --vocab-size "
                f"{cfg.vocab_size} ({n} documents; WordPiece keeps pieces seen at least twice); train on more "
                "text or lower --vocab-size"
            )
            if cfg.strict_vocab_size:
                raise UserError(why + " (without --strict-vocab-size this is a warning)")
            log.warning("%s; the tokenizer has %d tokens", why, len(tok))
        write_resolved(cfg, tmp, "tokenizer")
        (tmp / "kdcl_tokenizer.json").write_text(
            json.dumps(
                {
                    "vocab_size": len(tok),
                    "requested_vocab_size": cfg.vocab_size,
                    "documents": n,
                    "dropped": {k: v for k, v in sorted(stats.dropped.items()) if v},
                    "lowercase": cfg.lowercase,
                },
                indent=2,
            )
            + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    asked = f" ({cfg.vocab_size} requested)" if short else ""
    print(
        f"{out}: WordPiece tokenizer, {len(tok)} tokens{asked}, trained on {n} documents "
        f"(dropped: {ingest.describe_drops(stats)})"
    )
    return 0
