"""The paper's study at an equal sample budget, with seeds and statistics (`kdcl-dist experiment`).

Pipeline (every step is a `kdcl-dist` stage run as a subprocess; a step whose output exists is
skipped, so a killed experiment is resumed by re-running the same command):

  1. split the corpus by document id: held-out documents (`evaluate.mlm.is_heldout`, default 5%)
     go to `data/heldout.jsonl`, the rest to `data/train.jsonl`. Nothing held out is ever seen
     by the tokenizer, the scorer or any training run.
  2. tokenizer -> init-models (preset) -> shard (train and held-out corpora separately)
  3. score (initial student) -> curriculum `cur0`: used only for the runs below that read the
     data in random order (they need a curriculum directory, not its order)
  4. adapt the teacher: student-only MLM training of the teacher model on the corpus
     (reliance none, random order), as BioBERT was adapted from BERT -> export
  5. warm up the student: student-only MLM for a few steps (a stand-in for the student's
     general pre-training: a randomly initialised student gives every abstract the same score,
     ln V, and the curriculum would be noise) -> export
  6. score with the warmed student -> curriculum `cur`: the order every arm uses
  7. per arm and seed: train (same steps x global batch = same number of samples for every
     arm) -> export -> eval mlm on the held-out corpus (same fixed masks for every model)
     [-> eval yesno with --yesno]
  8. report.md: tables with 95% CIs, paired comparisons with Holm-corrected p-values,
     loss-curve and λ-schedule plots (from each run's metrics.jsonl), and a plain statement of
     which differences are significant.

Pretrained models (`--teacher/--student`, or a preset whose `models.teacher` is a pretrained
reference: minilm, paper; `Experiment.resolve_models`): step 2 shards with the student's
tokenizer (no tokenizer, no random init; a `{from_teacher: true}` student is built by one
`init-models --preset P` step), steps 4-5 default to 0 steps (a headless checkpoint must run
them: `check_heads`), step 3 runs only when a preparation run does, and step 6 scores the
pretrained (or warmed) student. A pair with different vocabularies is refused before any work.

Launchers (`--launcher`, kdcl_dist/cluster.py): every training and scoring step starts its ranks
through one of the tested scripts in kdcl_dist/launcher (torchrun on this machine, deepspeed over a
hostfile, one Slurm job per step, mpirun); concurrent runs on one machine hold disjoint GPUs.
`--plan FILE` (kdcl_dist/plan.py) runs this same step sequence with a recorder instead of the Runner
and writes it as a bash script plus a Slurm submit script (docs/cluster.md).

What a seed varies: the training seed (order for random/pacing arms, training masks, dropout).
The starting student, the adapted teacher and the curriculum are shared by all arms: they are
the fixed starting point the paper's arms share too (pretrained DistilBERT and BioBERT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcl_dist.cluster import DS_NODES, LAUNCHERS, GpuSlots, Launch, partition_gpus, visible_gpus
from kdcl_dist.config import option
from kdcl_dist.errors import UserError

# name -> training settings. "teacher": whether the adapted teacher is passed.
ARMS: dict[str, dict] = {
    "student-only": {
        "order": "random",
        "reliance": "none",
        "teacher": False,
        "label": "student only (continued MLM, no teacher)",
    },
    "kd": {
        "order": "random",
        "reliance": "constant",
        "teacher": True,
        "label": "KD (random order, constant λ)",
    },
    "kd-cl": {
        "order": "sequential",
        "reliance": "constant",
        "teacher": True,
        "label": "KD-CL (easy→hard, constant λ)",
    },
    "kd-cl-sr-paper": {
        "order": "sequential",
        "reliance": "sr-paper",
        "teacher": True,
        "label": "KD-CL-SR (batch λ, paper formula)",
    },
    "kd-cl-sr-sample": {
        "order": "sequential",
        "reliance": "sr-sample",
        "teacher": True,
        "label": "KD-CL-SR (per-sample λ)",
    },
    # constant λ = the mean λ of kd-cl-sr-paper over the same steps: against kd-cl-sr-paper it
    # isolates the effect of *selecting* (where the teacher is used) from the amount of teacher
    "kd-cl-matched": {
        "order": "sequential",
        "reliance": "constant",
        "teacher": True,
        "lambda_from": "kd-cl-sr-paper",
        "label": "KD-CL, constant λ = SR (paper)'s mean λ",
    },
    "kd-cl-sr-rank": {
        "order": "sequential",
        "reliance": "sr-rank",
        "teacher": True,
        "label": "KD-CL-SR variant: λ rises with curriculum rank",
    },
    "kd-reverse": {
        "order": "reverse",
        "reliance": "constant",
        "teacher": True,
        "label": "KD, reverse curriculum (hard→easy)",
    },
    "kd-pacing-root": {
        "order": "pacing-root",
        "reliance": "constant",
        "teacher": True,
        "label": "KD, root pacing (pool grows from the easiest 20%)",
    },
}
BASELINE_ARM = "kd"
ALPHA = 0.05  # family-wise, Holm over every comparison of a report
# (A, B): report A - B. Each arm against plain KD, SR against CL alone, and SR against the
# constant λ matched to its mean (selecting vs the amount of teacher).
EXTRA_COMPARISONS = [
    ("kd-cl-sr-paper", "kd-cl"),
    ("kd-cl-sr-sample", "kd-cl"),
    ("kd-cl-sr-rank", "kd-cl"),
    ("kd-cl-sr-paper", "kd-cl-matched"),
    ("kd", "student-only"),
]


@dataclass
class ExperimentConfig:
    seeds: int = option(3, help="seeds per arm", min=1)
    steps: int = option(
        0, help="optimizer steps per arm (0: one epoch of the training corpus)", min=0
    )
    arms: list[str] = option(
        default_factory=lambda: list(ARMS), help="arms to run", choices=tuple(ARMS)
    )
    heldout_percent: int = option(
        5, help="percent of documents held out for MLM evaluation", min=1, max=50
    )
    max_docs: int = option(0, help="use the first N documents of the corpus (0: all)", min=0)
    teacher: str = option(
        "",
        help="pretrained teacher (directory, hub name, pkg:PACKAGE or minilm); unset: the "
        "preset's models.teacher when it names a pretrained model, else a random-init tiny teacher",
    )
    student: str = option(
        "",
        help="pretrained student (same vocabulary as the teacher; its tokenizer builds the shards); "
        "unset: the preset's models.student",
    )
    tokenizer: str = option(
        "",
        help="a trained tokenizer directory for random-init models, used instead of training one "
        "on the corpus: HF's WordPiece trainer breaks ties in hash order, so two trainings on one "
        "corpus can differ (huggingface/tokenizers#1794); pass an earlier run's tokenizer to make "
        "two experiments comparable (unset: trained here; pretrained models use the student's)",
    )
    teacher_steps: int | None = option(
        None,
        help="teacher adaptation steps (unset: same as --steps with random-init models, "
        "0 with pretrained ones; 0: none)",
        min=0,
    )
    warmup_student_steps: int | None = option(
        None,
        help="student warm-up steps (unset: a quarter of --steps with random-init models, "
        "0 with pretrained ones; 0: none)",
        min=0,
    )
    global_batch: int = option(32, help="samples per optimizer step of every training run", min=1)
    micro_batch: int = option(16, help="samples per forward on one rank", min=1)
    lr: float | None = option(
        None,
        help="peak learning rate of every training run (unset: the preset's train.lr, e.g. "
        "5e-5 for paper, 1e-4 for minilm, 5e-4 for tiny)",
        min=0.0,
    )
    lambda_: float = option(0.5, help="λ of the constant arms (the paper: 0.5)", min=0.0, max=1.0)
    teacher_cache: str = option(
        "off",
        help="auto: run the teacher once (`kdcl-dist teacher-cache`, sampled sparse targets) and "
        "train every KD arm from that cache, all arms and seeds on the same masks; off (default: "
        "on the tiny preset the cached KD arm measured 0.0125 nats worse, docs/benchmarks.md): "
        "every KD run computes the live teacher (masks from the training seed)",
        choices=("auto", "off"),
    )
    nproc: int = option(
        1, help="ranks per node of each training and scoring run (one per GPU; gloo on CPU)", min=1
    )
    parallel: int = option(
        1,
        help="runs executed at the same time (on one machine each gets its own nproc GPUs "
        "of CUDA_VISIBLE_DEVICES)",
        min=1,
    )
    launcher: str = option(
        "torchrun",
        help="how training and scoring steps start their ranks: torchrun (this machine), deepspeed "
        "(--hostfile), slurm (each step an sbatch job), mpirun (docs/cluster.md)",
        choices=LAUNCHERS,
    )
    hostfile: str = option(
        "", help="deepspeed/mpirun hostfile, lines '<host> slots=<n>' (launcher/hostfile.example)"
    )
    nnodes: int = option(
        1, help="nodes per training and scoring run (deepspeed, slurm, mpirun)", min=1
    )
    deepspeed_nodes: str = option(
        "pdsh",
        help="deepspeed: pdsh (ssh into the hostfile's hosts) or here (every node's launcher "
        "started on this machine: a multi-node job on one machine)",
        choices=DS_NODES,
    )
    master_addr: str = option(
        "", help="deepspeed/mpirun: rendezvous address of node 0 (default: found by the launcher)"
    )
    slurm_args: str = option(
        "",
        help="extra sbatch options of every Slurm job, one string, e.g. "
        "'--partition=gpu --gpus-per-node=8 --time=12:00:00'",
    )
    eval_masks: int = option(2, help="fixed masks per held-out sample", min=1)
    max_length: int = option(
        0, help="tokens per sample when sharding (0: the preset's shard.max_length)", min=0
    )
    yesno: bool = option(False, help="also fine-tune every run on the yes/no task (slow)")
    yesno_data: str = option("", help="BLURB-format task dir (default $KDCL_DATA_DIR/bioasq)")
    yesno_seeds: int = option(3, help="fine-tuning seeds per trained model", min=1)
    yesno_arms: list[str] = option(
        default_factory=list,
        help="arms whose runs are fine-tuned on yes/no (unset: every arm); each fine-tuning costs "
        "minutes on a CPU, so a CPU study may fine-tune only the arms it compares",
        choices=tuple(ARMS),
    )
    yesno_reference_seeds: int = option(
        0,
        help="fine-tuning seeds of the starting teacher and student (0: yesno_seeds); they are one "
        "model each, so their fine-tuning seeds are their only spread",
        min=0,
    )
    n_boot: int = option(10000, help="bootstrap replicates for the confidence intervals", min=100)


# --------------------------------------------------------------------------------------
# a small step runner shared by the experiment and the demo
# --------------------------------------------------------------------------------------


def python_cli() -> list[str]:
    return [sys.executable, "-m", "kdcl_dist"]


def torchrun_cli(nproc: int) -> list[str]:
    if nproc <= 1:
        return python_cli()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "kdcl_dist",
    ]


# the stages that take --progress/--no-progress (`eval`: both eval mlm and eval yesno)
PROGRESS_STAGES = frozenset(
    {
        "tokenizer",
        "init-models",
        "shard",
        "score",
        "curriculum",
        "teacher-cache",
        "train",
        "export",
        "eval",
    }
)


def stage_argv(argv: list, progress: bool = True) -> list:
    """A step's `kdcl-dist` arguments; with `progress` off (experiment/demo --no-progress),
    `--no-progress` added for a stage that takes it (once)."""
    argv = list(argv)
    if not progress and argv and str(argv[0]) in PROGRESS_STAGES and "--no-progress" not in argv:
        argv.append("--no-progress")
    return argv


class Runner:
    """Runs stage commands as subprocesses; a step is skipped when its `done` file exists.

    Each step's output goes to `<root>/logs/<name>.log`; a record per step is appended to
    `<root>/steps.jsonl` and kept in `self.records` for the summary.
    """

    def __init__(self, root: Path, concurrent: int = 1, echo: bool = True):
        self.root = Path(root)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.concurrent = concurrent
        self.echo = echo
        self.progress = True  # False: every step that takes it gets --no-progress (stage_argv)
        self._lock = threading.Lock()

    def env(self, nproc: int = 1) -> dict:
        # one core per process when several share the machine; a lone process may use them all
        threads = max(1, (os.cpu_count() or 1) // max(1, self.concurrent * nproc))
        e = dict(os.environ)
        e.setdefault("OMP_NUM_THREADS", str(threads))
        e.setdefault("TOKENIZERS_PARALLELISM", "false")
        e.setdefault("HF_HUB_OFFLINE", "1")
        e.setdefault("TRANSFORMERS_OFFLINE", "1")
        return e

    def _say(self, text: str) -> None:
        if self.echo:
            with self._lock:
                print(text, flush=True)

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name.replace('/', '_')}.log"

    def step(
        self, name: str, argv: list[str], done: Path, launcher: list[str] | Launch | None = None
    ) -> dict:
        """Run `kdcl-dist <argv>` (or `launcher + argv`); a `Launch` builds its own prefix."""
        done = Path(done)
        argv = stage_argv(argv, self.progress)
        log_path = self.log_path(name)

        def work():
            if isinstance(launcher, Launch):
                prefix, nproc, extra = (
                    launcher.prefix(log_path, name),
                    launcher.local_ranks,
                    launcher.env(),
                )
            else:
                prefix, extra = list(launcher or python_cli()), {}
                nproc = next(
                    (int(c.split("=")[1]) for c in prefix if c.startswith("--nproc_per_node=")), 1
                )
            cmd = prefix + [str(a) for a in argv]
            log_path.write_text("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            # append mode: a Slurm job appends its own output to the same file (--open-mode=append)
            with open(log_path, "a") as log:
                p = subprocess.run(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**self.env(nproc), **extra},
                    text=True,
                )
            if p.returncode != 0 or not done.exists():
                tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-25:])
                raise UserError(
                    f"{log_path}: step '{name}' failed (exit {p.returncode}{'' if done.exists() else ', no ' + str(done)}); "
                    f"last lines:\n{tail}"
                )

        return self._run(
            name, done, f"$ kdcl-dist {' '.join(shlex.quote(str(a)) for a in argv)}", work
        )

    def call(self, name: str, fn, done: Path) -> dict:
        """An in-process step (saves a subprocess start-up of ~5 s where that dominates)."""
        done = Path(done)

        def work():
            fn()
            if not done.exists():
                raise UserError(f"{done}: step '{name}' finished without writing its output")

        return self._run(name, done, "(in process)", work)

    def inline(self, name: str, fn, done: Path):
        """A cheap in-process step that checks its own inputs (the corpus split): always run
        here; a plan (kdcl_dist/plan.py) writes it as a step of its own."""
        return fn()

    def _run(self, name: str, done: Path, how: str, work) -> dict:
        """Skip the step when `done` exists, else time `work()` (it raises on failure); record it."""
        if done.exists():
            rec = {"step": name, "status": "skipped", "seconds": 0.0, "output": str(done)}
            self._say(f"  [skip] {name:<34} (exists: {done})")
        else:
            self._say(f"  [run ] {name:<34} {how}")
            t0 = time.time()
            work()
            dt = time.time() - t0
            rec = {"step": name, "status": "done", "seconds": round(dt, 1), "output": str(done)}
            self._say(f"  [ok  ] {name:<34} {dt:7.1f}s")
        with self._lock:
            self.records.append(rec)
            with open(self.root / "steps.jsonl", "a") as f:
                f.write(json.dumps({**rec, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        return rec

    def summary(self) -> str:
        lines = [f"{'step':<36} {'status':<8} {'seconds':>8}"]
        for r in self.records:
            lines.append(f"{r['step']:<36} {r['status']:<8} {r['seconds']:>8.1f}")
        lines.append(f"{'total':<36} {'':<8} {sum(r['seconds'] for r in self.records):>8.1f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# corpus split
# --------------------------------------------------------------------------------------


def split_corpus(corpus: Path, out_dir: Path, heldout_percent: int, max_docs: int = 0) -> dict:
    """Write train.jsonl / heldout.jsonl by the fixed id-hash rule (skipped when both exist)."""
    from kdcl_dist.evaluate.mlm import is_heldout
    from kdcl_dist.utils import atomic_path, read_json, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    info_path = out_dir / "split.json"
    if (
        info_path.exists()
        and (out_dir / "train.jsonl").exists()
        and (out_dir / "heldout.jsonl").exists()
    ):
        info = read_json(info_path)
        if (
            info.get("heldout_percent") == heldout_percent
            and info.get("max_docs") == max_docs
            and info.get("corpus") == str(corpus)
        ):
            return info
    if not corpus.exists():
        raise UserError(f"{corpus}: corpus not found; pass --corpus FILE (jsonl with id and text)")
    counts = {"train": 0, "heldout": 0}
    with (
        atomic_path(out_dir / "train.jsonl") as t_tmp,
        atomic_path(out_dir / "heldout.jsonl") as h_tmp,
    ):
        with open(corpus, encoding="utf-8") as f, open(t_tmp, "w") as ft, open(h_tmp, "w") as fh:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if max_docs and sum(counts.values()) >= max_docs:
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{corpus}:{n}: invalid JSON ({e.msg})") from e
                doc_id = str(rec.get("id", f"{corpus.name}:{n}"))
                side = "heldout" if is_heldout(doc_id, heldout_percent) else "train"
                (fh if side == "heldout" else ft).write(
                    line if line.endswith("\n") else line + "\n"
                )
                counts[side] += 1
    info = {
        "corpus": str(corpus),
        "heldout_percent": heldout_percent,
        "max_docs": max_docs,
        **counts,
        "rule": "id_hash64(doc_id) % 100 < heldout_percent",
    }
    write_json_atomic(info_path, info)
    return info


# --------------------------------------------------------------------------------------
# reading run outputs
# --------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if Path(path).exists():
        for line in open(path):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a killed run's last line
    return rows


def run_tokens(metrics: list[dict]) -> float:
    """Tokens the run trained on, from tokens/s x step time of each step."""
    return float(sum((r.get("tokens_per_s") or 0.0) * (r.get("step_time") or 0.0) for r in metrics))


def find_model_dir(export_dir: Path) -> Path:
    """The HF directory an export wrote (its root, or one level down)."""
    export_dir = Path(export_dir)
    if (export_dir / "config.json").exists():
        return export_dir
    for sub in sorted(export_dir.glob("*/config.json")):
        return sub.parent
    return export_dir


# --------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------


class Experiment:
    def __init__(
        self,
        corpus: Path,
        out: Path,
        cfg: ExperimentConfig,
        preset: str = "tiny",
        command: str | None = None,
        config_file: str | None = None,
        progress: bool = True,
    ):
        self.corpus, self.out, self.cfg, self.preset = Path(corpus), Path(out), cfg, preset
        self.progress = progress  # False (--no-progress): passed to every stage that takes it
        self.config_file = str(Path(config_file).resolve()) if config_file else None
        self.command = command
        self.r = Runner(self.out, concurrent=1)  # preparation runs one step at a time
        self.r.progress = progress
        self.launch = Launch.from_config(cfg)  # --launcher: how training and scoring start
        self.gpu_sets: list[list[str]] | None = None  # per concurrent run (check_launch)
        # writing a plan (kdcl_dist/plan.py): values known only after earlier steps are shell variables
        self.planning = False
        self.p = {
            k: self.out / k
            for k in (
                "data",
                "tokenizer",
                "models",
                "shards",
                "heldout_shards",
                "scores0",
                "cur0",
                "scores",
                "cur",
                "tcache",
                "runs",
                "evals",
            )
        }

    # -- shared preparation ------------------------------------------------------------
    def n_train_samples(self) -> int:
        from kdcl_dist.utils import read_json

        cur = self.p["cur0"] if (self.p["cur0"] / "curriculum.json").exists() else self.p["cur"]
        return int(read_json(cur / "curriculum.json").get("num_samples"))

    def steps(self) -> int:
        if self.cfg.steps:
            return self.cfg.steps
        if self.planning and not any(
            (self.p[k] / "curriculum.json").exists() for k in ("cur0", "cur")
        ):
            from kdcl_dist.plan import ShellVar

            return ShellVar("STEPS", "steps")  # one epoch: known once the shards are scored
        return max(1, self.n_train_samples() // self.cfg.global_batch)

    def default_warmup_steps(self, steps):
        """A quarter of the run's steps (random-init students)."""
        if not isinstance(steps, int):
            from kdcl_dist.plan import ShellVar

            return ShellVar("WARMUP_STEPS", "warmup_steps")
        return max(1, steps // 4)

    def check_launch(self) -> None:
        """The launcher's programs and hostfile, and the GPUs of concurrent runs (one line each)."""
        # a plan runs elsewhere: its programs and GPUs are checked where it runs
        self.launch.check(self.out, programs=not self.planning)
        if self.launch.local and not self.planning:
            self.gpu_sets = partition_gpus(visible_gpus(), self.cfg.parallel, self.cfg.nproc)

    def preset_args(self) -> list[str]:
        """`--preset P [--config FILE]` for every stage: the experiment's --config reaches each
        stage's own section (e.g. `eval_yesno: {select: dev}`), with the same precedence as when
        the stage is run by hand (preset < file < the experiment's flags for that stage)."""
        return ["--preset", self.preset] + (
            ["--config", self.config_file] if self.config_file else []
        )

    def train_args(
        self,
        cur: Path,
        student: Path,
        teacher: Path | None,
        out: Path,
        order: str,
        reliance: str,
        steps: int,
        seed: int,
        lambda_: float | None = None,
        teacher_cache: Path | None = None,
    ) -> list[str]:
        lam = self.cfg.lambda_ if lambda_ is None else lambda_
        a = [
            "train",
            *self.preset_args(),
            "--curriculum",
            cur,
            "--student",
            student,
            "--out",
            out,
            "--order",
            order,
            "--reliance",
            reliance,
            "--steps",
            steps,
            "--seed",
            seed,
            "--global-batch",
            self.cfg.global_batch,
            "--micro-batch",
            self.cfg.micro_batch,
            "--lambda",
            repr(float(lam)) if isinstance(lam, (int, float)) else lam,  # a plan: ShellVar
            "--save-every",
            0,
            "--keep",
            1,
            "--num-workers",
            0,
        ]
        if self.cfg.lr is not None:  # else train reads the preset's train.lr
            a += ["--lr", self.cfg.lr]
        if teacher_cache is not None:  # KD from the cache; every arm on the cache's masks
            from kdcl_dist.kd.teacher_cache import TeacherCacheConfig

            a += ["--mask-seed", TeacherCacheConfig().mask_seed]
            if teacher is not None:
                a += ["--teacher-cache", teacher_cache]
        elif teacher is not None:
            a += ["--teacher", teacher]
        return a

    def train_then_export(
        self,
        names: tuple[str, str],
        train_argv: list,
        train_out: Path,
        model_out: Path,
        launcher: list[str] | None = None,
    ) -> None:
        """A training step (`train_argv` writes to `train_out`), then its last checkpoint as an HF model."""
        self.r.step(names[0], train_argv, train_out / "train_summary.json", launcher)
        self.r.step(
            names[1],
            ["export", "--checkpoint", train_out, "--out", model_out],
            model_out / "config.json",
        )

    def score_then_curriculum(
        self,
        names: tuple[str, str],
        model: Path,
        scores: Path,
        cur: Path,
        launcher: list[str] | None = None,
        score_extra: list[str] | None = None,
    ) -> None:
        """Score the training shards with `model`, then sort them into the curriculum `cur`."""
        shards = self.p["shards"]
        self.r.step(
            names[0],
            [
                "score",
                *self.preset_args(),
                "--shards",
                shards,
                "--model",
                model,
                "--out",
                scores,
                *(score_extra or []),
            ],
            scores / "scores.json",
            launcher,
        )
        self.r.step(
            names[1],
            [
                "curriculum",
                *self.preset_args(),
                "--shards",
                shards,
                "--scores",
                scores,
                "--out",
                cur,
            ],
            cur / "curriculum.json",
        )

    def resolve_models(self) -> dict | None:
        """The pretrained pair this experiment starts from, or None (random-init tiny models).

        `--teacher`/`--student` (section `experiment`) win; otherwise the preset's `models:`
        section when its `teacher` is a pretrained reference (a string): `paper` names two hub
        models, `minilm` a packaged teacher and a student `{from_teacher: true, layers: N}` built
        from it by `init-models --preset P --out models` (one step). Returns {"teacher", "student":
        the references the stages use, "source": the references as given, "from_teacher": spec or
        None, "origin": where they came from}.
        """
        from kdcl_dist.commands.init_models import _from_teacher_spec
        from kdcl_dist.config import load_preset

        c = self.cfg
        pm = (load_preset(self.preset) or {}).get("models") or {}
        p_teacher = pm.get("teacher") if isinstance(pm.get("teacher"), str) else ""
        teacher = c.teacher or p_teacher
        if not teacher:
            if c.student:
                raise UserError(
                    f"experiment.student: {c.student!r} needs a pretrained teacher too; pass --teacher "
                    "(same vocabulary), or a preset naming one (minilm, paper)"
                )
            return None
        origin = "--teacher/--student" if c.teacher else f"preset {self.preset} (models:)"
        spec = None
        student = c.student
        if not student:
            p_student = pm.get("student")
            if isinstance(p_student, str) and p_teacher:
                student = p_student
            elif p_teacher and isinstance(p_student, dict) and p_student.get("from_teacher"):
                spec = _from_teacher_spec(p_student)
            else:
                raise UserError(
                    f"experiment.teacher: {teacher!r} is a pretrained model; pass --student (a pretrained "
                    "model with the same vocabulary): the random-init tiny student has its own tokenizer"
                )
        elif not c.teacher and c.student:
            origin = f"preset {self.preset} (teacher), --student"
        if spec is not None:
            models = self.p["models"]
            return {
                "teacher": str(models / "teacher"),
                "student": str(models / "student"),
                "source": {
                    "teacher": teacher,
                    "student": f"{spec['layers']} layers of the teacher ({spec.get('arch', 'distilbert')})",
                },
                "from_teacher": spec,
                "origin": origin,
            }
        return {
            "teacher": str(teacher),
            "student": str(student),
            "source": {"teacher": str(teacher), "student": str(student)},
            "from_teacher": None,
            "origin": origin,
        }

    def check_vocabulary(self, teacher: str, student: str) -> None:
        """Refuse (one line, before any work) a pair whose vocabularies differ, as `train` does."""
        from kdcl_dist.data.tokenizer import load_tokenizer
        from kdcl_dist.kd.models import check_same_vocabulary

        check_same_vocabulary(load_tokenizer(teacher), load_tokenizer(student), teacher, student)

    def check_given_tokenizer(self, pretrained: bool) -> None:
        """`tokenizer=DIR`: only for random-init models, and it must load (one line, before work)."""
        from kdcl_dist.data.tokenizer import load_tokenizer

        if pretrained:
            raise UserError(
                f"experiment.tokenizer: {self.cfg.tokenizer} given with pretrained models, whose "
                "shards use the student's own tokenizer; drop tokenizer="
            )
        d = Path(self.cfg.tokenizer)
        if not (d / "tokenizer_config.json").is_file():
            raise UserError(
                f"experiment.tokenizer: {d} is not a tokenizer directory (no tokenizer_config.json); "
                "pass the `tokenizer` directory of an earlier run or of `kdcl-dist tokenizer --out`"
            )
        load_tokenizer(str(d))

    def prep_steps(self, pretrained: bool) -> tuple[int | None, int | None]:
        """(teacher adaptation, student warm-up) steps; None: a quarter of / all of --steps (tiny)."""
        c = self.cfg
        if pretrained:
            return c.teacher_steps or 0, c.warmup_student_steps or 0
        return c.teacher_steps, c.warmup_student_steps

    def check_heads(self, models: dict, t_steps: int, w_steps: int) -> None:
        """A headless checkpoint (all-MiniLM-L6-v2, a student built from it) is only usable after a
        training stage fits its MLM head: refuse the plan that would score or distil with a random head."""
        from kdcl_dist.kd.models import checkpoint_lacks_head

        src = models["source"]["teacher"]
        t_head = checkpoint_lacks_head(src)
        s_head = t_head if models["from_teacher"] else checkpoint_lacks_head(models["student"])
        if t_head and not t_steps:
            raise UserError(
                f"experiment.teacher_steps: the teacher {src} has no masked-LM head; set teacher_steps "
                "> 0 (the adaptation run fits one), else every KD arm distils from a random head"
            )
        if s_head and not w_steps:
            raise UserError(
                f"experiment.warmup_student_steps: the student {models['source']['student']} has no "
                "masked-LM head; set warmup_student_steps > 0 (the warm-up fits one), else the "
                "curriculum is scored by a random head"
            )

    def prepare(self) -> dict:
        c, p, r = self.cfg, self.p, self.r
        self.check_launch()
        models = self.resolve_models()
        pretrained = models is not None
        t_steps, w_steps = self.prep_steps(pretrained)
        if c.tokenizer:  # every refusal before any work
            self.check_given_tokenizer(pretrained)
        if pretrained:  # every refusal before any work
            self.check_heads(models, t_steps, w_steps)
            if not models["from_teacher"]:
                self.check_vocabulary(models["teacher"], models["student"])
            print(
                f"models ({models['origin']}): teacher {models['source']['teacher']}, "
                f"student {models['source']['student']} (pretrained: no tokenizer training, no random init)"
            )
        split = r.inline(
            "split",
            lambda: split_corpus(self.corpus, p["data"], c.heldout_percent, c.max_docs),
            p["data"] / "split.json",
        )
        print(
            f"corpus {self.corpus}: {split['train']} training documents, {split['heldout']} held out "
            f"({c.heldout_percent}% by id hash)"
        )
        if not pretrained:
            if c.tokenizer:  # an earlier run's: WordPiece training is not deterministic
                p["tokenizer"] = Path(c.tokenizer).resolve()
            else:
                r.step(
                    "tokenizer",
                    [
                        "tokenizer",
                        *self.preset_args(),
                        "--input",
                        p["data"] / "train.jsonl",
                        "--out",
                        p["tokenizer"],
                    ],
                    p["tokenizer"] / "tokenizer_config.json",
                )
            r.step(
                "init-models",
                [
                    "init-models",
                    *self.preset_args(),
                    "--tokenizer",
                    p["tokenizer"],
                    "--out",
                    p["models"],
                ],
                p["models"] / "student" / "config.json",
            )
            teacher0, student0, tokenizer = (
                p["models"] / "teacher",
                p["models"] / "student",
                p["tokenizer"],
            )
        else:
            if models["from_teacher"]:  # the pretrained teacher copied, the student built from it
                override = [f"teacher={models['source']['teacher']}"] if c.teacher else []
                r.step(
                    "init-models/student-from-teacher",
                    ["init-models", *self.preset_args(), "--out", p["models"], *override],
                    p["models"] / "student" / "config.json",
                )
            teacher0, student0 = models["teacher"], models["student"]
            tokenizer = student0  # the shards are the student's tokens
        shard_extra = [f"max_length={c.max_length}"] if c.max_length else []
        for part, out in (("train", p["shards"]), ("heldout", p["heldout_shards"])):
            r.step(
                f"shard/{part}",
                [
                    "shard",
                    *self.preset_args(),
                    "--input",
                    p["data"] / f"{part}.jsonl",
                    "--tokenizer",
                    tokenizer,
                    "--out",
                    out,
                    "--no-progress",
                    *shard_extra,
                ],
                out / "dataset.json",
            )
        launcher = self.launch
        need_prep = t_steps is None or w_steps is None or t_steps > 0 or w_steps > 0
        if need_prep:
            # the preparation runs read in random order, but train needs a curriculum directory:
            # `cur0` from the initial student (a pretrained student without head: its order is unused)
            self.score_then_curriculum(
                ("score/initial-student", "curriculum/initial"),
                student0,
                p["scores0"],
                p["cur0"],
                launcher,
                score_extra=["--allow-new-head"] if pretrained else [],
            )
            steps = self.steps()
            if t_steps is None:
                t_steps = steps
            if w_steps is None:
                w_steps = self.default_warmup_steps(steps)
        prep = self.out / "prep"
        final = {"teacher": teacher0, "student": student0}
        # student-only MLM (no teacher, random order) adapts the teacher and warms up the student
        for stage, who, n in (
            ("adapt-teacher", "teacher", t_steps),
            ("warmup-student", "student", w_steps),
        ):
            if not n:
                continue
            train_out = prep / f"{who}-train"
            self.train_then_export(
                (f"{stage}/train", f"{stage}/export"),
                self.train_args(p["cur0"], final[who], None, train_out, "random", "none", n, 0),
                train_out,
                prep / who,
                launcher,
            )
            final[who] = prep / who
        self.score_then_curriculum(
            ("score/student", "curriculum"), final["student"], p["scores"], p["cur"], launcher
        )
        steps = self.steps()
        tcache = self.build_teacher_cache(final["teacher"], steps, launcher)
        return {
            "steps": steps,
            "teacher_steps": t_steps,
            "warmup_steps": w_steps,
            "split": split,
            "models": self.describe_models(models),
            "pretrained": pretrained,
            "teacher_init": teacher0,
            "student_init": student0,
            "teacher": final["teacher"],
            "student": final["student"],
            "planned_lambda": self.planned_lambdas(steps),
            "teacher_cache": tcache,
        }

    def build_teacher_cache(self, teacher, steps: int, launcher) -> Path | None:
        """`--teacher-cache auto`: one cache of the final teacher over the curriculum, with a mask
        draw for every epoch the runs train, at the preset's training temperature; None if off
        or no arm uses a teacher."""
        from kdcl_dist.config import load_preset
        from kdcl_dist.train import TrainConfig

        if self.cfg.teacher_cache == "off" or not any(ARMS[a]["teacher"] for a in self.cfg.arms):
            return None
        n = self.n_train_samples_of(self.p["cur"])
        draws = (steps * self.cfg.global_batch - 1) // n + 1
        tau = (load_preset(self.preset).get("train") or {}).get(
            "temperature", TrainConfig().temperature
        )
        out = self.p["tcache"]
        self.r.step(
            "teacher-cache",
            [
                "teacher-cache",
                *self.preset_args(),
                "--curriculum",
                self.p["cur"],
                "--teacher",
                teacher,
                "--out",
                out,
                "--draws",
                draws,
                "--temperature",
                repr(float(tau)),
                "--no-progress",
            ],
            out / "teacher_cache.json",
            launcher,
        )
        return out

    def n_train_samples_of(self, cur: Path) -> int:
        from kdcl_dist.utils import read_json

        return int(read_json(cur / "curriculum.json").get("num_samples"))

    def describe_models(self, models: dict | None) -> str:
        if models is not None:
            return (
                f"pretrained ({models['origin']}): teacher `{models['source']['teacher']}`, "
                f"student `{models['source']['student']}`"
            )
        return f"random-init ({self.preset} preset `models:`), WordPiece tokenizer trained on the corpus"

    def report_prep(self) -> dict:
        """What the report says about the preparation, read back from the outputs (--report-only,
        the last step of a plan): the same report numbers as the run that wrote them."""
        from kdcl_dist.utils import read_json

        steps = self.steps()
        prep = {
            "steps": steps,
            "split": read_json(self.p["data"] / "split.json"),
            "models": self.describe_models(self.resolve_models()),
        }
        for key, who in (("teacher_steps", "teacher"), ("warmup_steps", "student")):
            rows = read_metrics(self.out / "prep" / f"{who}-train" / "metrics.jsonl")
            prep[key] = int(rows[-1]["step"]) if rows else 0
        if (self.p["cur"] / "order_scores.npy").exists():
            prep["planned_lambda"] = self.planned_lambdas(steps)
        return prep

    def planned_lambdas(self, steps: int) -> dict:
        """Mean λ of every arm over its `steps`, from the curriculum alone (kd.reliance.lambda_trace).

        Known before training for the sequential arms (their λ does not depend on the seed);
        `kd-cl-matched` trains with the mean of its `lambda_from` arm.
        """
        from kdcl_dist.curriculum.order import OrderSpec
        from kdcl_dist.kd.reliance import RelianceSpec, lambda_trace
        from kdcl_dist.utils import read_json

        cur = self.p["cur"]
        if self.planning and not (cur / "order_scores.npy").exists():
            from kdcl_dist.plan import ShellVar

            return {
                a: ShellVar(f"LAMBDA_{a.replace('-', '_')}", f"lambda:{a}")
                for a in self.cfg.arms
                if "lambda_from" in ARMS[a]
            }
        scores = np.load(cur / "order_scores.npy")
        stats = read_json(cur / "curriculum.json").get("score_stats") or {}
        out = {}
        for arm in set(self.cfg.arms) | {
            ARMS[a]["lambda_from"] for a in self.cfg.arms if "lambda_from" in ARMS[a]
        }:
            spec = ARMS[arm]
            if spec["order"] != "sequential" or "lambda_from" in spec:
                continue
            tr = lambda_trace(
                RelianceSpec(spec["reliance"], lambda_=self.cfg.lambda_),
                scores,
                stats,
                OrderSpec("sequential"),
                self.cfg.global_batch,
                steps,
            )
            out[arm] = float(tr.mean())
        for arm in self.cfg.arms:
            if "lambda_from" in ARMS[arm]:
                out[arm] = out[ARMS[arm]["lambda_from"]]
        return out

    # -- evaluation helpers --------------------------------------------------------------
    def eval_mlm(self, name: str, model: Path, in_process: bool = False) -> Path:
        out = self.p["evals"] / f"{name}.mlm.json"
        if in_process:
            from kdcl_dist.evaluate.mlm import EvalMLMConfig, evaluate_mlm, save_per_sample
            from kdcl_dist.utils import write_json_atomic

            def fn():
                cfg = EvalMLMConfig(split="all", masks=self.cfg.eval_masks)
                summary, per_sample = evaluate_mlm(str(model), str(self.p["heldout_shards"]), cfg)
                save_per_sample(self.p["evals"] / f"{name}.mlm.npz", per_sample)
                write_json_atomic(out, summary)

            self.r.call(f"eval-mlm/{name}", fn, out)
            return out
        self.r.step(
            f"eval-mlm/{name}",
            [
                "eval",
                "mlm",
                "--model",
                model,
                "--shards",
                self.p["heldout_shards"],
                "--split",
                "all",
                "--masks",
                self.cfg.eval_masks,
                "--out",
                out,
                "--per-sample",
                self.p["evals"] / f"{name}.mlm.npz",
                "--no-progress",
            ],
            out,
            self.launch.single(),
        )
        return out

    def eval_yesno(self, name: str, model: Path, seeds: int = 0) -> Path | None:
        if not self.cfg.yesno:
            return None
        from kdcl_dist.utils import data_dir

        data = self.cfg.yesno_data or (str(data_dir() / "bioasq") if data_dir() else "")
        if not data or not Path(data).exists():
            raise UserError(
                "experiment.yesno_data: no BLURB task directory; pass yesno_data=DIR or set KDCL_DATA_DIR"
            )
        out = self.p["evals"] / f"{name}.yesno.json"
        self.r.step(
            f"eval-yesno/{name}",
            [
                "eval",
                "yesno",
                *self.preset_args(),
                "--model",
                model,
                "--data",
                data,
                "--seeds",
                seeds or self.cfg.yesno_seeds,
                "--out",
                out,
                "--no-progress",
            ],
            out,
            self.launch.single(),
        )
        return out

    @property
    def eval_in_process(self) -> bool:
        """Evaluate in this process (saves a start-up) unless the steps run elsewhere (slurm)."""
        return self.launch.launcher != "slurm"

    def run_one(self, arm: str, seed: int, prep: dict, launch: Launch | None = None) -> None:
        spec = ARMS[arm]
        run = self.p["runs"] / f"{arm}-s{seed}"
        lam = prep["planned_lambda"][arm] if "lambda_from" in spec else None
        self.train_then_export(
            (f"train/{arm}-s{seed}", f"export/{arm}-s{seed}"),
            self.train_args(
                self.p["cur"],
                prep["student"],
                prep["teacher"] if spec["teacher"] else None,
                run / "train",
                spec["order"],
                spec["reliance"],
                prep["steps"],
                seed,
                lambda_=lam,
                teacher_cache=prep.get("teacher_cache"),
            ),
            run / "train",
            run / "model",
            launch or self.launch,
        )
        self.eval_mlm(f"{arm}-s{seed}", run / "model", in_process=self.eval_in_process)
        if not self.cfg.yesno_arms or arm in self.cfg.yesno_arms:
            self.eval_yesno(f"{arm}-s{seed}", run / "model")

    def references(self, prep: dict) -> None:
        """The starting teacher and student, evaluated like every run."""
        for name, model in (
            ("reference-teacher", prep["teacher"]),
            ("reference-student", prep["student"]),
        ):
            self.eval_mlm(name, model, in_process=self.eval_in_process)
            self.eval_yesno(name, model, self.cfg.yesno_reference_seeds)

    def jobs(self) -> list[tuple[str, int]]:
        return [(arm, seed) for seed in range(self.cfg.seeds) for arm in self.cfg.arms]

    def runs(self, prep: dict) -> None:
        """Every arm x seed; `parallel` at a time, each holding its own GPUs (and port) meanwhile."""
        jobs = self.jobs()
        parallel = 1 if self.planning else self.cfg.parallel  # a plan lists them in order
        self.r.concurrent = parallel
        slots = GpuSlots(self.gpu_sets or [None] * parallel)

        def one(arm: str, seed: int) -> None:
            with slots.take() as (slot, gpus):
                self.run_one(arm, seed, prep, self.launch.bind(slot, gpus))

        if parallel > 1:
            with ThreadPoolExecutor(parallel) as ex:
                for f in [ex.submit(one, a, s) for a, s in jobs]:
                    f.result()
        else:
            for a, s in jobs:
                one(a, s)

    def run_only(self, name: str) -> None:
        """`--step NAME`: run the one step of that name (a plan's in-process steps), nothing else."""
        from kdcl_dist.plan import StepDone, step_runner

        self.r = step_runner(self.out, name)
        self.r.progress = self.progress
        try:
            prep = self.prepare()
            self.references(prep)
            self.runs(prep)
        except StepDone:
            return
        raise UserError(
            f"experiment --step {name}: no step of that name in this experiment; the names are in "
            "the plan (--plan FILE) and in steps.jsonl"
        )

    def query(self, what: str) -> str:
        """`--query`: a value a plan needs once earlier steps ran (steps, warmup_steps, lambda:ARM)."""
        if what == "steps":
            return str(self.steps())
        if what == "warmup_steps":
            return str(self.default_warmup_steps(self.steps()))
        if what.startswith("lambda:") and what[7:] in self.cfg.arms:
            return repr(float(self.planned_lambdas(self.steps())[what[7:]]))
        raise UserError(
            f"experiment --query {what}: one of steps, warmup_steps, lambda:ARM (an arm with a planned λ)"
        )

    def write_plan(self, path: Path) -> tuple[Path, Path]:
        """`--plan FILE`: every step as a shell command, and a Slurm submit script (kdcl_dist/plan.py)."""
        from kdcl_dist.plan import write_plan

        return write_plan(self, path, self.command)

    def run(self) -> Path:
        t0 = time.time()
        prep = self.prepare()
        print(
            f"budget: {prep['steps']} steps x global batch {self.cfg.global_batch} = "
            f"{prep['steps'] * self.cfg.global_batch} samples per arm and seed"
        )
        import torch

        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // self.cfg.parallel)
        )  # in-process evaluations
        self.references(prep)
        self.runs(prep)
        wall = time.time() - t0
        report = write_report(self.out, self.cfg, prep, wall, self.command)
        print(self.r.summary())
        print(f"\nreport: {report}")
        return report


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def _seed_outputs(evals: Path, arm: str, seeds: int, suffix: str) -> list[Path]:
    """The evaluation files `<arm>-s<seed>.<suffix>` that exist (an unfinished seed is left out)."""
    return [p for p in (evals / f"{arm}-s{s}.{suffix}" for s in range(seeds)) if p.exists()]


