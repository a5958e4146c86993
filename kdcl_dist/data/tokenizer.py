"""Train a WordPiece tokenizer locally (HF `tokenizers`) and load tokenizers.

The embedded default trains its own small cased vocabulary on the corpus, so nothing
is downloaded. Real users pass a hub name or a local path to `load_tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from kdcl_dist.errors import UserError
from kdcl_dist.utils import HF_LOAD_LOCK

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 4000,
    lowercase: bool = False,
    max_length: int = 512,
    show_progress: bool | None = None,
):
    """Train a BERT-style WordPiece tokenizer and save it as a `BertTokenizerFast` dir.

    show_progress: the tokenizers library's bar (None: only when stderr is a terminal).
    """
    if show_progress is None:
        from kdcl_dist.progress import is_tty

        show_progress = is_tty()
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        lowercase=lowercase,
        clean_text=True,
        handle_chinese_chars=True,
        strip_accents=None if lowercase else False,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=2,
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = BertTokenizerFast(
        tokenizer_object=tok, do_lower_case=lowercase, model_max_length=max_length
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def load_tokenizer(name_or_path: str):
    """A fast tokenizer from a local directory, a packaged model (`pkg:NAME`, `minilm`) or a hub
    name (hub only when not offline)."""
    from transformers import AutoTokenizer

    from kdcl_dist.kd.models import resolve_model_ref

    try:
        with HF_LOAD_LOCK:
            tok = AutoTokenizer.from_pretrained(resolve_model_ref(name_or_path), use_fast=True)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{name_or_path}: cannot load a tokenizer ({str(e).splitlines()[0]}); "
            "pass a local tokenizer directory or a reachable hub name"
        ) from e
    if not getattr(tok, "is_fast", False):
        raise UserError(
            f"{name_or_path}: a fast (Rust) tokenizer is required for batched tokenization"
        )
    return tok


def check_mlm_tokenizer(tok, name: str) -> None:
    """Refuse a tokenizer that masked-LM distillation cannot use (no mask or padding token),
    before any work: without it scoring, training and evaluation would fail much later."""
    need = (
        ("mask", "mask_token_id", "mask_token", "[MASK]"),
        ("padding", "pad_token_id", "pad_token", "[PAD]"),
    )
    missing = [
        (what, key, token) for what, attr, key, token in need if getattr(tok, attr, None) is None
    ]
    if missing:
        tokens = " and ".join(f"no {what} token" for what, _, _ in missing)
        example = ", ".join(f"'{key}': '{token}'" for _, key, token in missing)
        raise UserError(
            f"{name}: tokenizer has {tokens}; masked-LM distillation masks tokens with [MASK] and pads batches "
            "with [PAD]: use a BERT-style tokenizer (e.g. one from `kdcl-dist tokenizer`) or add the token "
            f"(tok.add_special_tokens({{{example}}}); tok.save_pretrained(DIR)) and pass that directory"
        )


def tokenizer_fingerprint(tok) -> str:
    """Hash of the vocabulary and special tokens: equal fingerprints tokenize identically."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps(
        {
            "vocab": vocab,
            "special": tok.all_special_tokens,
            "lower": getattr(tok, "do_lower_case", None),
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_info(tok, name: str) -> dict:
    return {
        "name": str(name),
        "vocab_size": len(tok),
        "fingerprint": tokenizer_fingerprint(tok),
        "class": type(tok).__name__,
    }
