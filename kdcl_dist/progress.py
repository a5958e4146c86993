"""Progress output that suits a terminal and a cluster log alike.

`progress_bar(...)` returns a tqdm bar when stderr is a terminal and progress is on; otherwise
(a batch job's log file, `--no-progress`) a `LogProgress` with the same methods (`update`,
`set_postfix`, `close`, `n`) that writes one plain line every `KDCL_PROGRESS_EVERY` seconds
(default 30; 0: at every update) and one at the end, e.g.

    12:00:30 train: 120/1000 step (12.0%), 2.41 step/s, ETA 0:06:05 | loss=3.21 lambda=0.5 samples_per_s=77.1

No carriage returns, so `grep`/`tail` of a Slurm log stay readable. The lines go through the
`kdcl_dist.progress` logger when logging is set up (every stage's rank 0), else to stderr.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import time

log = logging.getLogger("kdcl_dist.progress")
DEFAULT_EVERY_S = 30.0


def is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def every_s() -> float:
    """Seconds between two progress lines ($KDCL_PROGRESS_EVERY, default 30)."""
    raw = os.environ.get("KDCL_PROGRESS_EVERY", "")
    try:
        v = float(raw) if raw.strip() else DEFAULT_EVERY_S
    except ValueError:
        return DEFAULT_EVERY_S
    return max(0.0, v) if math.isfinite(v) else DEFAULT_EVERY_S


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LogProgress:
    """tqdm's interface, writing a progress line every `every` seconds (no carriage returns)."""

    def __init__(
        self,
        total=None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        every: float | None = None,
        **_ignored,
    ):
        self.total = total
        self.desc, self.unit = desc, unit
        self.n = int(initial)
        self._n0 = self.n
        self.every = every_s() if every is None else float(every)
        self._t0 = self._last = time.monotonic()
        self._postfix = ""
        self._closed = False

    def __bool__(self) -> bool:
        return True

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kw) -> None:
        d = dict(ordered_dict or {}, **kw)
        self._postfix = " ".join(f"{k}={v}" for k, v in d.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.n - self._n0) / elapsed
        if self.total:
            pct = 100.0 * self.n / self.total
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.1f}%), {rate:.3g} {self.unit}/s, ETA {_hms(eta)}"
        else:
            text = f"{self.desc}: {self.n} {self.unit}, {rate:.3g} {self.unit}/s, elapsed {_hms(elapsed)}"
        return text + (f" | {self._postfix}" if self._postfix else "")

    def _emit(self) -> None:
        self._last = time.monotonic()
        if logging.getLogger().handlers and log.isEnabledFor(logging.INFO):
            log.info("%s", self.line())
        else:
            print(f"{time.strftime('%H:%M:%S')} {self.line()}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if time.monotonic() - self._last >= self.every:
            self._emit()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n > self._n0:
            self._emit()


def progress_bar(
    total=None,
    desc: str = "",
    unit: str = "it",
    *,
    progress: bool = True,
    lines: bool = True,
    initial: int = 0,
    **tqdm_kw,
):
    """A tqdm bar on a terminal (when `progress`); else a LogProgress (when `lines`) or None."""
    if progress and is_tty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, **tqdm_kw)
    if lines:
        return LogProgress(total=total, desc=desc, unit=unit, initial=initial)
    return None


PROGRESS_HELP = (
    "progress bars, shown only when stderr is a terminal (default); --no-progress: never "
    "(periodic progress lines in logs stay)"
)


def add_progress_flag(parser, help: str = PROGRESS_HELP) -> None:
    """`--progress/--no-progress` (dest `progress`, default True) for a command whose options are
    not a config dataclass's (those with a `progress` field get the same flag from add_options)."""
    import argparse

    # default None here, so argparse does not append its own "(default: True)" to the help
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help=help
    )
    parser.set_defaults(progress=True)


def quiet_libraries() -> None:
    """--no-progress for what a command does not draw itself: tqdm bars of huggingface_hub
    downloads, transformers/datasets loading, DeepSpeed, in this process and its children."""
    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it as the default of `disable`
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    for module, fn in (
        ("huggingface_hub.utils", "disable_progress_bars"),
        ("transformers.utils.logging", "disable_progress_bar"),
        ("datasets.utils.logging", "disable_progress_bar"),
    ):
        if module.split(".")[0] in sys.modules:  # already imported: the env vars came too late
            try:
                getattr(importlib.import_module(module), fn)()
            except (ImportError, AttributeError):
                pass