def _load_arm_mlm(evals: Path, arm: str, seeds: int):
    from kdcl_dist.evaluate.mlm import load_per_sample

    sums, counts, losses = [], [], []
    for npz in _seed_outputs(evals, arm, seeds, "mlm.npz"):
        ps = load_per_sample(npz)
        sums.append(ps["loss_sum"])
        counts.append(ps["n_masked"].astype(np.float64))
        losses.append(float(ps["loss_sum"].sum() / ps["n_masked"].sum()))
    if not sums:
        return None
    return np.stack(sums), np.stack(counts), losses


def _yesno_rows(path: Path):
    """Per-question correctness of one trained model: (fine-tuning seeds x questions), plus the file."""
    r = json.loads(Path(path).read_text())
    gold = np.asarray(r["test_gold"])
    return np.stack(
        [(np.asarray(run["test_pred"]) == gold).astype(np.float64) for run in r["per_seed"]]
    ), r


def _load_arm_yesno(evals: Path, arm: str, seeds: int):
    """Yes/no of an arm with fine-tuning seeds nested in training seeds: one row per training seed
    (its fine-tuning seeds averaged per question), so 3 x 3 runs are 3 units, not 9."""
    from kdcl_dist.evaluate.stats import nest_seeds

    rows, groups, accs, f1s, r = [], [], [], [], None
    for t, path in enumerate(_seed_outputs(evals, arm, seeds, "yesno.json")):
        correct, r = _yesno_rows(path)
        rows.append(correct)
        groups += [t] * len(correct)
        accs.append(r["accuracy"]["mean"])
        f1s.append(r["macro_f1"]["mean"])
    if not rows:
        return None
    return nest_seeds(np.concatenate(rows), groups), accs, f1s, r["majority_baseline"]


