"""Fine-tune and test on a BLURB-format sentence-pair task (BioASQ yes/no) over N seeds.

  kdcl-dist eval yesno --model runs/export/student --data ../shared/data/bioasq --out yesno.json

DATA holds the train, dev and test splits as `<split>.jsonl` (one JSON object per line) or
`<split>.json` (BLURB's name: a JSON list of records, an object holding one such list, or an
object of records keyed by id; a `.json` file holding JSON Lines works too), each record with
`sentence1` (question), `sentence2` (context) and `label`; `.jsonl` wins when both exist (see
`read_split`). Labels are read from the data (sorted set of the train labels; a dev/test label
unseen in train is an error, and so is a null, empty or non-scalar label, or two labels that
differ only in case or spaces), so any classification task in this format works.
`--max-train N` fine-tunes on a stratified subset of N train records (each label keeps its share;
drawn with `subset_seed`, the same subset for every seed). The model (an MLM checkpoint, BERT or DistilBERT) gets a fresh
classification head (AutoModelForSequenceClassification); each seed controls the head's
initialisation, dropout and the data order. Plain torch loop: AdamW, linear decay to 0 after an
optional warm-up. By default no model selection (the model after the last epoch is tested; dev
accuracy is reported beside it); `--select dev` tests the epoch with the best dev macro-F1, and
`--class-weight balanced` weights the loss by inverse label frequency (a model that predicts
the majority label for every question otherwise sits exactly at the baseline). Defaults are
the paper's appendix (batch 8, 2 epochs, lr 5.537e-5, weight decay 0.05).

Reported: per-seed test accuracy and macro-F1; mean and std over seeds; a 95% bootstrap CI
of accuracy that resamples both test questions and seeds (stats.ratio_bootstrap: pooled over
seeds, so it covers the test-set sampling noise that dominates with ~140 questions); and the
majority-class baseline (the train split's majority label predicted for every test question).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcl_dist.config import add_config_args, add_options, option, resolve_args
from kdcl_dist.errors import UserError
from kdcl_dist.evaluate import stats

SPLITS = ("train", "dev", "test")


@dataclass
class YesNoConfig:
    seeds: int = option(5, help="fine-tuning runs (seeds 0..N-1)", min=1)
    epochs: int = option(2, help="epochs over the train split", min=1)
    batch_size: int = option(8, help="fine-tuning examples per step", min=1)
    lr: float = option(5.537e-05, help="peak learning rate (the paper's appendix)", min=0.0)
    weight_decay: float = option(0.05, help="AdamW weight decay", min=0.0)
    warmup_ratio: float = option(
        0.0, help="fraction of steps with linear warm-up", min=0.0, max=1.0
    )
    max_length: int = option(
        256, help="tokens per question+context pair (truncates the context)", min=8
    )
    max_train: int = option(
        0,
        help="fine-tune on a stratified subset of N train examples (each label keeps its "
        "share, drawn with subset_seed; 0: all)",
        min=0,
    )
    subset_seed: int = option(
        0, help="seed of the stratified --max-train subset (the same subset for every seed)"
    )
    class_weight: str = option(
        "none",
        help="loss weight per label: none, or balanced (n / (labels x count), from the train "
        "split) so the minority label is not ignored",
        choices=("none", "balanced"),
    )
    select: str = option(
        "last",
        help="which epoch's model is tested: last (the paper), or dev (the epoch with the best dev "
        "macro-F1, ties to the later epoch; the test split is never looked at to choose)",
        choices=("last", "dev"),
    )
    n_boot: int = option(10000, help="bootstrap replicates for the CI", min=100)


def add_arguments(p):
    from kdcl_dist.progress import add_progress_flag

    p.add_argument("--model", help="HF model directory or hub name (an MLM checkpoint is fine)")
    p.add_argument(
        "--data",
        required=True,
        help="directory with the train, dev and test splits (train.jsonl or "
        "BLURB's train.json, ...)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    add_options(p, YesNoConfig, "eval_yesno")
    p.add_argument(
        "--baseline-only", action="store_true", help="only report the majority baseline (no model)"
    )
    p.add_argument("--out", default=None, help="write the result JSON here")
    add_progress_flag(p)
    add_config_args(p, "eval_yesno")


FIELDS = ("sentence1", "sentence2", "label")


def split_path(data_dir: str | Path, split: str) -> Path:
    """`<split>.jsonl`, else `<split>.json` (the name BLURB distributes); `.jsonl` wins when both exist."""
    d = Path(data_dir)
    for ext in (".jsonl", ".json"):
        if (d / f"{split}{ext}").exists():
            return d / f"{split}{ext}"
    raise UserError(
        f"{d / (split + '.jsonl')}: missing (nor is there a {split}.json); a BLURB-format task directory "
        "needs train, dev and test splits as .jsonl (one record per line) or .json (a list of records)"
    )


def _json_lines(path: Path, text: str) -> list[tuple[str, object]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({e.msg}); fix or remove the line") from e
    return out


def _json_list(path: Path, text: str, start: int) -> list[tuple[str, object]]:
    """The elements of the JSON list opening at text[start] ('['), each with its line number."""
    dec = json.JSONDecoder()
    out, i, line, seen = [], start + 1, 1 + text.count("\n", 0, start), start

    def skip(j):
        while j < len(text) and text[j] in " \t\r\n":
            j += 1
        return j

    def at(j):  # the line of offset j (offsets only grow)
        nonlocal line, seen
        line += text.count("\n", seen, j)
        seen = j
        return line

    i = skip(i)
    if text[i : i + 1] == "]":
        return out
    while True:
        i = skip(i)
        where = f"{path}:{at(i)}"
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file") from e
        out.append((where, obj))
        i = skip(i)
        if text[i : i + 1] == ",":
            i += 1
            continue
        if text[i : i + 1] == "]":
            return out
        raise UserError(
            f"{path}:{at(i)}: invalid JSON (expected ',' or ']' after a record); fix the file"
        )


def _records(path: Path) -> list[tuple[str, object]]:
    """(where, record) for every record of a split file, whatever its layout.

    Detection: a file whose first character is `[` is one JSON list of records; one starting
    with `{` that parses as a single JSON object is a record (JSON Lines of one line), an object
    holding exactly one list of records (`{"data": [...]}`), or records keyed by id (the key
    becomes `id` where a record has none); anything else is JSON Lines. `where` is `path:line`
    (`path: key[i]` / `path: record 'key'` inside an object), for the error messages.
    """
    text = path.read_text(encoding="utf-8")
    head = text.lstrip()[:1]
    if head == "[":
        return _json_list(path, text, text.index("["))
    if head == "{":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # several objects: JSON Lines
        if isinstance(doc, dict):
            if all(k in doc for k in FIELDS):
                return [(f"{path}:{1 + text.count(chr(10), 0, text.index('{'))}", doc)]
            lists = [k for k, v in doc.items() if isinstance(v, list)]
            if len(lists) == 1:
                k = lists[0]
                return [(f"{path}: {k}[{i}]", r) for i, r in enumerate(doc[k])]
            if doc and all(isinstance(v, dict) for v in doc.values()):
                return [
                    (f"{path}: record {k!r}", v if "id" in v else {"id": k, **v})
                    for k, v in doc.items()
                ]
            raise UserError(
                f"{path}: a JSON object that is neither a record, one list of records (e.g. "
                '{"data": [...]}) nor records keyed by id; write one record per line (.jsonl) instead'
            )
    return _json_lines(path, text)


def _check_record(where: str, r) -> dict:
    if not isinstance(r, dict):
        raise UserError(
            f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(r).__name__}"
        )
    missing = [k for k in FIELDS if k not in r]
    if missing:
        raise UserError(
            f"{where}: missing field(s) {', '.join(missing)}; each record needs {', '.join(FIELDS)}"
        )
    lab = r["label"]
    if (
        lab is None
        or isinstance(lab, bool)
        or not isinstance(lab, (str, int))
        or not str(lab).strip()
    ):
        raise UserError(
            f"{where}: label {json.dumps(lab)} is not a class name; give every record a label such as "
            '"yes" or "no" (or remove the record)'
        )
    for k in ("sentence1", "sentence2"):
        if not isinstance(r[k], str):
            raise UserError(
                f"{where}: {k} is {json.dumps(r[k])[:40]}, not a text; fix or remove the record"
            )
    return r


def read_split(path: Path, where: list | None = None) -> list[dict]:
    """The records of one split file (`_records` says which layouts are read), checked; the
    location of each is appended to `where` when given."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path}: missing; a BLURB-format task directory needs train, dev and test splits"
        )
    rows = []
    for w, r in _records(path):
        rows.append(_check_record(w, r))
        if where is not None:
            where.append(w)
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def _label_key(label) -> str:
    return " ".join(str(label).split()).lower()


