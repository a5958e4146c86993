"""`bench train`, section "batching": padded vs length-grouped micro-batches on real abstracts.

The real abstracts ($KDCL_DATA_DIR/pubmed/abstracts.jsonl; a synthetic corpus, labelled, when
absent) are tokenized with a WordPiece vocabulary trained on them (bert-base size, 28,996) and
truncated at --max-length. The order is a random permutation (a curriculum orders by score,
which is not length). Global batches of --global-batch samples are split by the training
sampler itself (`CurriculumSampler`, world size 1) into micro-batches of --micro-batch, once
`padded` (contiguous blocks of the order) and once `length-grouped` (sorted by length), and
padded with the training collate. Printed side by side, from one run:

1. real ÷ computed tokens of each split over every global batch of the corpus;
2. time of one optimizer step over one global batch (every micro-batch forward/backward, one
   AdamW step), student-only and KD, for each split: the four variants (each with its own copy
   of the student) interleaved micro-batch by micro-batch, so that a shared machine's changing
   load hits them alike; the median over the timed batches of the padded ÷ length-grouped time
   ratio next to its FLOP prediction (FLOPs computed with padding, padded ÷ grouped: the LM
   heads run on the masked rows only, which padding does not change), and real tokens/s;
3. model FLOPs per second of each (real tokens only, kdcl_dist/bench/flops.py) and, on a GPU
   with a known peak, MFU.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _docs(limit: int):
    """Abstracts (0: all) or 4,000 synthetic documents when none, with the corpus label."""
    from kdcl_dist.bench import pubmed_or_synthetic

    docs, path = pubmed_or_synthetic(limit or None, limit or 4000)
    if path is not None:
        return docs, f"real PubMed abstracts ({path})"
    return docs, "SYNTHETIC corpus (no real data found)"


def prepare(args, root: Path):
    """(token ids by document id, document ids in order, MaskSpec, vocab size, pad id, corpus label)."""
    from kdcl_dist.data.masking import MaskSpec
    from kdcl_dist.data.tokenizer import train_wordpiece

    docs, label = _docs(args.docs)
    tok = train_wordpiece((t for _, t in docs), root / "tok", vocab_size=args.vocab)
    enc = tok(
        [t for _, t in docs], add_special_tokens=True, truncation=True, max_length=args.max_length
    )["input_ids"]
    ids = [np.asarray(x, dtype=np.int64) for x in enc]
    ids_of = {doc_id: a for (doc_id, _), a in zip(docs, ids)}
    perm = np.random.default_rng(0).permutation(len(ids))
    spec = MaskSpec.from_tokenizer(tok)
    return ids_of, [docs[i][0] for i in perm], spec, len(tok), int(tok.pad_token_id), label


def splits(n: int, args, lengths: np.ndarray) -> dict:
    from kdcl_dist.curriculum.order import OrderSpec
    from kdcl_dist.curriculum.sampler import CurriculumSampler

    spec = OrderSpec("sequential")
    return {
        b: CurriculumSampler(
            n,
            args.global_batch,
            args.micro_batch,
            1,
            0,
            spec,
            batching=b,
            lengths=lengths if b == "length-grouped" else None,
        )
        for b in ("padded", "length-grouped")
    }


def token_ratio(sampler, lengths: np.ndarray, steps: int) -> tuple[int, int]:
    real = computed = 0
    for t in range(steps):
        for mb in sampler.rank_micro_batches(t):
            real += int(lengths[mb].sum())
            computed += len(mb) * int(lengths[mb].max())
    return real, computed


def micro_batches(sampler, t: int, order_ids, ids_of, mspec, pad_id: int):
    from kdcl_dist.curriculum.sampler import collate
    from kdcl_dist.data.masking import mask_sample

    out = []
    for mb in sampler.rank_micro_batches(t):
        items = []
        for p in mb.tolist():
            doc = order_ids[p]
            x, y = mask_sample(ids_of[doc], doc, draw=0, purpose="train", seed=0, spec=mspec)
            items.append({"position": p, "input_ids": x, "labels": y, "score": 0.0})
        out.append(collate(items, pad_id))
    return out


class GlobalStep:
    """One optimizer step over a global batch's micro-batches (masked-only LM heads, the loss
    normalised by the global masked count, as kd/engine.py does)."""

    def __init__(self, teacher, student, device, dtype, temperature: float):
        import torch

        from kdcl_dist.kd.models import mlm_parts

        self.torch, self.device, self.tau = torch, device, temperature
        self.t_enc, self.t_head = mlm_parts(teacher)
        self.s_enc, self.s_head = mlm_parts(student)
        self.opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        self.autocast = (
            torch.autocast("cuda", dtype=dtype)
            if device.type == "cuda" and dtype != torch.float32
            else torch.autocast("cpu", enabled=False)
        )

    def _rows(self, enc, head, ids, attn, flat):
        h = enc(input_ids=ids, attention_mask=attn)[0]
        return head(h.reshape(-1, h.shape[-1]).index_select(0, flat))

    def micro(self, mb, kd: bool, n: float) -> None:
        """Forward/backward of one micro-batch; `n`: the global batch's masked-token count."""
        torch = self.torch
        from kdcl_dist.kd import losses

        ids = mb["input_ids"].to(self.device, non_blocking=True)
        attn = mb["attention_mask"].to(self.device, non_blocking=True)
        lab = mb["labels"].reshape(-1)
        flat_cpu = torch.nonzero(lab != -100).squeeze(1)
        flat = flat_cpu.to(self.device, non_blocking=True)
        labels = lab.index_select(0, flat_cpu).to(self.device, non_blocking=True)
        if kd:
            with torch.inference_mode():
                t_logits = self._rows(self.t_enc, self.t_head, ids, attn, flat)
            t_logits = t_logits.float().clone()
        with self.autocast:
            s_logits = self._rows(self.s_enc, self.s_head, ids, attn, flat)
        if kd:
            loss = losses.masked_kd_losses(s_logits, t_logits, labels, 0.5, self.tau, n)["loss"]
        else:
            loss = torch.nn.functional.cross_entropy(s_logits.float(), labels, reduction="sum") / n
        loss.backward()
        self.sync()

    def update(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def run_batching(args, preset: dict, device, dtype, build_models) -> dict:
    import torch

    from kdcl_dist.bench import flops as fl

    with tempfile.TemporaryDirectory(prefix="kdcl-bench-batching-") as tmp:
        ids_of, order_ids, mspec, vocab, pad_id, label = prepare(args, Path(tmp))
    n = len(order_ids)
    lengths = np.array([len(ids_of[d]) for d in order_ids], dtype=np.int64)
    samplers = splits(n, args, lengths)
    steps = n // args.global_batch
    ratio = {b: token_ratio(s, lengths, steps) for b, s in samplers.items()}

    res = {
        "corpus": label,
        "samples": n,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "max_length": args.max_length,
        "vocab": vocab,
        "mean_length": float(lengths.mean()),
        "at_max_length": float((lengths == args.max_length).mean()),
        "real_over_computed": {b: r / c for b, (r, c) in ratio.items()},
        "timed_steps": args.batching_steps,
    }
    print()
    print(
        f"  batching ({label}): {n} samples, mean {lengths.mean():.0f} tokens, "
        f"{100 * res['at_max_length']:.1f}% at max length {args.max_length}; global batch "
        f"{args.global_batch}, micro-batch {args.micro_batch}, vocab {vocab}"
    )
    print(f"  {'':22s}{'real/computed':>15s}  (over {steps} global batches: real ÷ padded tokens)")
    for b in samplers:
        print(f"  {b:22s}{res['real_over_computed'][b]:15.3f}")
    if args.batching_steps < 1:  # the token ratio only
        return res

    import copy

    preset = {**preset, "vocab": vocab}
    teacher, student = build_models(preset)
    teacher = teacher.to(device=device, dtype=dtype if device.type == "cuda" else torch.float32)
    teacher.eval().requires_grad_(False)
    student = student.to(device).train()
    variants = [(v, b) for v in ("student", "kd") for b in samplers]
    # one student (and optimizer) per variant, so the four can be interleaved micro-batch by
    # micro-batch: load changes on a shared machine then hit every variant alike
    steppers = {
        k: GlobalStep(teacher, copy.deepcopy(student), device, dtype, args.temperature)
        for k in variants
    }
    timed = list(range(args.batching_warmup + args.batching_steps))
    times = {k: [] for k in variants}
    work = {}
    for t in timed:
        batches = {
            b: micro_batches(s, t, order_ids, ids_of, mspec, pad_id) for b, s in samplers.items()
        }
        pos = samplers["padded"].global_positions(t)
        rows = sum(int((mb["labels"] != -100).sum()) for mb in batches["padded"])
        # computed lengths: every sample of a micro-batch runs at the micro-batch's length
        padded_to = {
            b: [mb["input_ids"].shape[1] for mb in batches[b] for _ in range(len(mb["positions"]))]
            for b in samplers
        }
        work[t] = (int(lengths[pos].sum()), lengths[pos].tolist(), rows, padded_to)
        spent = dict.fromkeys(variants, 0.0)
        for j in range(len(batches["padded"])):
            for v, b in variants:
                t0 = time.perf_counter()
                steppers[(v, b)].micro(batches[b][j], v == "kd", float(rows))
                spent[(v, b)] += time.perf_counter() - t0
        for k in variants:
            t0 = time.perf_counter()
            steppers[k].update()
            spent[k] += time.perf_counter() - t0
        if t >= args.batching_warmup:
            for k in variants:
                times[k].append((t, spent[k]))
    peak, peak_src = fl.peak_flops(device)
    res["peak"] = peak_src
    print(
        f"  {'step (median of ' + str(args.batching_steps) + ')':30s}{'padded s':>10s}{'grouped s':>11s}"
        f"{'speed-up':>10s}{'FLOP-pred.':>11s}{'grouped tok/s':>15s}   model FLOP rate (padded | grouped)"
    )
    for v in ("student", "kd"):
        ts = [t for t, _ in times[(v, "padded")]]
        sp = [x for _, x in times[(v, "padded")]]
        sg = [x for _, x in times[(v, "length-grouped")]]
        speed = statistics.median(a / b for a, b in zip(sp, sg))
        real = sum(work[t][0] for t in ts)
        fsum = sum(
            fl.step_flops(
                preset["teacher"] if v == "kd" else None,
                preset["student"],
                vocab,
                work[t][1],
                work[t][2],
            )
            for t in ts
        )
        # FLOPs the hardware computes (padding included): their ratio predicts the speed-up;
        # the LM heads run on the masked rows only, which padding does not change
        hw = {
            b: sum(
                fl.step_flops(
                    preset["teacher"] if v == "kd" else None,
                    preset["student"],
                    vocab,
                    work[t][3][b],
                    work[t][2],
                )
                for t in ts
            )
            for b in samplers
        }
        predicted = hw["padded"] / hw["length-grouped"]
        tp, tg = sum(sp), sum(sg)
        name = "KD" if v == "kd" else "student-only"
        print(
            f"  {name:30s}{statistics.median(sp):10.3f}{statistics.median(sg):11.3f}{speed:9.2f}x"
            f"{predicted:10.2f}x{real / tg:15.0f}   {fl.rate_text(fsum, tp, peak)} | {fl.rate_text(fsum, tg, peak)}"
        )
        res[v] = {
            "padded_s": sp,
            "grouped_s": sg,
            "speedup": speed,
            "flop_predicted_speedup": predicted,
            "grouped_tokens_per_s": real / tg,
            "padded_tokens_per_s": real / tp,
            "model_flops": fsum,
            "padded_flops_per_s": fsum / tp,
            "grouped_flops_per_s": fsum / tg,
            "grouped_mfu": None if peak is None else fsum / tg / peak,
        }
    ok = res["real_over_computed"]["length-grouped"] >= 0.95 and res["kd"]["speedup"] >= 1.4
    print(
        f"  targets (real/computed >= 0.95, KD speed-up >= 1.4x): {'met' if ok else 'NOT met'}"
        f"   [{peak_src}]"
    )
    res["targets_met"] = ok
    return res


def add_arguments(p) -> None:
    p.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="skip the padded vs length-grouped section on real abstracts",
    )
    p.add_argument(
        "--global-batch", type=int, default=256, help="batching: samples per step (default 256)"
    )
    p.add_argument(
        "--micro-batch", type=int, default=8, help="batching: samples per micro-batch (default 8)"
    )
    p.add_argument(
        "--max-length", type=int, default=512, help="batching: truncation length (default 512)"
    )
    p.add_argument(
        "--docs", type=int, default=0, help="batching: abstracts to read (default 0: all)"
    )
    p.add_argument(
        "--vocab", type=int, default=28996, help="batching: WordPiece size (default bert-base's)"
    )
    p.add_argument(
        "--batching-steps",
        type=int,
        default=2,
        help="batching: timed global batches per split (default 2)",
    )
    p.add_argument(
        "--batching-warmup", type=int, default=0, help="batching: untimed global batches first"
    )
