"""Held-out masked-LM loss and perplexity with fixed masks.

  kdcl-dist eval mlm --model runs/export/student --shards shards/heldout --split all --out mlm.json
  kdcl-dist eval mlm --model runs/models/teacher --shards shards/pubmed            # held-out split

Loss = (sum of cross-entropy over every masked token of every selected sample, K masks each)
/ (number of masked tokens); perplexity = exp(loss). Masks come from
`data.masking.mask_sample(ids, id, draw=k, purpose="eval", seed)`: a pure function of the
sample id, so every model (student before/after, teacher, baselines) is scored on exactly the
same masked tokens, on any machine. The LM head runs on the masked positions only.

Held-out split (fixed, independent of the tokenizer and of sharding): a document is held out
when `id_hash64(doc_id) % 100 < heldout_percent` (default 5), where doc_id is the sample's
`meta["id"]` with a `_partK` suffix (from `--too-long split`) removed, so all parts of one
document fall on the same side. `--split all` evaluates every sample (a separate held-out
corpus sharded on its own).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcl_dist.config import add_config_args, add_options, option, resolve_args
from kdcl_dist.errors import UserError

DEFAULT_HELDOUT_PERCENT = 5
_PART = re.compile(r"_part\d+$")


def document_id(sample_id: str) -> str:
    return _PART.sub("", str(sample_id))


def is_heldout(doc_id: str, percent: int = DEFAULT_HELDOUT_PERCENT) -> bool:
    """The fixed held-out rule shared by evaluation, the experiment and the curriculum
    (`curriculum.exclude_heldout_percent`, so that training never sees these documents)."""
    from kdcl_dist.utils import id_hash64

    return id_hash64(document_id(doc_id)) % 100 < percent


def heldout_mask(sample_ids, percent: int) -> np.ndarray:
    """`is_heldout` of each id, as a boolean array (all False when percent is 0)."""
    if percent <= 0:
        return np.zeros(len(sample_ids), dtype=bool)
    return np.fromiter(
        (is_heldout(str(s), percent) for s in sample_ids), dtype=bool, count=len(sample_ids)
    )


@dataclass
class EvalMLMConfig:
    split: str = option(
        "heldout", help="heldout: only held-out ids; all: every sample", choices=("heldout", "all")
    )
    heldout_percent: int = option(
        DEFAULT_HELDOUT_PERCENT, help="percent of documents held out (by id hash)", min=0, max=100
    )
    masks: int = option(2, help="fixed masks per sample (K)", min=1)
    seed: int = option(0, help="mask seed (purpose 'eval')")
    max_samples: int = option(0, help="evaluate the first N selected samples (0: all)", min=0)
    batch_size: int = option(32, help="samples per forward", min=1)
    mask_prob: float = option(0.15, help="fraction of non-special tokens masked", min=0.0, max=1.0)


def add_arguments(p):
    from kdcl_dist.progress import add_progress_flag

    p.add_argument(
        "--model", required=True, help="HF masked-LM directory (export, init-models) or hub name"
    )
    p.add_argument(
        "--shards", required=True, help="shard directory (dataset.json or curriculum.json)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    add_options(p, EvalMLMConfig, "eval_mlm")
    p.add_argument("--out", default=None, help="write the summary JSON here")
    p.add_argument(
        "--per-sample",
        dest="per_sample",
        default=None,
        help="write per-sample loss sums and masked counts (.npz) for paired statistics",
    )
    add_progress_flag(p)
    add_config_args(p, "eval_mlm")


def select_samples(shards, split: str, percent: int, max_samples: int = 0):
    """(id, ids) of the selected samples in shard order (deterministic)."""
    from kdcl_dist.data.reader import ShardSet

    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    out = []
    for s in range(ss.num_shards):
        for sample in ss.iter_shard(s):
            sid = str(sample.meta.get("id", sample.key))
            if split == "heldout" and not is_heldout(sid, percent):
                continue
            out.append((sid, np.asarray(sample.ids)))
            if max_samples and len(out) >= max_samples:
                return ss, out
    return ss, out


def _check_tokenizer(ss, tok, tok_name: str) -> None:
    from kdcl_dist.data.tokenizer import tokenizer_fingerprint

    want = (ss.manifest.get("tokenizer") or {}).get("fingerprint")
    if want and want != tokenizer_fingerprint(tok):
        raise UserError(
            f"{ss.manifest_path}: shards were tokenized with tokenizer {want}, but {tok_name} has "
            f"{tokenizer_fingerprint(tok)}; evaluate on shards made with the model's tokenizer"
        )


def score_samples(
    model,
    samples,
    spec,
    masks: int,
    seed: int,
    batch_size: int = 32,
    progress: bool = False,
    device=None,
):
    """Per-sample (loss_sum, n_masked) arrays over K fixed eval masks; LM head on masked positions."""
    import torch

    from kdcl_dist.data.masking import mask_sample
    from kdcl_dist.kd.models import mlm_parts

    device = device or torch.device("cpu")
    model.eval().to(device)
    encoder, head = mlm_parts(model)
    pad = int(getattr(model.config, "pad_token_id", 0) or 0)
    loss_sum = np.zeros(len(samples), dtype=np.float64)
    n_masked = np.zeros(len(samples), dtype=np.int64)
    # (sample index, draw) units sorted by length: batches of similar length waste little padding
    units = sorted(
        ((i, k) for i in range(len(samples)) for k in range(masks)),
        key=lambda u: (len(samples[u[0]][1]), u),
    )
    from kdcl_dist.progress import progress_bar

    bar = progress_bar(len(units), "eval mlm", "seq", progress=progress, leave=False)
    with torch.inference_mode():
        for start in range(0, len(units), batch_size):
            chunk = units[start : start + batch_size]
            L = max(len(samples[i][1]) for i, _ in chunk)
            inp = np.full((len(chunk), L), pad, dtype=np.int64)
            lab = np.full((len(chunk), L), -100, dtype=np.int64)
            att = np.zeros((len(chunk), L), dtype=np.int64)
            for r, (i, k) in enumerate(chunk):
                sid, ids = samples[i]
                x, y = mask_sample(ids, sid, k, "eval", seed, spec)
                inp[r, : len(x)], lab[r, : len(y)], att[r, : len(x)] = x, y, 1
            inp_t, lab_t, att_t = (torch.from_numpy(a).to(device) for a in (inp, lab, att))
            sel = lab_t != -100
            if head is not None:
                hidden = encoder(input_ids=inp_t, attention_mask=att_t).last_hidden_state
                logits = head(hidden[sel]).float()
            else:  # unknown architecture: full logits, then the masked positions
                logits = model(input_ids=inp_t, attention_mask=att_t).logits[sel].float()
            tok_loss = (
                torch.nn.functional.cross_entropy(logits, lab_t[sel], reduction="none")
                .double()
                .cpu()
                .numpy()
            )
            rows = sel.nonzero()[:, 0].cpu().numpy()
            row_unit = np.array([chunk[r][0] for r in range(len(chunk))])
            np.add.at(loss_sum, row_unit[rows], tok_loss)
            np.add.at(n_masked, row_unit[rows], 1)
            if bar:
                bar.update(len(chunk))
    if bar:
        bar.close()
    return loss_sum, n_masked


def evaluate_mlm(
    model: str,
    shards: str,
    cfg: EvalMLMConfig | None = None,
    tokenizer: str | None = None,
    progress: bool = False,
) -> tuple[dict, dict]:
    """Return (summary, per_sample) for one model on one shard set."""
    import torch

    from kdcl_dist.data.masking import MaskSpec
    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.kd.models import load_mlm, model_fingerprint

    cfg = cfg or EvalMLMConfig()
    t0 = time.time()
    ss, samples = select_samples(
        shards, cfg.split, cfg.heldout_percent, cfg.max_samples
    )  # fails fast on a bad dir
    tok_name = tokenizer or str(model)
    tok = load_tokenizer(tok_name)
    spec = MaskSpec.from_tokenizer(tok, mask_prob=cfg.mask_prob)  # no mask token: refused here
    _check_tokenizer(ss, tok, tok_name)
    if not samples:
        raise UserError(
            f"{ss.dir}: no samples selected (split={cfg.split}, heldout_percent={cfg.heldout_percent}); "
            "use --split all for a separate held-out corpus or raise --heldout-percent"
        )
    m = load_mlm(str(model))
    if m.config.vocab_size < len(tok):
        raise UserError(
            f"{model}: vocabulary of {m.config.vocab_size} tokens is smaller than the tokenizer's {len(tok)}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss_sum, n_masked = score_samples(
        m, samples, spec, cfg.masks, cfg.seed, cfg.batch_size, progress, device
    )
    total = float(loss_sum.sum())
    count = int(n_masked.sum())
    loss = total / max(count, 1)
    summary = {
        "model": str(model),
        "model_fingerprint": model_fingerprint(m),
        "shards": str(ss.dir) if ss.store else str(shards),  # a URL: storage.redact'd
        "shards_fingerprint": ss.fingerprint,
        "split": cfg.split,
        "heldout_percent": cfg.heldout_percent,
        "masks": cfg.masks,
        "seed": cfg.seed,
        "samples": len(samples),
        "masked_tokens": count,
        "tokens": int(sum(len(ids) for _, ids in samples)),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "seconds": round(time.time() - t0, 2),
    }
    per_sample = {
        "ids": np.array([s for s, _ in samples]),
        "loss_sum": loss_sum,
        "n_masked": n_masked,
    }
    return summary, per_sample


def save_per_sample(path: str | Path, per_sample: dict) -> None:
    from kdcl_dist.utils import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **per_sample)


def load_per_sample(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def run(args) -> int:
    from kdcl_dist.utils import check_output_path, write_json_atomic

    if args.out:  # before loading the model: a bad path fails in a second, not after the evaluation
        check_output_path(args.out, "file")
    if args.per_sample:
        check_output_path(args.per_sample, "file", key="--per-sample")
    cfg = resolve_args(args)
    summary, per_sample = evaluate_mlm(
        args.model, args.shards, cfg, args.tokenizer, progress=args.progress
    )
    print(
        f"eval mlm  model={summary['model']}  split={summary['split']}  samples={summary['samples']}  "
        f"masked tokens={summary['masked_tokens']}  loss={summary['loss']:.4f}  "
        f"perplexity={summary['perplexity']:.2f}  ({summary['seconds']}s)"
    )
    if args.out:
        write_json_atomic(args.out, summary)
        print(f"wrote {args.out}")
    if args.per_sample:
        save_per_sample(args.per_sample, per_sample)
    return 0
