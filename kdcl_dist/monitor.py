"""Training monitor: TensorBoard event files, metrics.jsonl, progress and (optionally) W&B, on rank 0 only.

    <out>/tensorboard/events.out.tfevents.*   scalars under "train/<key>" (SummaryWriter)
    <out>/metrics.jsonl                       one JSON object per step: {"step": N, <key>: value, ...}
    <out>/wandb/                              Weights & Biases run files (only with `wandb=WandbSpec(...)`)
    <out>/wandb_run_id                        the W&B run id: a resumed run continues the same W&B run

Progress: a tqdm bar when stderr is a terminal, otherwise (a batch job's log) a plain line every
$KDCL_PROGRESS_EVERY seconds (default 30) with step, rate, ETA, loss, λ and samples/s
(kdcl_dist/progress.py); `progress=False` (train --no-progress) keeps only the lines.

W&B (`pip install kdcl_dist[wandb]`, off unless asked: train --wandb): the same scalars as
TensorBoard under "train/<key>" against the step metric "train/step" (so a resumed run that
logs steps again is not refused), the resolved config, and the curriculum's plots
(curriculum.png, score_histogram.png, lambda_schedules.png when present) as images.

Only rank 0 writes; every other rank (or `enabled=False`) gets a `NullMonitor` with the same
methods doing nothing, so the loop never branches on rank (nanoGPT's DummyWandb idea).
Non-finite values are written as JSON null (strict JSON has no NaN).

Resume: the first `log(step)` of a run removes the lines of metrics.jsonl with a step >= that
step (left by an earlier run that got further than the checkpoint it resumed from), so the
file holds each step exactly once; TensorBoard's `purge_step` does the same for the events.
Lines are flushed one by one, so a killed run leaves a valid prefix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger("kdcl_dist.monitor")

# images of the curriculum directory logged to W&B when present
WANDB_IMAGES = ("curriculum.png", "score_histogram.png", "lambda_schedules.png")


@dataclasses.dataclass
class WandbSpec:
    """What `Monitor` needs for W&B: project/entity/name/mode, the run's config, the curriculum dir."""

    project: str = "kdcl-dist"
    entity: str | None = None
    name: str | None = None
    mode: str | None = None  # online | offline | disabled; None: wandb's default ($WANDB_MODE)
    config: dict | None = None
    images_dir: str | None = None


# keys the trainer logs (others are accepted and written too)
KEYS = (
    "loss",
    "loss_mlm",
    "loss_kd",
    "lambda",
    "score_mean",
    "score_min",
    "score_max",
    "curriculum_progress",
    "pool_fraction",
    "agreement",
    "lr",
    "grad_norm",
    "samples_per_s",
    "tokens_per_s",
    "real_token_fraction",
    "step_time",
    "memory_mb",
)
# the bar shows these when present
_BAR_KEYS = ("loss", "lambda", "samples_per_s")