def load_task(data_dir: str | Path) -> tuple[dict[str, list[dict]], list[str]]:
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"{d}: task directory not found")
    paths = {s: split_path(d, s) for s in SPLITS}
    where: dict[str, list[str]] = {s: [] for s in SPLITS}
    data = {s: read_split(paths[s], where[s]) for s in SPLITS}
    train_labels = [str(r["label"]) for r in data["train"]]
    labels = sorted(set(train_labels))
    by_key: dict[str, str] = {}
    for lab in sorted(
        labels, key=lambda x: -train_labels.count(x)
    ):  # the most frequent spelling is the label
        other = by_key.setdefault(_label_key(lab), lab)
        if other != lab:
            w = where["train"][train_labels.index(lab)]
            raise UserError(
                f"{w}: label {lab!r} differs from the label {other!r} only in case or spaces; write it "
                f"as {other!r} (or the two become different classes)"
            )
    if len(labels) < 2:
        raise UserError(
            f"{paths['train']}: only one label ({labels[0]}); a classification task needs at least two"
        )
    for s in ("dev", "test"):
        for w, r in zip(where[s], data[s]):
            lab = str(r["label"])
            if lab not in labels:
                near = by_key.get(_label_key(lab))
                hint = (
                    f"it differs from {near!r} only in case or spaces"
                    if near
                    else f"train's labels are {', '.join(labels)}"
                )
                raise UserError(
                    f"{w}: label {lab!r} never occurs in {paths['train'].name} ({hint}); fix the label"
                )
    return data, labels