def _lambda_stats(metrics: list[dict]) -> dict:
    """Mean λ of a run and λ at its start, middle and end (from metrics.jsonl); distinct samples."""
    lam = [r.get("lambda") for r in metrics if r.get("lambda") is not None]
    if not lam:
        return {}
    n = len(lam)
    return {
        "mean": float(np.mean(lam)),
        "first": float(lam[0]),
        "middle": float(lam[n // 2]),
        "last": float(lam[-1]),
        "distinct_samples": metrics[-1].get("distinct_samples"),
    }


def _prep_text(prep: dict) -> str:
    """ "Teacher adapted for N steps, ..." (0 or unknown: said so)."""
    t, w = prep.get("teacher_steps"), prep.get("warmup_steps")
    t_txt = f"Teacher adapted for {t} steps" if t else "Teacher not adapted (used as given)"
    w_txt = f"student warmed up for {w} steps" if w else "student not warmed up (used as given)"
    if t is None and w is None:  # --report-only: not recorded
        return ""
    return f"{t_txt}, {w_txt}."


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _verdict(c: dict) -> str:
    if not np.isfinite(c["p"]):
        return "not testable (one seed)"
    if c["significant"]:
        # the MDE above a significant difference: a lucky draw of a small effect (it may be overestimated)
        return "significant" + (", underpowered" if c.get("underpowered") else "")
    return "not significant" + (", underpowered" if c.get("underpowered") else "")


def _yesno_table(evals: Path, arms: list[str], yes: dict, cfg, res_json: dict) -> list[str]:
    """Table 2: yes/no accuracy of the arms and the reference models against the majority baseline."""
    from kdcl_dist.evaluate import stats

    refs = {
        ref: _yesno_rows(evals / f"{ref}.yesno.json")
        for ref in ("reference-teacher", "reference-student")
        if (evals / f"{ref}.yesno.json").exists()
    }
    first = (
        next(iter(_seed_outputs(evals, next(iter(yes)), cfg.seeds, "yesno.json")), None)
        if yes
        else None
    )
    any_r = (
        json.loads(first.read_text()) if first else (next(iter(refs.values()))[1] if refs else None)
    )
    if any_r is None:
        return []
    maj = any_r["majority_baseline"]
    # the majority class's own per-question correctness: the comparison is paired by question
    maj_row = (np.asarray(any_r["test_gold"]) == str(maj["label"])).astype(np.float64)
    L = [
        "",
        "## Table 2: yes/no test accuracy (fine-tuned, higher is better)",
        "",
        f"Each trained model fine-tuned with {cfg.yesno_seeds} seed(s), averaged within its training seed"
        f"{'' if not refs else f'; the starting models with {cfg.yesno_reference_seeds or cfg.yesno_seeds}'}. "
        f"vs majority: accuracy − {100 * maj['accuracy']:.1f}% (always '{maj['label']}') with a t test over "
        "seeds and test questions; reference models have one trained model, so their unit is the fine-tuning seed.",
        "",
        "| model | accuracy (mean ± std) | 95% CI | macro-F1 | vs majority (p) |",
        "|---|---|---|---|---|",
    ]
    res_json["yesno"] = {"majority_baseline": maj, "rows": {}}
    rows = [(ARMS[a]["label"], yes[a][0], yes[a][1], yes[a][2]) for a in arms if a in yes]
    for ref, (correct, r) in refs.items():
        rows.append(
            (
                f"*{ref.replace('reference-', '')} (starting point)*",
                correct,
                [x["test_accuracy"] for x in r["per_seed"]],
                [r["macro_f1"]["mean"]],
            )
        )
    for label, correct, accs, f1s in rows:
        m, sd = stats.mean_std(accs)
        c = stats.compare_to_constant(correct, value=maj_row)
        lo, hi = c["ci"][0] + maj["accuracy"], c["ci"][1] + maj["accuracy"]
        L.append(
            f"| {label} | {100 * m:.1f} ± {100 * sd:.1f} | {100 * lo:.1f}–{100 * hi:.1f} | "
            f"{100 * np.mean(f1s):.1f} | {100 * c['diff']:+.1f} pts ({_fmt_p(c['p'])}) |"
        )
        res_json["yesno"]["rows"][label] = {"accuracy": accs, "macro_f1": f1s, "vs_majority": c}
    L.append(
        f"| *majority class ('{maj['label']}')* | {100 * maj['accuracy']:.1f} | | {100 * maj['macro_f1']:.1f} | |"
    )
    return L


def _plots(out: Path, arms: list[str], seeds: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lam_fig, lam_ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        curves, lam = [], None
        for s in range(seeds):
            m = read_metrics(out / "runs" / f"{arm}-s{s}" / "train" / "metrics.jsonl")
            if m:
                curves.append([(r["step"], r.get("loss"), r.get("loss_mlm")) for r in m])
                if lam is None:
                    lam = [(r["step"], r.get("lambda")) for r in m]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = np.array([c[0] for c in curves[0][:n]])
        for j, ax in ((1, axes[0]), (2, axes[1])):
            vals = np.array(
                [[np.nan if v[j] is None else v[j] for v in c[:n]] for c in curves], dtype=float
            )
            mean = np.nanmean(vals, axis=0)
            k = max(1, n // 50)  # moving average: per-step losses on a curriculum are noisy
            smooth = np.convolve(mean, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, label=arm)
        if lam:
            lam_ax.plot(
                [s for s, _ in lam], [np.nan if v is None else v for _, v in lam], label=arm
            )
    axes[0].set_title("training loss (mean over seeds)")
    axes[1].set_title("MLM term of the loss (mean over seeds)")
    lam_ax.set_title("λ per step (seed 0)")
    lam_ax.set_ylabel("λ (batch mean)")
    for ax in (*axes, lam_ax):
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for f, name in ((fig, "loss_curves.png"), (lam_fig, "lambda_schedules.png")):
        f.tight_layout()
        f.savefig(out / name, dpi=110)
        paths.append(out / name)
    plt.close("all")
    return paths


def write_report(
    out: Path, cfg: ExperimentConfig, prep: dict, wall_s: float, command: str | None = None
) -> Path:
    """report.md + report.json + plots from the evaluation outputs under `out`."""
    from kdcl_dist.evaluate import stats
    from kdcl_dist.utils import atomic_path, write_json_atomic

    out = Path(out)
    evals = out / "evals"
    arms = [a for a in cfg.arms if _load_arm_mlm(evals, a, cfg.seeds) is not None]
    mlm = {a: _load_arm_mlm(evals, a, cfg.seeds) for a in arms}
    refs = {}
    for ref in ("reference-teacher", "reference-student"):
        path = evals / f"{ref}.mlm.json"
        if path.exists():
            refs[ref] = json.loads(path.read_text())
    tokens = {
        a: [
            run_tokens(read_metrics(out / "runs" / f"{a}-s{s}" / "train" / "metrics.jsonl"))
            for s in range(cfg.seeds)
        ]
        for a in arms
    }

    # comparisons: each arm vs KD, and the extra pairs; Holm over the whole family
    pairs = [(a, BASELINE_ARM) for a in arms if a != BASELINE_ARM and BASELINE_ARM in arms]
    pairs += [
        (a, b) for a, b in EXTRA_COMPARISONS if a in arms and b in arms and (a, b) not in pairs
    ]
    comps = []
    for a, b in pairs:
        c = stats.compare_seeds(mlm[a][0], mlm[b][0], mlm[a][1], mlm[b][1])
        comps.append({"a": a, "b": b, "metric": "heldout_mlm_loss", **c})
    yes = {a: _load_arm_yesno(evals, a, cfg.seeds) for a in arms} if cfg.yesno else {}
    yes = {a: v for a, v in yes.items() if v is not None}
    for a, b in pairs:
        if a in yes and b in yes:
            comps.append(
                {
                    "a": a,
                    "b": b,
                    "metric": "yesno_accuracy",
                    **stats.compare_seeds(yes[a][0], yes[b][0]),
                }
            )
    testable = [c for c in comps if np.isfinite(c["p"])]
    for c, adj in zip(testable, stats.holm([c["p"] for c in testable]) if testable else []):
        c["p_holm"] = adj
        c["significant"] = bool(adj < ALPHA)
    for c in comps:
        c.setdefault("p_holm", float("nan"))
        c.setdefault("significant", False)
    lam = {
        a: [
            _lambda_stats(read_metrics(out / "runs" / f"{a}-s{s}" / "train" / "metrics.jsonl"))
            for s in range(cfg.seeds)
        ]
        for a in arms
    }

    steps_log = out / "steps.jsonl"
    if (
        steps_log.exists()
    ):  # an experiment resumed after a kill: report the span since its first step
        first = json.loads(steps_log.open().readline())["time"]
        span = time.time() - time.mktime(time.strptime(first, "%Y-%m-%dT%H:%M:%S"))
        wall_s = max(wall_s, span)
    L = [f"# KD / KD-CL / KD-CL-SR experiment ({out})", ""]
    split = prep.get("split", {})
    L.append(
        f"Corpus: `{split.get('corpus', '?')}`: {split.get('train', '?')} training documents, "
        f"{split.get('heldout', '?')} held out ({cfg.heldout_percent}% by id hash). "
        f"Budget per run: {prep['steps']} steps × global batch {cfg.global_batch} = "
        f"{prep['steps'] * cfg.global_batch} samples (equal for every arm). {_prep_text(prep)} "
        f"{cfg.seeds} seeds per arm. Wall time {wall_s / 60:.1f} min (since the first step, "
        "including any interruption)."
    )
    if prep.get("models"):
        L += ["", f"Models: {prep['models']}."]
    if prep.get("teacher_cache") and str(prep["teacher_cache"]) != "None":
        L += [
            "",
            f"Teacher targets: the cached sparse teacher `{prep['teacher_cache']}` (sampled, unbiased; "
            "every arm and seed trains on the same masks, docs/design.md §7).",
        ]
    if command:
        L += ["", f"Command: `{command}`"]
    L += [
        "",
        "## Table 1: held-out masked-LM loss (lower is better)",
        "",
        "Loss = mean cross-entropy over all masked tokens of the held-out documents (fixed masks, "
        f"{cfg.eval_masks} per document, identical for every model). 95% CI: t interval over the training "
        "seeds with the held-out documents' sampling added (evaluate/stats.py `compare_to_constant`; "
        'docs/evaluation.md, "Statistics"). λ: mean over the run\'s steps (first → middle → last step, '
        "seed 0); distinct samples: different training samples the run saw (pacing draws with repeats).",
        "",
        "| arm | seeds | loss (mean ± std over seeds) | 95% CI | perplexity | Δ vs KD | mean λ (first → mid → last) "
        "| distinct samples | tokens trained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    res_json = {
        "arms": {},
        "references": refs,
        "comparisons": comps,
        "prep": {k: str(v) for k, v in prep.items()},
        "config": dataclasses.asdict(cfg),
        "wall_s": wall_s,
        "alpha": ALPHA,
    }
    base_loss = (
        float(mlm[BASELINE_ARM][0].sum() / mlm[BASELINE_ARM][1].sum())
        if BASELINE_ARM in mlm
        else None
    )
    for a in arms:
        sums, counts, losses = mlm[a]
        m, s = stats.mean_std(losses)
        level = stats.compare_to_constant(sums, counts, value=0.0)
        pooled = float(sums.sum() / counts.sum())
        ci = level["ci"] if np.all(np.isfinite(level["ci"])) else [float("nan"), float("nan")]
        delta = "" if base_loss is None or a == BASELINE_ARM else f"{pooled - base_loss:+.4f}"
        ls = [x for x in lam[a] if x]
        lam_txt = (
            (
                f"{np.mean([x['mean'] for x in ls]):.3f} ({ls[0]['first']:.2f} → {ls[0]['middle']:.2f} → "
                f"{ls[0]['last']:.2f})"
            )
            if ls
            else ""
        )
        distinct = [x.get("distinct_samples") for x in ls if x.get("distinct_samples") is not None]
        L.append(
            f"| {ARMS[a]['label']} | {len(losses)} | {m:.4f} ± {s:.4f} | {ci[0]:.4f}–{ci[1]:.4f} | "
            f"{np.exp(pooled):.2f} | {delta} | {lam_txt} | "
            f"{f'{np.mean(distinct):,.0f}' if distinct else ''} | {np.mean(tokens[a]) / 1e6:.2f}M |"
        )
        res_json["arms"][a] = {
            "losses": losses,
            "mean": m,
            "std": s,
            "pooled": pooled,
            "ci": ci,
            "tokens": tokens[a],
            "lambda": lam[a],
            "planned_lambda": (prep.get("planned_lambda") or {}).get(a),
        }
    for ref, r in refs.items():
        L.append(
            f"| *{ref.replace('reference-', '')} (starting point)* | – | {r['loss']:.4f} | | {r['perplexity']:.2f} "
            "| | | | |"
        )
    if yes or cfg.yesno:
        L += _yesno_table(evals, arms, yes, cfg, res_json)
    L += [
        "",
        "## Comparisons",
        "",
        "Difference A − B. The unit is the training seed: a Welch t test on the per-seed values (fine-tuning "
        "seeds averaged within their training seed), with the variance of the paired test items added; "
        f"p Holm-corrected over all comparisons below (family-wise α = {ALPHA}). MDE: the smallest "
        "difference this design detects with 80% power at α = 0.05, from the observed variances; "
        "*underpowered*: the MDE is larger than the difference seen, so a null result here does not "
        'mean there is no effect (docs/evaluation.md, "Statistics").',
        "",
        "| metric | A | B | A − B | 95% CI | p | p (Holm) | MDE | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comps:
        scale, unit = (100, " pts") if c["metric"] == "yesno_accuracy" else (1, "")
        d = 2 if unit else 4
        L.append(
            f"| {c['metric']} | {c['a']} | {c['b']} | {scale * c['diff']:+.{d}f}{unit} | "
            f"{scale * c['ci'][0]:+.{d}f} – {scale * c['ci'][1]:+.{d}f} | {_fmt_p(c['p'])} | "
            f"{_fmt_p(c['p_holm'])} | {scale * c['mde']:.{d}f}{unit} | {_verdict(c)} |"
        )
    L += ["", "## Which differences are significant", ""]
    sig = [c for c in comps if c["significant"]]
    if not comps:
        L.append("No comparisons (fewer than two arms finished).")
    elif not sig:
        L.append(
            f"None of the differences above is significant at α = {ALPHA} after Holm correction."
        )
    for c in sig:
        better = (c["diff"] < 0) if c["metric"] == "heldout_mlm_loss" else (c["diff"] > 0)
        L.append(
            f"- {c['metric']}: **{c['a']}** is {'better' if better else 'worse'} than **{c['b']}** "
            f"({c['diff']:+.4f}, Holm p = {_fmt_p(c['p_holm'])})."
        )
    nonsig = [
        f"{c['a']} vs {c['b']} ({c['metric']}{', underpowered' if c.get('underpowered') else ''})"
        for c in comps
        if not c["significant"]
    ]
    if sig and nonsig:
        L.append(f"- Not significant: {', '.join(nonsig)}.")
    if "kd-cl-matched" in arms and "kd-cl-sr-paper" in arms:
        L += [
            "",
            f"`kd-cl-matched` trains with constant λ = {res_json['arms']['kd-cl-matched']['planned_lambda']:.3f}, "
            "the mean λ of `kd-cl-sr-paper` over the same steps: `kd-cl-sr-paper` vs `kd-cl-matched` is the effect "
            "of *selecting* which batches lean on the teacher at an equal amount of teacher; `kd-cl-sr-paper` vs "
            "`kd-cl` mixes that with the amount of teacher (λ = 0.5).",
        ]
    plots = _plots(out, arms, cfg.seeds)
    L += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    L += [
        "",
        "Per-run outputs: `runs/<arm>-s<seed>/train` (metrics.jsonl, tensorboard/), evaluations in `evals/`.",
    ]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(L) + "\n")
    write_json_atomic(out / "report.json", res_json)
    return path