class NullMonitor:
    """The no-op twin used on ranks other than 0."""

    def log(self, step: int, scalars: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Monitor:
    def __new__(
        cls, out_dir=None, rank: int = 0, total_steps: int | None = None, enabled: bool = True, **kw
    ):
        if rank != 0 or not enabled:
            return NullMonitor()  # not a Monitor instance, so __init__ is skipped
        return super().__new__(cls)

    def __init__(
        self,
        out_dir,
        rank: int = 0,
        total_steps: int | None = None,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        start_step: int | None = None,
        flush_every_s: float = 10.0,
        wandb: WandbSpec | None = None,
    ):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.total_steps = total_steps
        self.use_tb, self.use_bar = tensorboard, progress
        self.flush_every_s = flush_every_s
        self._writer = None
        self._bar = None
        self.wandb_spec = wandb
        self._wandb = None
        self._file = None
        self._last_flush = time.monotonic()
        self._closed = False
        if start_step is not None:
            self._start(int(start_step) + 1)

    # -- lifecycle --------------------------------------------------------------------
    def _start(self, first_step: int) -> None:
        drop_from_step(self.metrics_path, first_step)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if self.use_tb:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step discards events at steps >= first_step left by a run that got further
            self._writer = SummaryWriter(
                log_dir=str(self.out / "tensorboard"), purge_step=first_step
            )
        if self.wandb_spec is not None:
            self._wandb = _wandb_start(self.out, self.wandb_spec)
        from kdcl_dist.progress import progress_bar

        # a bar on a terminal (unless progress=False), else a progress line every $KDCL_PROGRESS_EVERY s
        self._bar = progress_bar(
            self.total_steps,
            "train",
            "step",
            progress=self.use_bar,
            initial=first_step - 1,
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def log(self, step: int, scalars: dict) -> None:
        step = int(step)
        if self._file is None:
            self._start(step)
        row = {"step": step}
        for k, v in scalars.items():
            row[k] = _jsonable(v)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(f"train/{k}", v, step)
            now = time.monotonic()
            if now - self._last_flush >= self.flush_every_s:
                self._writer.flush()
                self._last_flush = now
        if self._wandb is not None:
            self._wandb.log(
                {
                    "train/step": step,
                    **{
                        f"train/{k}": v
                        for k, v in row.items()
                        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                    },
                }
            )
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
            self._bar.set_postfix(
                {k: f"{row[k]:.4g}" for k in _BAR_KEYS if isinstance(row.get(k), float)},
                refresh=False,
            )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wandb_start(out: Path, spec: WandbSpec):
    """Start (or, with the id saved in <out>/wandb_run_id, continue) the W&B run; rank 0 only."""
    try:
        import wandb
    except ImportError as e:
        from kdcl_dist.errors import UserError

        raise UserError(
            "train.wandb: the wandb package is not installed; pip install 'kdcl_dist[wandb]' "
            "(or pip install wandb), or drop --wandb"
        ) from e
    id_path = out / "wandb_run_id"
    run_id = id_path.read_text().strip() if id_path.exists() else ""
    resumed = bool(run_id)
    if not run_id:
        import secrets
        import string

        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_path.write_text(run_id + "\n")
    kw = {
        "project": spec.project or "kdcl-dist",
        "id": run_id,
        "resume": "allow",
        "dir": str(out),
        "config": spec.config or {},
    }
    if spec.entity:
        kw["entity"] = spec.entity
    if spec.name:
        kw["name"] = spec.name
    if spec.mode:
        kw["mode"] = spec.mode
    run = wandb.init(**kw)
    run.define_metric("train/step")
    run.define_metric("train/*", step_metric="train/step")
    if spec.config:
        run.config.update(
            spec.config, allow_val_change=True
        )  # a resume may change e.g. micro_batch
    if spec.images_dir and not resumed:
        images = {
            f"curriculum/{Path(n).stem}": wandb.Image(str(Path(spec.images_dir) / n))
            for n in WANDB_IMAGES
            if (Path(spec.images_dir) / n).is_file()
        }
        if images:
            run.log(images)
    log.info(
        "W&B run %s (%s)%s",
        run_id,
        kw.get("mode") or os.environ.get("WANDB_MODE") or "online",
        ", resumed" if resumed else "",
    )
    return run


def _jsonable(v):
    if hasattr(v, "item"):  # numpy / torch scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def drop_from_step(path, first_step: int) -> int:
    """Rewrite a jsonl file without lines whose "step" >= first_step (atomic); returns lines dropped."""
    from kdcl_dist.utils import atomic_path

    path = Path(path)
    if not path.exists():
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                step = json.loads(line).get("step")
            except json.JSONDecodeError:  # a torn last line from a kill: drop it
                dropped += 1
                continue
            if step is not None and step >= first_step:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(keep), encoding="utf-8")
    return dropped


def read_metrics(path) -> list[dict]:
    """All rows of a metrics.jsonl (for tests and reports)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tensorboard(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files under `log_dir` (after purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.fspath(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