def stratified_subset(rows: list[dict], n: int, seed: int) -> list[dict]:
    """`n` of `rows` with each label's share kept, drawn with numpy's default_rng(seed), in file order.

    Label counts: the largest-remainder rounding of n·share, at least 1 per label (so no label
    disappears); within a label, a uniform draw without replacement. n >= len(rows): all rows.
    """
    if n >= len(rows):
        return list(rows)
    labels = [str(r["label"]) for r in rows]
    classes = sorted(set(labels))
    if n < len(classes):
        raise UserError(
            f"eval_yesno.max_train: {n} is below the {len(classes)} labels of the train split; use at "
            f"least {len(classes)} so that every label is trained (0: all)"
        )
    counts = {c: labels.count(c) for c in classes}
    exact = {c: n * counts[c] / len(rows) for c in classes}
    take = {c: max(1, int(exact[c])) for c in classes}
    while sum(take.values()) < n:
        take[max(classes, key=lambda c: (exact[c] - take[c], counts[c]))] += 1
    while sum(take.values()) > n:  # only after the at-least-one rule
        take[
            max((c for c in classes if take[c] > 1), key=lambda c: (take[c] - exact[c], counts[c]))
        ] -= 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in classes:
        idx = np.flatnonzero(np.asarray(labels) == c)
        chosen += rng.choice(idx, size=take[c], replace=False).tolist()
    return [rows[i] for i in sorted(chosen)]


def _encode(tok, rows, label_ids, max_length):
    enc = tok(
        [r["sentence1"] for r in rows],
        [r["sentence2"] for r in rows],
        truncation="only_second",
        max_length=max_length,
    )
    return [({k: enc[k][i] for k in enc}, label_ids[str(r["label"])]) for i, r in enumerate(rows)]


def _collate(batch, pad_id):
    import torch

    L = max(len(x["input_ids"]) for x, _ in batch)
    out = {}
    for k in batch[0][0]:
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.tensor([x[k] + [fill] * (L - len(x[k])) for x, _ in batch], dtype=torch.long)
    out["labels"] = torch.tensor([y for _, y in batch], dtype=torch.long)
    return out


