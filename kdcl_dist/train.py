"""The training loop: init -> data -> models -> engine -> resume -> (step, log, checkpoint)*.

`train(cfg)` reads top to bottom. Every rank runs the same loop over global batches
t = start_step .. total_steps-1; the sampler gives each rank its micro-batches of batch t
(a pure function of t), λ comes from the reliance schedule applied to batch t's scores (read
from `order_scores.npy`: identical on every rank, no communication), and one all-reduce per
step carries the logged sums and the SIGTERM stop flag, so all ranks stop at the same step.

Steps and epochs: one epoch is n samples of the order's stream (curriculum/order.py); when
the global batch does not divide n, the batch at an epoch's end continues into the next
epoch's order, so no sample is ever left out. `--epochs E` trains ceil(E·n / B) steps;
`--steps N` trains N steps and wraps into further epochs as needed (epoch e uses the order for
epoch e and mask draw e); giving both is an error when N exceeds what E epochs provide.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import torch

from kdcl_dist import FORMAT_VERSION, dist
from kdcl_dist.config import option
from kdcl_dist.errors import UserError
from kdcl_dist.kd.nonfinite import NonFiniteGuard

log = logging.getLogger("kdcl_dist.train")

ORDER_CHOICES = ("sequential", "reverse", "random", "pacing-linear", "pacing-root", "pacing-exp")
RELIANCE_CHOICES = ("none", "constant", "sr-paper", "sr-minmax", "sr-sample", "sr-rank")


@dataclasses.dataclass
class TrainConfig:
    curriculum: str | None = option(
        None, help="curriculum directory (curriculum.json, order_scores.npy, shards)"
    )
    student: str | None = option(
        None, help="student model directory or hub name (its tokenizer is used)"
    )
    teacher: str | None = option(
        None,
        help="teacher model directory or hub name; omit (or none) for student-only MLM "
        "(--reliance none)",
    )
    teacher_cache: str = option(
        "",
        help="a `kdcl-dist teacher-cache` directory: KD from its stored sparse teacher "
        "targets instead of --teacher (the teacher is not loaded); masks then use its mask seed",
    )
    mask_seed: int | None = option(
        None,
        help="seed of the training masks (unset: --seed; with --teacher-cache: the cache's). "
        "docs/design.md §7",
    )
    out: str | None = option(None, help="output directory (checkpoints, metrics, tensorboard)")
    order: str = option("sequential", help="sample order", choices=ORDER_CHOICES)
    pacing_f0: float = option(0.2, help="pacing: initial pool fraction", min=0.0, max=1.0)
    pacing_steps: int = option(
        0, help="pacing: step at which the pool is the whole data (0: one epoch)", min=0
    )
    reliance: str = option(
        "constant",
        help="λ schedule (sr-rank: λ rises with the curriculum rank)",
        choices=RELIANCE_CHOICES,
    )
    lambda_: float = option(0.5, help="λ for the constant schedule", min=0.0, max=1.0)
    lambda_max: float = option(
        1.0, help="λ_max for sr-minmax / sr-sample / sr-rank", min=0.0, max=1.0
    )
    q_low: float = option(0.05, help="sr-minmax/sr-sample: lower score quantile", min=0.0, max=1.0)
    q_high: float = option(0.95, help="sr-minmax/sr-sample: upper score quantile", min=0.0, max=1.0)
    allow_new_head: bool = option(
        False,
        help="accept a teacher checkpoint without MLM head (freshly initialised "
        "from seed 0: noise teacher targets); refused by default",
    )
    allow_sr_any_order: bool = option(
        False,
        help="allow --reliance sr-paper with a random or reverse order "
        "(its λ is shifted to 0 on the first batch, which those orders make arbitrary)",
    )
    temperature: float = option(2.0, help="KD temperature τ (loss scaled by τ²)", min=1e-6)
    kd_positions: str = option(
        "masked",
        help="KL at masked positions or at all non-padding ones",
        choices=("masked", "all"),
    )
    cosine_weight: float = option(
        0.0, help="weight of the hidden-state cosine term (needs equal hidden sizes)", min=0.0
    )
    global_batch: int = option(32, help="samples per optimizer step over all ranks", min=1)
    micro_batch: int = option(8, help="samples per forward on one rank", min=1)
    batching: str = option(
        "length-grouped",
        help="how global batch t is cut into micro-batches: length-grouped (sorted by token "
        "length, little padding) or padded (contiguous blocks of the order); the batch's "
        "samples are the same (docs/training.md)",
        choices=("length-grouped", "padded"),
    )
    # unset (None) is the only "not given": an explicit 0 would otherwise train a whole epoch
    steps: int | None = option(
        None,
        help="optimizer steps (unset: from epochs)",
        min=1,
        hint="omit --steps (or set steps: null) to train by --epochs, one epoch by default",
    )
    epochs: int | None = option(
        None,
        help="epochs over the curriculum (unset: 1, or what --steps needs)",
        min=1,
        hint="omit --epochs (or set epochs: null) for one epoch, or give --steps",
    )
    lr: float = option(5e-4, help="peak learning rate", min=0.0)
    warmup_steps: int = option(10, help="linear warm-up steps", min=0)
    lr_schedule: str = option(
        "linear", help="decay after warm-up", choices=("linear", "cosine", "constant")
    )
    min_lr_ratio: float = option(0.0, help="final lr as a fraction of the peak", min=0.0, max=1.0)
    weight_decay: float = option(0.01, help="AdamW weight decay", min=0.0)
    grad_clip: float = option(1.0, help="gradient clipping (global norm)", min=0.0)
    ds_config: str = option(
        "cpu_fp32",
        help="student DeepSpeed config: a packaged name (kdcl_dist/ds_configs, "
        "see docs/training.md) or a JSON file",
    )
    teacher_hosting: str = option(
        "replicated", help="teacher placement", choices=("replicated", "zero3")
    )
    teacher_ds_config: str = option(
        "", help="teacher ZeRO-3 config, a packaged name or a file ('' = teacher_zero3[_bf16])"
    )
    teacher_dtype: str = option(
        "auto",
        help="replicated teacher's dtype (auto: bf16 on GPU, fp32 on CPU)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    teacher_head_fp32: bool = option(
        False, help="compute the teacher's LM head (its logits) in fp32 whatever its dtype"
    )
    gradient_checkpointing: bool = option(
        False,
        help="activation checkpointing in the student (HF gradient_checkpointing_enable): "
        "less memory, ~1/3 more student compute; for a larger micro-batch (docs/training.md)",
    )
    save_every: int = option(100, help="checkpoint every N steps (0: only at the end)", min=0)
    keep: int = option(3, help="complete checkpoints to keep", min=1)
    resume: str = option("auto", help="auto | none | PATH of a checkpoint")
    extend_steps: bool = option(
        False,
        help="on resume: accept another total (--steps/--epochs) than the "
        "checkpoint's and extend the lr schedule from the resume step (docs/training.md)",
    )
    seed: int = option(42, help="seed for order, masks, dropout")
    num_workers: int = option(2, help="DataLoader workers per rank", min=0)
    max_steps_per_run: int = option(
        0, help="stop (with a checkpoint) after this many steps in this run (0: off)", min=0
    )
    max_nonfinite_steps: int = option(
        5, help="abort after this many non-finite (skipped) steps in a row (0: never)", min=0
    )
    progress: bool = option(
        True,
        help="tqdm bar on a terminal (off: none); without a terminal, or off, a progress "
        "line every $KDCL_PROGRESS_EVERY seconds (default 30) in the log",
    )
    wandb: bool = option(
        False, help="also log to Weights & Biases (pip install kdcl_dist[wandb]); rank 0 only"
    )
    wandb_project: str = option("kdcl-dist", help="W&B project")
    wandb_entity: str = option("", help="W&B entity (team or user; '' = your default)")
    wandb_name: str = option("", help="W&B run name ('' = the --out directory's name)")
    wandb_mode: str = option(
        "",
        help="W&B mode ('' = $WANDB_MODE, else online)",
        choices=("", "online", "offline", "disabled"),
    )

    def validate(self) -> None:
        for k in ("curriculum", "student", "out"):
            if not getattr(self, k):
                raise UserError(f"train.{k}: required (pass --{k.replace('_', '-')})")
        if self.teacher_cache:
            if self.teacher is not None and self.teacher.lower() not in ("", "none"):
                raise UserError(
                    "train.teacher_cache: give --teacher or --teacher-cache, not both (the cache "
                    "records which teacher made it)"
                )
            if self.kd_positions != "masked" or self.cosine_weight > 0:
                raise UserError(
                    "train.teacher_cache: the cache holds the teacher's distribution at the masked "
                    "positions only; use --kd-positions masked and cosine_weight=0, or --teacher"
                )
        if self.teacher is None and not self.teacher_cache and self.reliance != "none":
            raise UserError(
                f"train.reliance: '{self.reliance}' needs a teacher; pass --teacher or use --reliance none "
                "(student-only MLM)"
            )
        if self.teacher is not None and self.teacher.lower() in ("", "none"):
            self.teacher = None
        if self.micro_batch > self.global_batch:
            raise UserError(
                f"train.micro_batch: {self.micro_batch} exceeds train.global_batch {self.global_batch} (the "
                "micro batch is one rank's share of a step); lower --micro-batch or raise --global-batch"
            )
        if self.q_low >= self.q_high:
            raise UserError(f"train.q_low: {self.q_low} must be below q_high {self.q_high}")
        if self.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise UserError(
                    "train.wandb: the wandb package is not installed; pip install 'kdcl_dist[wandb]' "
                    "(or pip install wandb), or drop --wandb"
                )
        if (
            self.reliance == "sr-paper"
            and self.order in ("random", "reverse")
            and not self.allow_sr_any_order
        ):
            raise UserError(
                f"train.reliance: sr-paper with train.order {self.order} turns KD (almost) off: its λ is shifted "
                "to 0 on the run's first batch, which is meant to be the easiest (sequential or pacing-* order); "
                "use one of those orders, another --reliance, or pass --allow-sr-any-order to run it anyway"
            )


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> dist.DistInfo:
    """Always give DeepSpeed a process group (a single process gets a 1-rank gloo group)."""
    info = dist.env_info()
    if info.world_size <= 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
            }
        )
    if info.world_size <= 1 and not dist.is_initialized():
        import datetime

        import deepspeed

        dist.release_stale_shm(0)
        deepspeed.init_distributed(
            dist_backend=dist.backend(),
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(minutes=30),
        )
        return dist.DistInfo(0, 1, 0)
    return dist.init()


def resolve_steps(
    n_samples: int, global_batch: int, steps: int | None, epochs: int | None
) -> tuple[int, int]:
    """(total_steps, steps_per_epoch) with the documented epochs semantics.

    steps / epochs None: not given. E epochs are ceil(E·n / B) steps: every sample is trained E
    times (order.py, the stream); steps_per_epoch is the whole steps of one epoch, n // B
    (pacing's default length). Neither given: one epoch.
    """
    from kdcl_dist.curriculum.order import steps_for_epochs

    for key, v in (("steps", steps), ("epochs", epochs)):
        if (
            v is not None and v < 1
        ):  # the config refuses these already (min=1); callers of this function too
            raise UserError(
                f"train.{key}: {v} is below the minimum 1; omit --{key} to leave it unset"
            )
    if n_samples < 1:
        raise UserError(
            "train.curriculum: the curriculum holds no samples; rebuild it with `kdcl-dist curriculum` "
            "(check --exclude-heldout-percent and --nonfinite)"
        )
    spe = n_samples // global_batch
    if spe < 1:
        raise UserError(
            f"train.global_batch: {global_batch} exceeds the curriculum's {n_samples} samples; "
            f"use a global batch of at most {n_samples}"
        )
    if (
        steps is not None
        and epochs is not None
        and steps > steps_for_epochs(n_samples, global_batch, epochs)
    ):
        raise UserError(
            f"train.steps: {steps} steps exceed the {epochs} epoch(s) of {n_samples} samples "
            f"({steps_for_epochs(n_samples, global_batch, epochs)} steps at global batch {global_batch}); "
            "raise --epochs, lower --steps, or give only --steps (it wraps into further epochs)"
        )
    if steps is not None:
        return steps, spe
    return steps_for_epochs(n_samples, global_batch, epochs or 1), spe


def _tensor_sha(named) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_sha(engine) -> str:
    """sha256 of every teacher parameter (gathered when partitioned by ZeRO-3)."""
    if engine.teacher is None:
        return ""
    import deepspeed

    module = engine.teacher_engine.module if engine.teacher_engine is not None else engine.teacher
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(
        params, modifier_rank=None, enabled=engine.teacher_engine is not None
    ):
        return _tensor_sha(sorted(module.state_dict().items()))


def teacher_partition(engine) -> dict:
    """How much of the teacher this rank holds: ZeRO-3 keeps 1/W of each partitioned tensor."""
    if engine.teacher is None:
        return {}
    module = engine.teacher_engine.module if engine.teacher_engine is not None else engine.teacher
    full = sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
    local = sum(
        int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
        for p in module.parameters()
    )
    return {
        "teacher_numel": full,
        "teacher_local_numel": local,
        "teacher_trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records of steps after the resumed checkpoint (they were trained but lost)."""
    if not path.exists():
        return
    from kdcl_dist.utils import atomic_path

    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    with atomic_path(path) as tmp:
        tmp.write_text("".join(x + "\n" for x in keep))


class _StopFlag:
    """SIGTERM (preemption): finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def install(self):
        self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM received: finishing this step, then saving a checkpoint")

    def uninstall(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _worker_init(_):
    # Workers leave preemption to the main process, which shuts them down after saving.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------


_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def train(cfg: TrainConfig) -> dict:
    """Run training; see `_train`. A 1-rank process group that this call creates for itself is
    destroyed on return, and the launcher variables it set are undone, so a caller that trains in
    process (a notebook, a test, a refused run) keeps no port bound and passes no stale
    MASTER_PORT to the processes it starts later."""
    owns_group = (
        dist.env_info().world_size <= 1
        and "MASTER_ADDR" not in os.environ
        and not dist.is_initialized()
    )
    saved = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    try:
        return _train(cfg)
    finally:
        if owns_group:
            if dist.is_initialized():
                torch.distributed.destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _train(cfg: TrainConfig) -> dict:
    from kdcl_dist import checkpoint as ckpt
    from kdcl_dist.config import write_resolved
    from kdcl_dist.curriculum.order import OrderSpec, pool_fraction
    from kdcl_dist.curriculum.sampler import CurriculumDataset, CurriculumSampler, collate
    from kdcl_dist.data.masking import MaskSpec
    from kdcl_dist.data.reader import ShardSet
    from kdcl_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from kdcl_dist.kd import engine as kde
    from kdcl_dist.kd.models import check_same_vocabulary, load_mlm
    from kdcl_dist.kd.reliance import Reliance, RelianceSpec
    from kdcl_dist.monitor import Monitor, read_metrics
    from kdcl_dist.utils import setup_logging, write_json_atomic

    # 1. processes
    info = init_distributed()
    rank, world = info.rank, info.world_size
    setup_logging(rank)
    out = Path(cfg.out)  # created once every check below has passed (a refused run writes nothing)

    # 2. curriculum and everything decided by the config, the world size and curriculum.json
    from kdcl_dist import storage
    from kdcl_dist.data.reader import has_file

    remote = storage.is_url(cfg.curriculum)  # s3://... : ranged reads (kdcl_dist/storage.py)
    cur_dir = storage.RemotePath(cfg.curriculum) if remote else Path(cfg.curriculum)
    if not has_file(cfg.curriculum, "curriculum.json"):
        raise UserError(
            f"{cur_dir}: no curriculum.json; run `kdcl-dist curriculum` first (or pass its --out)"
        )
    shards = ShardSet(cfg.curriculum, "curriculum.json")
    manifest = shards.manifest
    n = len(shards)
    scores_path = cur_dir / "order_scores.npy"
    if not has_file(cfg.curriculum, "order_scores.npy"):
        raise UserError(f"{scores_path}: missing; re-run `kdcl-dist curriculum`")
    try:
        if remote:
            import io

            blob = shards.store.read("order_scores.npy")
            order_scores = np.load(io.BytesIO(blob), allow_pickle=False)
        else:
            order_scores = np.load(scores_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # a cut header or body: mmap/parse fails
        raise UserError(
            f"{scores_path}: cannot read it ({str(e).splitlines()[0][:160]}); the file is cut or "
            "corrupt: re-run `kdcl-dist curriculum`"
        ) from e
    if order_scores.ndim != 1 or order_scores.dtype.kind != "f":
        raise UserError(
            f"{scores_path}: expected a 1-D float array, found {order_scores.dtype} of shape "
            f"{order_scores.shape}; re-run `kdcl-dist curriculum`"
        )
    if len(order_scores) != n:
        raise UserError(
            f"{scores_path}: {len(order_scores)} scores for {n} samples; re-run `kdcl-dist curriculum`"
        )
    fingerprint = shards.fingerprint
    total_steps, spe = resolve_steps(n, cfg.global_batch, cfg.steps, cfg.epochs)
    kde.grad_accum_steps(
        cfg.global_batch, cfg.micro_batch, world
    )  # the batch must split over the ranks
    pacing_steps = cfg.pacing_steps or None  # None: the pool reaches all data after one epoch

    # 3. tokenizer and vocabularies (before any model is built)
    tok = load_tokenizer(cfg.student)
    MaskSpec.from_tokenizer(tok)  # a tokenizer without a mask token: refused before any model
    want_fp = (manifest.get("tokenizer") or {}).get("fingerprint")
    if want_fp and want_fp != tokenizer_fingerprint(tok):
        raise UserError(
            f"{cur_dir / 'curriculum.json'}: curriculum was tokenized with tokenizer {want_fp}, the "
            f"student's is {tokenizer_fingerprint(tok)}; use the student that the data was built for"
        )
    if cfg.teacher:
        check_same_vocabulary(load_tokenizer(cfg.teacher), tok, cfg.teacher, cfg.student)
        if not cfg.allow_new_head:  # a headless local teacher is refused before --out exists
            from kdcl_dist.kd.models import checkpoint_lacks_head, new_head_error

            head = checkpoint_lacks_head(cfg.teacher)
            if head:
                raise new_head_error(cfg.teacher, head, "teacher targets")

    # 3b. masks: a cached sparse teacher fixes them (its mask seed, docs/design.md §7); checked
    #     against the curriculum, τ and the epochs before any model is built
    cache = None
    if cfg.teacher_cache:
        from kdcl_dist.kd import teacher_cache as tcache

        cache, cfg.mask_seed = tcache.open_for_train(
            cfg, manifest, shards, tokenizer_fingerprint(tok), total_steps
        )
    elif cfg.mask_seed is None:
        cfg.mask_seed = cfg.seed

    # 4. resume target: decided before the engine, because another world size needs the
    #    DeepSpeed config flag load_universal at initialize time
    order_info = {
        "mode": cfg.order,
        "seed": cfg.seed,
        "pacing_f0": cfg.pacing_f0,
        "pacing_steps": pacing_steps,
    }
    resume_dir = ckpt.find_resume_all_ranks(
        out, cfg.resume, rank
    )  # skips damaged checkpoints under auto
    marker = None
    if resume_dir is not None:
        marker = ckpt.read_marker(resume_dir)
        ckpt.check_compatible(
            marker,
            fingerprint=fingerprint,
            global_batch=cfg.global_batch,
            order=order_info,
            path=resume_dir,
        )
    # every setting that shapes the run must be the checkpoint's (a changed total only with
    # --extend-steps, which adds an lr segment); checkpoints from before run_settings keep their
    # single optimizer group, and their settings cannot be checked
    lr_segments = [[0, total_steps]]  # the lr schedule: [0, base total], then each extension point
    old_total = None
    if marker is not None and marker.get("run_settings"):
        old_total = int(marker["run_settings"]["total_steps"])
        lr_segments = check_run_settings(
            marker["run_settings"],
            cfg,
            total_steps,
            start_step=_marker_step(marker, cfg),
            path=resume_dir,
        )
    elif marker is not None and rank == 0:
        log.warning(
            "%s: the checkpoint records no run settings (written by an older kdcl-dist): lr, schedule, "
            "steps, τ and λ settings could not be checked against this run",
            resume_dir,
        )
    param_groups = "split" if marker is None else marker.get("param_groups", "single")
    universal = resume_dir is not None and ckpt.needs_universal(marker, world)

    # 5. DeepSpeed configs, checked against DeepSpeed's own schema (kd/engine.check_ds_config)
    on_gpu = torch.cuda.is_available()
    ds_cfg = kde.prepare_student_config(
        cfg.ds_config,
        global_batch=cfg.global_batch,
        micro_batch=cfg.micro_batch,
        world_size=world,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        lr_schedule=cfg.lr_schedule,
        min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        on_gpu=on_gpu,
        load_universal=universal,
    )
    t_cfg = None
    if cfg.teacher and cfg.teacher_hosting == "zero3":
        path = cfg.teacher_ds_config or (
            "teacher_zero3_bf16" if on_gpu and kde.precision(ds_cfg) == "bf16" else "teacher_zero3"
        )
        t_cfg = kde.prepare_teacher_config(
            path, micro_batch=cfg.micro_batch, world_size=world, on_gpu=on_gpu
        )
    stage = kde.zero_stage(ds_cfg)
    if marker is not None and stage is not None and int(marker.get("zero_stage", stage)) != stage:
        raise UserError(
            f"{resume_dir}: checkpoint was saved with ZeRO stage {marker.get('zero_stage')}, --ds-config "
            f"{cfg.ds_config} uses stage {stage}; resume with a config of the same stage"
        )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    # 6. models and engine: the first costly step, after every check above
    ckpt.seed_rng(cfg.seed + rank)
    student = load_mlm(cfg.student, role="student")  # a new head is a warning: training fits it
    teacher = (
        load_mlm(
            cfg.teacher,
            role="teacher",
            purpose="teacher targets",
            new_head="allow" if cfg.allow_new_head else "refuse",
        )
        if cfg.teacher
        else None
    )
    opts = kde.EngineOptions(
        temperature=cfg.temperature,
        kd_positions=cfg.kd_positions,
        cosine_weight=cfg.cosine_weight,
        teacher_hosting=cfg.teacher_hosting,
        teacher_dtype=cfg.teacher_dtype,
        teacher_head_fp32=cfg.teacher_head_fp32,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    sched = kde.make_lr_scheduler(
        warmup_steps=cfg.warmup_steps,
        total_steps=lr_segments[0][1],
        schedule=cfg.lr_schedule,
        min_ratio=cfg.min_lr_ratio,
        extensions=lr_segments[1:],
    )
    engine = kde.KDEngine(
        student,
        teacher,
        ds_cfg,
        world_size=world,
        options=opts,
        teacher_ds_config=t_cfg,
        lr_scheduler=sched,
        param_groups=param_groups,
    )
    engine.run_settings = run_settings(cfg, lr_segments)  # saved with every checkpoint (_save)
    if marker is not None and int(marker.get("zero_stage", engine.zero_stage)) != engine.zero_stage:
        raise UserError(
            f"{resume_dir}: checkpoint was saved with ZeRO stage {marker.get('zero_stage')}, --ds-config "
            f"{cfg.ds_config} uses stage {engine.zero_stage}; resume with a config of the same stage"
        )
    t_sha_start = teacher_sha(engine)

    if rank == 0:
        student.config.save_pretrained(out / "student_config")
        tok.save_pretrained(out / "student_config")
        write_resolved(cfg, out, "train")
        write_json_atomic(out / "ds_config.json", ds_cfg)

    # 7. sampler, reliance
    spec = OrderSpec(
        mode=cfg.order, seed=cfg.seed, pacing_f0=cfg.pacing_f0, pacing_steps=pacing_steps
    )
    lengths = shards.token_lengths() if cfg.batching == "length-grouped" else None
    sampler = CurriculumSampler(
        n,
        cfg.global_batch,
        cfg.micro_batch,
        world,
        rank,
        spec,
        batching=cfg.batching,
        lengths=lengths,
    )
    rspec = RelianceSpec(
        schedule=cfg.reliance,
        lambda_=cfg.lambda_,
        lambda_max=cfg.lambda_max,
        q_low=cfg.q_low,
        q_high=cfg.q_high,
    )
    first_scores = np.asarray(
        order_scores[np.asarray(sampler.global_positions(0))], dtype=np.float64
    )
    reliance = Reliance(rspec, manifest.get("score_stats") or {}, first_scores, n_samples=n)

    # 8. resume
    start_step = 0
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, rank)
    if resume_dir is not None:
        client = _load_checkpoint(ckpt, engine, resume_dir, world, rank)
        start_step = int(client["step"])
        sampler.load_state_dict(client["sampler"])  # refuses another order / seed / manifest size
        if client.get("reliance"):
            reliance.load_state_dict(client["reliance"])
        guard.load_state_dict(client.get("nonfinite"))  # continue the count of skipped steps
        if int(sampler.consumed_samples) != start_step * cfg.global_batch:
            raise UserError(
                f"{resume_dir}: consumed_samples {sampler.consumed_samples} is not step {start_step} x "
                f"global batch {cfg.global_batch}; the checkpoint is inconsistent"
            )
        own = ckpt.restore_rank_rng(client, rank, cfg.seed, start_step)
        if engine.global_steps != start_step:
            raise UserError(
                f"{resume_dir}: DeepSpeed restored step {engine.global_steps}, client_state says "
                f"{start_step}; the checkpoint is inconsistent"
            )
        # record what was loaded, so a resume (also a universal one) can be audited against the files
        loaded = {k: _tensor_sha([(k, v)])[:16] for k, v in engine.student_state_dict().items()}
        if rank == 0:
            with open(out / "resume_log.jsonl", "a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": start_step,
                            "checkpoint": str(resume_dir),
                            "universal": universal,
                            "world_size": world,
                            "saved_world_size": marker.get("world_size"),
                            "total_steps": total_steps,
                            "saved_total_steps": old_total,
                            "student_sha": loaded,
                        }
                    )
                    + "\n"
                )
        log.info(
            "resumed from %s at step %d (%d samples consumed%s)",
            resume_dir,
            start_step,
            sampler.consumed_samples,
            "" if own else "; new ranks reseeded",
        )
        if old_total is not None and old_total != total_steps:
            log.info(
                "--extend-steps: total %d -> %d steps from step %d; lr %.6g at the resume step, then %s "
                "decay to %.6g at step %d",
                old_total,
                total_steps,
                start_step,
                cfg.lr * _lr_at(cfg, lr_segments, start_step),
                cfg.lr_schedule,
                cfg.lr * _lr_at(cfg, lr_segments, total_steps),
                total_steps,
            )
    dist.barrier()
    if rank == 0:
        for name in ("metrics.jsonl", "samples.jsonl"):
            _truncate_jsonl(out / name, start_step)

    # 9. data: one DataLoader over this rank's micro-batches of every remaining step
    if cache is None:
        dataset = CurriculumDataset(shards, tok, seed=cfg.mask_seed, spec=spec)
    else:  # items carry the cached teacher targets of their masked positions
        dataset = tcache.CachedCurriculumDataset(cache, shards, tok, seed=cfg.mask_seed, spec=spec)
    pad_id = int(tok.pad_token_id)

    def batches():
        for step in range(start_step, total_steps):
            # keys epoch*n + position: the dataset draws epoch e's mask (sampler module doc)
            yield from sampler.rank_micro_batch_keys(step)

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_ListSampler(batches, (total_steps - start_step) * engine.grad_accum),
        collate_fn=(lambda b: collate(b, pad_id))
        if cache is None
        else (lambda b: tcache.collate_targets(b, collate(b, pad_id))),
        num_workers=cfg.num_workers,
        worker_init_fn=_worker_init if cfg.num_workers else None,
        persistent_workers=False,
        prefetch_factor=4 if cfg.num_workers else None,
        generator=torch.Generator().manual_seed(
            cfg.seed
        ),  # never draw from the global RNG (dropout)
    )

    # distinct samples trained so far (pacing draws with repeats; the stream orders see each once per epoch)
    from kdcl_dist.curriculum.order import distinct_positions_seen

    seen = distinct_positions_seen(spec, n, cfg.global_batch, start_step)
    n_seen = int(seen.sum())
    wb = None
    if cfg.wandb:
        from kdcl_dist.config import to_dict
        from kdcl_dist.monitor import WandbSpec

        wb = WandbSpec(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity or None,
            name=cfg.wandb_name or out.name,
            mode=cfg.wandb_mode or None,
            images_dir=None if remote else str(cur_dir),
            config={
                **to_dict(cfg),
                "total_steps": total_steps,
                "world_size": world,
                "zero_stage": engine.zero_stage,
                "precision": engine.precision,
            },
        )
    monitor = Monitor(
        str(out), rank, total_steps, start_step=start_step, progress=cfg.progress, wandb=wb
    )
    stop = _StopFlag().install()
    samples_f = open(out / "samples.jsonl", "a") if rank == 0 else None
    step = start_step
    stopped_by = None
    try:
        it = iter(loader)
        ran = 0
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            micro = [next(it) for _ in range(engine.grad_accum)]
            positions = np.asarray(sampler.global_positions(step))
            scores = np.asarray(order_scores[positions], dtype=np.float64)
            n_seen += int(np.count_nonzero(~seen[positions]))
            seen[positions] = True
            lam = reliance.batch_lambda(scores, positions)
            if np.ndim(lam):
                lam_map = dict(zip(positions.tolist(), np.asarray(lam, dtype=np.float64).tolist()))

                def lam_fn(p, m=lam_map):
                    return np.array([m[int(x)] for x in p])
            else:

                def lam_fn(p, v=float(lam)):
                    return v

            lr = engine.lr()  # the lr this step applies (the scheduler advances after the step)
            res = engine.step(micro, lam_fn)
            guard.update(
                step + 1, res["nonfinite"]
            )  # counts and warns; the weights were left as they were
            local_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)
            computed = sum(int(mb["attention_mask"].numel()) for mb in micro)  # with padding
            ran += 1
            want_stop = stop.requested or (cfg.max_steps_per_run and ran >= cfg.max_steps_per_run)
            extra = torch.tensor([float(want_stop), local_tokens, computed], dtype=torch.float64)
            # the engine's sums are device tensors (no sync per micro-batch); NCCL: device only
            sync = torch.cat([res["acc"].to(engine.device), extra.to(engine.device)])
            sync = dist.all_reduce_sum(sync).cpu()
            # what this rank trained is its share of the pure split of batch t (sampler): checked
            # locally, so samples.jsonl can record batch t without gathering positions each step
            got = [int(p) for mb in micro for p in np.asarray(mb["positions"])]
            if got != sampler.rank_block(step).tolist():
                raise RuntimeError(
                    f"step {step}: the loaded micro-batches are not this rank's share"
                )
            dt = time.perf_counter() - t0
            done = step + 1
            scalars = {
                "loss": float(sync[0]),
                "loss_mlm": float(sync[1]),
                "loss_kd": float(sync[2]),
                "lambda": float(np.mean(lam)),
                "score_mean": float(scores.mean()),
                "score_min": float(scores.min()),
                "score_max": float(scores.max()),
                "curriculum_progress": done * cfg.global_batch / n,
                "epoch": sampler.epoch(step),
                "pool_fraction": float(pool_fraction(spec, step, spe)),
                "agreement": float(sync[3]) / res["n_masked"]
                if teacher is not None or cache is not None
                else float("nan"),
                "lr": lr,
                "grad_norm": engine.grad_norm(),
                "samples_per_s": cfg.global_batch / dt,
                "tokens_per_s": float(sync[6]) / dt,
                "real_token_fraction": float(sync[6]) / max(1.0, float(sync[7])),
                "step_time": dt,
                "memory_mb": engine.memory_bytes() / 2**20,
                "masked_tokens": res["n_masked"],
                "consumed_samples": done * cfg.global_batch,
                "distinct_samples": n_seen,
                "nonfinite_steps": guard.total,
            }
            if cfg.cosine_weight > 0:
                scalars["loss_cos"] = float(sync[4])
            if np.ndim(lam):
                scalars["lambda_min"], scalars["lambda_max"] = (
                    float(np.min(lam)),
                    float(np.max(lam)),
                )
            monitor.log(done, scalars)
            if samples_f is not None:
                samples_f.write(json.dumps({"step": done, "positions": positions.tolist()}) + "\n")
                samples_f.flush()
            sampler.consumed_samples = (
                done * cfg.global_batch
            )  # a skipped step's samples count as consumed
            guard.check()  # max_nonfinite_steps in a row: a one-line abort on every rank
            last = done == total_steps
            if float(sync[5]) > 0 and not last:
                stopped_by = (
                    "SIGTERM"
                    if stop.requested or not cfg.max_steps_per_run
                    else "max_steps_per_run"
                )
            if last or stopped_by or (cfg.save_every and done % cfg.save_every == 0):
                _save(
                    ckpt,
                    engine,
                    out,
                    done,
                    cfg,
                    sampler,
                    reliance,
                    fingerprint,
                    world,
                    rank,
                    order_info,
                    nonfinite=guard.state_dict(),
                )
            if stopped_by:
                log.warning("stopping after step %d (%s); checkpoint saved", done, stopped_by)
                break
    finally:
        stop.uninstall()
        monitor.close()
        if samples_f is not None:
            samples_f.close()
    t_sha_end = teacher_sha(engine)
    summary = {
        "steps_done": step + 1 if total_steps > start_step else start_step,
        "total_steps": total_steps,
        "start_step": start_step,
        "world_size": world,
        "stopped_by": stopped_by,
        "teacher_sha_start": t_sha_start,
        "teacher_sha_end": t_sha_end,
        "zero_stage": engine.zero_stage,
        "precision": engine.precision,
        **teacher_partition(engine),
        **guard.summary(),
    }
    summary["distinct_samples"] = n_seen
    if rank == 0:
        lams = [
            r["lambda"] for r in read_metrics(out / "metrics.jsonl") if r.get("lambda") is not None
        ]
        summary["lambda_mean"] = (
            float(np.mean(lams)) if lams else None
        )  # over every step, resumed ones too
        write_json_atomic(out / "train_summary.json", summary)
    dist.barrier()
    return summary


def _load_checkpoint(ckpt, engine, resume_dir, world, rank) -> dict:
    """engine.load with a one-line error when a file cannot be read.

    The marker's sizes and sha256s were checked already; this catches what they cannot (a
    marker written before files were recorded, a file damaged between the check and the load).
    """
    import errno
    import pickle
    import zipfile

    try:
        load_dir, tag, _ = ckpt.prepare_load(resume_dir, world, rank)
        return engine.load(load_dir, tag)
    except UserError:
        raise
    except (
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
        KeyError,
    ) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # a full disk during a universal conversion: the CLI names it
        log.debug("loading %s failed", resume_dir, exc_info=True)
        raise UserError(
            f"{resume_dir}: cannot load this checkpoint ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}); a file is cut or corrupt: resume from an earlier "
            "checkpoint (--resume PATH) or start over with --resume none"
        ) from e


def _save(
    ckpt,
    engine,
    out,
    done,
    cfg,
    sampler,
    reliance,
    fingerprint,
    world,
    rank,
    order_info,
    nonfinite=None,
):
    client = {
        "format_version": FORMAT_VERSION,
        "step": done,
        "consumed_samples": done * cfg.global_batch,
        "sampler": sampler.state_dict(),
        "reliance": reliance.state_dict()
        if hasattr(reliance, "state_dict")
        else dataclasses.asdict(reliance.spec),
        "curriculum_fingerprint": fingerprint,
        "global_batch": cfg.global_batch,
        "config": dataclasses.asdict(cfg),
        "nonfinite": nonfinite or {},  # skipped-step record (kd/nonfinite.py), continued on resume
    }
    marker = {
        "consumed_samples": done * cfg.global_batch,
        "curriculum_fingerprint": fingerprint,
        "global_batch": cfg.global_batch,
        "world_size": world,
        "zero_stage": engine.zero_stage,
        "order": order_info,
    }
    # what a resume checks before building anything (check_run_settings) and the optimizer's layout
    recorded = {"param_groups": engine.param_groups_layout}
    if engine.run_settings:
        recorded["run_settings"] = engine.run_settings
    client.update(recorded)
    marker.update(recorded)
    ckpt.save(engine, out, done, client, cfg.keep, rank, marker)


# --------------------------------------------------------------------------------------
# run settings: what a resume must not change silently
# --------------------------------------------------------------------------------------

# TrainConfig fields that shape what is trained (total_steps and the lr segments are added);
# micro batch, world size, workers, checkpointing and precision may change on resume
RUN_SETTING_KEYS = (
    "lr",
    "lr_schedule",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "grad_clip",
    "temperature",
    "kd_positions",
    "cosine_weight",
    "reliance",
    "lambda_",
    "lambda_max",
    "q_low",
    "q_high",
    "order",
    "pacing_f0",
    "pacing_steps",
    "seed",
    "mask_seed",
    "global_batch",
)


def run_settings(cfg: TrainConfig, lr_segments) -> dict:
    """The settings recorded with every checkpoint ("run_settings" in client state and marker).

    lr_segments: [[0, T_0], [s_1, T_1], ...]: the base total and each `--extend-steps` point
    (resume step, new total); the lr of step k is `kd.engine.lr_factor` of them.
    """
    rs = {k: getattr(cfg, k) for k in RUN_SETTING_KEYS}
    rs["total_steps"] = int(lr_segments[-1][1])
    rs["lr_segments"] = [[int(a), int(b)] for a, b in lr_segments]
    return rs


def _setting_matters(key: str, saved: dict) -> bool:
    """False for a setting the saved run does not use (λ of another schedule, pacing of a stream order)."""
    rel, order = saved.get("reliance"), str(saved.get("order", ""))
    if key == "lambda_":
        return rel == "constant"
    if key == "lambda_max":
        return rel not in ("none", "constant", "sr-paper")
    if key in ("q_low", "q_high"):
        return rel in ("sr-minmax", "sr-sample")
    if key in ("temperature", "kd_positions"):
        return rel != "none"
    if key in ("pacing_f0", "pacing_steps"):
        return order.startswith("pacing")
    if key == "min_lr_ratio":
        return saved.get("lr_schedule") != "constant"
    return True


def _flag_for(key: str, value) -> str:
    """How to set `key` to `value` on the command line: its flag, else a KEY=VALUE override."""
    from kdcl_dist.commands.train import FLAGS
    from kdcl_dist.config import flag_name

    if key in FLAGS.values():
        return f"{flag_name(key)} {value}"
    return f"{key}={value}"


def check_run_settings(
    saved: dict, cfg: TrainConfig, total_steps: int, *, start_step: int, path
) -> list:
    """Refuse a resume that would silently change the run; the lr segments of the resumed run.

    One-line UserError naming the first changed setting and how to keep it. Another total is
    accepted only with cfg.extend_steps (and not below the checkpoint's step): it appends the
    extension point [start_step, total_steps] to the saved lr segments.
    """
    for key in RUN_SETTING_KEYS:
        if key not in saved or not _setting_matters(key, saved):
            continue
        now, was = getattr(cfg, key), saved[key]
        if key == "mask_seed" and now is None:  # unset means --seed, as train resolves it
            now = cfg.seed
        if now != was:
            raise UserError(
                f"{path}: train.{key} is {now} but the checkpoint was trained with {was}; resuming would "
                f"silently change the run: pass {_flag_for(key, was)}, or start a new --out (--resume none)"
            )
    segments = [
        [int(a), int(b)] for a, b in saved.get("lr_segments") or [[0, saved["total_steps"]]]
    ]
    old_total = int(saved["total_steps"])
    if total_steps == old_total:
        return segments
    if not cfg.extend_steps:
        raise UserError(
            f"{path}: train.total_steps is {total_steps} but the checkpoint was trained with {old_total}; "
            f"resuming would silently change the run (its lr schedule): pass --steps {old_total}, or "
            f"--extend-steps to continue to {total_steps} steps with an extended lr schedule, or start "
            "a new --out (--resume none)"
        )
    if total_steps < start_step:
        raise UserError(
            f"{path}: train.total_steps is {total_steps}, below the checkpoint's step {start_step}; "
            f"--extend-steps needs a total of at least {start_step} steps (--steps)"
        )
    return segments + [[int(start_step), int(total_steps)]]


def _marker_step(marker: dict, cfg: TrainConfig) -> int:
    if "step" in marker:
        return int(marker["step"])
    return int(marker.get("consumed_samples", 0)) // cfg.global_batch


def _lr_at(cfg: TrainConfig, lr_segments, step: int) -> float:
    """The factor of the peak lr at optimizer step `step` under these lr segments."""
    from kdcl_dist.kd.engine import lr_factor

    return lr_factor(
        step,
        warmup_steps=cfg.warmup_steps,
        total_steps=lr_segments[0][1],
        schedule=cfg.lr_schedule,
        min_ratio=cfg.min_lr_ratio,
        extensions=lr_segments[1:],
    )


class _ListSampler:
    """A batch_sampler from a generator of position lists (the DataLoader needs __iter__/__len__)."""

    def __init__(self, make_iter, length: int):
        self.make_iter, self.length = make_iter, length

    def __iter__(self):
        for b in self.make_iter():
            yield [int(p) for p in np.asarray(b)]

    def __len__(self):
        return self.length
