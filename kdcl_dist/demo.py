"""The whole pipeline on the embedded default, on CPU, in a few minutes (`kdcl-dist demo`, `make demo`).

Steps (each a `kdcl-dist` stage in a subprocess, skipped on re-run when its output exists):
corpus split (held-out documents by id hash) -> tokenizer -> init-models (preset tiny) ->
shard -> score (2 ranks) -> curriculum -> adapt the teacher (student-only MLM of the teacher)
-> warm up the student -> score with the warmed student (2 ranks) -> curriculum ->
KD-CL-SR training (sr-paper λ, easy->hard order) on 2 local ranks (torchrun, gloo) -> export
-> held-out MLM evaluation of the student before/after and of the teacher -> report.md.

Corpus: `--corpus FILE`, else the real abstracts at $KDCL_DATA_DIR/pubmed/abstracts.jsonl
(the first --max-docs), else the project's SYNTHETIC corpus (kdcl_dist.data.synthetic),
which the output says loudly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from kdcl_dist.config import option
from kdcl_dist.errors import UserError

BANNER = "=" * 78


@dataclass
class DemoConfig:
    max_docs: int = option(2000, help="documents of the real corpus to use (0: all)", min=0)
    synthetic_docs: int = option(2000, help="documents generated when no corpus exists", min=100)
    steps: int = option(60, help="KD-CL-SR training steps", min=1)
    teacher: str = option(
        "",
        help="pretrained teacher (directory, hub name, pkg:PACKAGE or minilm; with --student); "
        "unset: random-init tiny models and a tokenizer trained on the corpus",
    )
    student: str = option(
        "",
        help="pretrained student with the teacher's vocabulary (its tokenizer builds the shards)",
    )
    teacher_steps: int | None = option(
        None,
        help="teacher adaptation steps (unset: 100 with random-init models, 0 with pretrained ones)",
        min=0,
    )
    warmup_student_steps: int | None = option(
        None,
        help="student warm-up steps (unset: 30 with random-init models, 0 with pretrained ones)",
        min=0,
    )
    nproc: int = option(2, help="ranks for scoring and KD-CL-SR training", min=1)
    reliance: str = option(
        "sr-paper",
        help="λ schedule of the KD-CL-SR run",
        choices=("sr-paper", "sr-sample", "sr-minmax", "sr-rank"),
    )
    heldout_percent: int = option(
        5, help="percent of documents held out for the MLM evaluation", min=1, max=50
    )
    max_length: int = option(
        128,
        help="tokens per sample (abstracts are truncated; halves the demo's time vs 256)",
        min=16,
    )


def pick_corpus(out: Path, corpus: str | None, cfg: DemoConfig) -> tuple[Path, str]:
    """(corpus file, description); writes the synthetic corpus when nothing else exists."""
    from kdcl_dist.utils import atomic_path, data_dir

    if corpus:
        p = Path(corpus)
        if not p.exists():
            raise UserError(
                f"{p}: corpus not found; pass a jsonl file with id and text, or omit --corpus"
            )
        return p, f"user corpus {p}"
    d = data_dir()
    if d is not None and (d / "pubmed" / "abstracts.jsonl").exists():
        p = d / "pubmed" / "abstracts.jsonl"
        n = f"first {cfg.max_docs} of " if cfg.max_docs else ""
        return p, f"REAL corpus: {n}{p} (PubMed abstracts)"
    from kdcl_dist.data.synthetic import synthetic_documents

    p = out / "data" / "synthetic.jsonl"
    if not p.exists():
        with atomic_path(p) as tmp, open(tmp, "w") as f:
            for doc_id, text in synthetic_documents(cfg.synthetic_docs):
                f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return p, (
        f"SYNTHETIC corpus ({cfg.synthetic_docs} generated documents, kdcl_dist.data.synthetic): no real "
        "corpus found at $KDCL_DATA_DIR/pubmed/abstracts.jsonl — figures below are NOT about real text"
    )


def run_demo(out: str | Path, corpus: str | None, cfg: DemoConfig, progress: bool = True) -> Path:
    from kdcl_dist.experiment import Experiment, ExperimentConfig, torchrun_cli

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus_path, desc = pick_corpus(out, corpus, cfg)
    synthetic = desc.startswith("SYNTHETIC")
    print(BANNER)
    print(f"kdcl-dist demo -> {out}")
    print(f"corpus: {desc}")
    if synthetic:
        print("*** SYNTHETIC DATA ***  set KDCL_DATA_DIR or pass --corpus for real text")
    print(BANNER)
    pretrained = bool(cfg.teacher or cfg.student)
    ecfg = ExperimentConfig(
        seeds=1,
        steps=cfg.steps,
        arms=["kd-cl-sr-paper"],
        heldout_percent=cfg.heldout_percent,
        max_docs=0 if synthetic or corpus else cfg.max_docs,
        teacher=cfg.teacher,
        student=cfg.student,
        teacher_steps=cfg.teacher_steps if cfg.teacher_steps is not None or pretrained else 100,
        warmup_student_steps=(
            cfg.warmup_student_steps if cfg.warmup_student_steps is not None or pretrained else 30
        ),
        nproc=cfg.nproc,
        parallel=1,
        global_batch=32,
        micro_batch=8,
        eval_masks=1,
        max_length=cfg.max_length,
    )
    exp = Experiment(corpus_path, out, ecfg, preset="tiny", progress=progress)
    prep = exp.prepare()
    # the KD-CL-SR run itself, on nproc local ranks
    run = out / "kd-cl-sr"
    r = exp.r
    exp.train_then_export(
        (f"train/kd-cl-sr ({cfg.nproc} ranks)", "export/kd-cl-sr"),
        exp.train_args(
            exp.p["cur"],
            prep["student"],
            prep["teacher"],
            run,
            "sequential",
            cfg.reliance,
            cfg.steps,
            0,
        )
        + ["--save-every", max(1, cfg.steps // 2)],
        run,
        out / "student-kd-cl-sr",
        torchrun_cli(cfg.nproc),
    )
    start = "pretrained" if prep["pretrained"] else "random init"
    # (key, label, model); a stage that did not run adds no second row for the same model
    rows = [("student-init", f"student ({start})", prep["student_init"])]
    if prep["warmup_steps"]:
        rows.append(("student-before", "student before KD (warmed up)", prep["student"]))
    rows += [
        ("student-after", "student after KD-CL-SR", out / "student-kd-cl-sr"),
        ("teacher-init", f"teacher ({start})", prep["teacher_init"]),
    ]
    if prep["teacher_steps"]:
        rows.append(("teacher-adapted", "teacher (domain-adapted)", prep["teacher"]))
    results = {}
    for key, label, model in rows:
        path = exp.eval_mlm(key, model, in_process=True)
        results[label] = json.loads(path.read_text())
    wall = time.time() - t0
    report = write_demo_report(out, desc, prep, results, cfg, wall, synthetic)
    print()
    print(r.summary())
    print()
    print(f"{'model':<34} {'held-out MLM loss':>18} {'perplexity':>11}")
    for label, res in results.items():
        print(f"{label:<34} {res['loss']:>18.4f} {res['perplexity']:>11.2f}")
    print(BANNER)
    if synthetic:
        print("*** these numbers are on the SYNTHETIC corpus ***")
    print(f"finished in {wall / 60:.1f} min. Outputs:")
    print(f"  report            {report}")
    print(f"  TensorBoard logs  {run / 'tensorboard'}   (tensorboard --logdir {out})")
    print(f"  metrics           {run / 'metrics.jsonl'}")
    print(f"  curriculum plot   {exp.p['cur'] / 'curriculum.png'}")
    print(f"  exported student  {out / 'student-kd-cl-sr'}")
    print(f"  step logs         {out / 'logs'}")
    print(BANNER)
    return report


def write_demo_report(
    out: Path, desc: str, prep: dict, results: dict, cfg: DemoConfig, wall: float, synthetic: bool
) -> Path:
    from kdcl_dist.experiment import _prep_text, read_metrics
    from kdcl_dist.utils import atomic_path

    m = read_metrics(out / "kd-cl-sr" / "metrics.jsonl")
    L = ["# kdcl-dist demo report", ""]
    if synthetic:
        L += ["**SYNTHETIC corpus** — generated text, not real abstracts.", ""]
    L += [
        f"Corpus: {desc}. Held-out documents: {prep['split']['heldout']} "
        f"({cfg.heldout_percent}% by id hash), training documents: {prep['split']['train']}.",
        "",
        f"KD-CL-SR run: {cfg.steps} steps, reliance {cfg.reliance}, easy→hard order, {cfg.nproc} ranks "
        f"({_prep_text(prep)}) Wall time {wall / 60:.1f} min.",
        "",
        f"Models: {prep['models']}.",
        "",
        "| model | held-out MLM loss | perplexity | masked tokens |",
        "|---|---|---|---|",
    ]
    for label, r in results.items():
        L.append(f"| {label} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['masked_tokens']} |")
    if m:
        first, last = m[0], m[-1]
        lams = [r.get("lambda") or 0.0 for r in m]
        L += [
            "",
            f"Training loss {first.get('loss', float('nan')):.3f} (step {first['step']}) → "
            f"{last.get('loss', float('nan')):.3f} (step {last['step']}); λ per step: first {lams[0]:.3f}, "
            f"mean {sum(lams) / len(lams):.3f}, max {max(lams):.3f}, last {lams[-1]:.3f} "
            "(a run longer than one epoch starts again at the easiest batches, where λ is 0).",
            "",
        ]
    L += [
        "Outputs: `kd-cl-sr/tensorboard/` (TensorBoard), `kd-cl-sr/metrics.jsonl`, `cur/curriculum.png`, "
        "`student-kd-cl-sr/` (HF model), `evals/*.mlm.json`, `logs/` (one log per step)."
    ]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(L) + "\n")
    return path