def class_weights(train_ids: list[int], n_labels: int, mode: str) -> list[float] | None:
    """Per-label loss weights: None for `none`; n / (n_labels * count) for `balanced` (sklearn's rule)."""
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=n_labels)
    return [len(train_ids) / (n_labels * max(1, int(c))) for c in counts]


def _predict(model, examples, pad_id, batch_size, device):
    import torch

    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size * 4):
            b = _collate(examples[i : i + batch_size * 4], pad_id)
            b.pop("labels")
            logits = model(**{k: v.to(device) for k, v in b.items()}).logits
            preds.extend(logits.argmax(-1).cpu().tolist())
    return np.asarray(preds, dtype=np.int64)


def finetune_one(
    model_name: str,
    tok,
    enc: dict,
    labels: list[str],
    cfg: YesNoConfig,
    seed: int,
    progress: bool = False,
) -> dict:
    """One seed: fresh head, train `epochs`, return dev/test predictions and metrics."""
    import torch
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    from kdcl_dist.kd.models import load_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    np.random.seed(seed)
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model = load_pretrained(
            AutoModelForSequenceClassification,
            model_name,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"{model_name}: cannot load as a sequence classifier ({str(e).splitlines()[0]})"
        ) from e
    finally:
        hf_logging.set_verbosity_warning()
    model.to(device)
    pad_id = int(tok.pad_token_id or 0)
    train = enc["train"]
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": cfg.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    from kdcl_dist.progress import progress_bar

    bar = progress_bar(total, f"yesno seed {seed}", "step", progress=progress, leave=False)
    weights = class_weights([y for _, y in train], len(labels), cfg.class_weight)
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=None if weights is None else torch.tensor(weights, device=device)
    )
    losses, epochs, best = [], [], None
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(perm), cfg.batch_size):
            b = _collate([train[j] for j in perm[i : i + cfg.batch_size]], pad_id)
            y = b.pop("labels").to(device)
            out = model(**{k: v.to(device) for k, v in b.items()})
            out.loss = loss_fn(out.logits.float(), y)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            if bar:
                bar.update(1)
        if cfg.select == "dev" or epoch == cfg.epochs - 1:
            ev = _evaluate_splits(model, enc, labels, pad_id, cfg.batch_size, device)
            epochs.append({"epoch": epoch + 1, "dev_macro_f1": ev["dev_macro_f1"]})
            if best is None or ev["dev_macro_f1"] >= best[1]["dev_macro_f1"]:
                best = (epoch + 1, ev)
    if bar:
        bar.close()
    res = {"seed": seed, "train_loss_last_epoch": float(np.mean(losses[-steps_per_epoch:]))}
    chosen = best if cfg.select == "dev" else (cfg.epochs, ev)
    res.update(chosen[1])
    res["epoch_tested"] = chosen[0]
    if cfg.select == "dev":
        res["dev_by_epoch"] = epochs
    return res


def _evaluate_splits(model, enc, labels, pad_id, batch_size, device) -> dict:
    res = {}
    for split in ("dev", "test"):
        pred = _predict(model, enc[split], pad_id, batch_size, device)
        gold = np.array([y for _, y in enc[split]])
        res[f"{split}_accuracy"] = float((pred == gold).mean())
        res[f"{split}_macro_f1"] = stats.macro_f1(
            gold.tolist(), pred.tolist(), list(range(len(labels)))
        )
        res[f"{split}_pred"] = pred.tolist()
    model.train()
    return res


def evaluate_yesno(
    model: str | None,
    data_dir: str,
    cfg: YesNoConfig | None = None,
    tokenizer: str | None = None,
    progress: bool = False,
) -> dict:
    """Fine-tune over cfg.seeds seeds (or only the baseline when model is None); return the report."""
    cfg = cfg or YesNoConfig()
    t0 = time.time()
    data, labels = load_task(data_dir)
    subset = None
    if cfg.max_train and cfg.max_train < len(data["train"]):
        data["train"] = stratified_subset(data["train"], cfg.max_train, cfg.subset_seed)
        counts = [str(r["label"]) for r in data["train"]]
        subset = {
            "n": len(data["train"]),
            "seed": cfg.subset_seed,
            "stratified_by": "label",
            "label_counts": {lab: counts.count(lab) for lab in labels},
        }
    test_gold = [str(r["label"]) for r in data["test"]]
    baseline = stats.majority_baseline([str(r["label"]) for r in data["train"]], test_gold, labels)
    report = {
        "task": str(data_dir),
        "labels": labels,
        "files": {s: split_path(data_dir, s).name for s in SPLITS},
        "train_subset": subset,
        "sizes": {s: len(data[s]) for s in SPLITS},
        "test_label_counts": {lab: test_gold.count(lab) for lab in labels},
        "majority_baseline": baseline,
        "config": cfg.__dict__,
    }
    if model is None:
        return report
    from kdcl_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer or model)
    label_ids = {lab: i for i, lab in enumerate(labels)}
    enc = {s: _encode(tok, data[s], label_ids, cfg.max_length) for s in SPLITS}
    runs = [finetune_one(model, tok, enc, labels, cfg, seed, progress) for seed in range(cfg.seeds)]
    gold = np.array([y for _, y in enc["test"]])
    correct = np.array([np.asarray(r["test_pred"]) == gold for r in runs], dtype=np.float64)
    acc_mean, acc_std = stats.mean_std([r["test_accuracy"] for r in runs])
    f1_mean, f1_std = stats.mean_std([r["test_macro_f1"] for r in runs])
    boot = stats.ratio_bootstrap(correct, n_boot=cfg.n_boot, seed=0)
    report.update(
        {
            "model": str(model),
            "seeds": cfg.seeds,
            "accuracy": {
                "mean": acc_mean,
                "std": acc_std,
                "ci95": boot["ci"],
                "ci_method": "two-level percentile bootstrap over test questions and seeds (pooled)",
            },
            "macro_f1": {"mean": f1_mean, "std": f1_std},
            "dev_accuracy_mean": stats.mean_std([r["dev_accuracy"] for r in runs])[0],
            "per_seed": runs,
            "test_gold": gold.tolist(),
            "seconds": round(time.time() - t0, 1),
        }
    )
    return report


def format_report(r: dict) -> str:
    b = r["majority_baseline"]
    lines = [
        f"task {r['task']}: labels {r['labels']}, sizes {r['sizes']}, test {r['test_label_counts']}"
    ]
    if r.get("train_subset"):
        t = r["train_subset"]
        lines.append(
            f"train: stratified subset of {t['n']} (seed {t['seed']}): {t['label_counts']}"
        )
    lines.append(
        f"majority baseline (train majority '{b['label']}'): accuracy {100 * b['accuracy']:.1f}%  "
        f"macro-F1 {100 * b['macro_f1']:.1f}%"
    )
    if "accuracy" in r:
        a, f = r["accuracy"], r["macro_f1"]
        lines.append(
            f"{r['model']} over {r['seeds']} seeds: accuracy {100 * a['mean']:.1f}% ± {100 * a['std']:.1f} "
            f"(95% CI {100 * a['ci95'][0]:.1f}–{100 * a['ci95'][1]:.1f})  macro-F1 {100 * f['mean']:.1f}% "
            f"± {100 * f['std']:.1f}  [{r['seconds']}s]"
        )
        lines.append(
            "per seed accuracy: "
            + ", ".join(f"{100 * s['test_accuracy']:.1f}" for s in r["per_seed"])
        )
        maj = r["labels"].index(b["label"])
        share = np.mean([np.mean(np.asarray(s["test_pred"]) == maj) for s in r["per_seed"]])
        lines.append(f"predicts the majority label for {100 * share:.1f}% of test questions")
    return "\n".join(lines)


def run(args) -> int:
    from kdcl_dist.utils import check_output_path, write_json_atomic

    if args.out:  # before any fine-tuning
        check_output_path(args.out, "file")
    cfg = resolve_args(args)
    if not args.model and not args.baseline_only:
        raise UserError(
            "--model is required (or pass --baseline-only for the majority baseline alone)"
        )
    r = evaluate_yesno(
        None if args.baseline_only else args.model, args.data, cfg, args.tokenizer, args.progress
    )
    print(format_report(r))
    if args.out:
        write_json_atomic(args.out, r)
        print(f"wrote {args.out}")
    return 0
