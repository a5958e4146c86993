"""Selective reliance: how much the student relies on the teacher (λ) for a global batch.

The training loss is ``(1 − λ)·MLM + λ·τ²·KL`` (kd/losses.py). λ of a batch is a pure function
of that batch's curriculum scores (mean masked-token loss of the scoring model, higher =
harder) and of the schedule's parameters (docs/design.md §4.5): identical on every rank, the same
after a resume, no communication. Global score statistics come from ``curriculum.json``
(``score_stats``: min, max, mean, quantiles).

Schedules (s_i = the score of sample i of the batch, b = the batch):

- ``none``:      λ = 0 (student-only MLM: the no-KD baseline, or adapting a teacher).
- ``constant``:  λ = lambda_ (vanilla KD; 0.5 in the paper).
- ``sr-paper``:  the paper's batch formula. Confidence C_i = exp(−s_i), C_b = mean_i C_i,
                 max(C_g) = exp(−min_g s) (the most confident sample of the whole curriculum),
                 λ = clip((1 − C_b)/max(C_g) − s, 0, 1), with the shift s chosen so that λ of the
                 run's first batch is 0: s = (1 − C_b(first batch))/max(C_g).
- ``sr-minmax``: λ = lambda_max · clip((mean_i s_i − Q(q_low)) / (Q(q_high) − Q(q_low)), 0, 1)
                 with Q the global score quantiles (robust min-max normalisation of difficulty).
- ``sr-sample``: one λ per sample from its own difficulty (the paper's sample-level variant):
                 λ_i = lambda_max · clip((s_i − Q(q_low)) / (Q(q_high) − Q(q_low)), 0, 1).
- ``sr-rank``:   a variant (not the paper's formula): confidence by curriculum rank,
                 C_i = 1 − r_i with r_i = position_i / (n − 1) the sample's rank in the easy→hard
                 order, λ = lambda_max · (1 − mean_i C_i). Under the sequential order it rises
                 linearly from 0 to lambda_max over the epoch (mean lambda_max / 2), whatever
                 the shape of the score distribution — the rise the paper describes, which
                 sr-paper only shows on score distributions far from its min (see
                 docs/training_data_and_losses.md, "How the SR schedules behave").

Harder batches (higher scores, lower confidence) get a larger λ: the student leans on the
teacher where its own MLM signal is least reliable.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from kdcl_dist.errors import UserError

SCHEDULES = ("none", "constant", "sr-paper", "sr-minmax", "sr-sample", "sr-rank")
# schedules whose λ follows the difficulty of the batch, i.e. depends on the order
SR_SCHEDULES = ("sr-paper", "sr-minmax", "sr-sample", "sr-rank")


@dataclass
class RelianceSpec:
    schedule: str
    lambda_: float = 0.5
    lambda_max: float = 1.0
    q_low: float = 0.05
    q_high: float = 0.95

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"train.reliance: unknown schedule '{self.schedule}'; allowed: {', '.join(SCHEDULES)}"
            )
        if not 0.0 <= self.lambda_ <= 1.0:
            raise UserError(f"train.lambda_: {self.lambda_} must be in [0, 1]")
        if not 0.0 <= self.lambda_max <= 1.0:
            raise UserError(f"train.lambda_max: {self.lambda_max} must be in [0, 1]")
        if not 0.0 <= self.q_low < self.q_high <= 1.0:
            raise UserError(
                f"train.q_low/q_high: need 0 <= q_low < q_high <= 1, got {self.q_low}, {self.q_high}"
            )


def quantile_from_stats(score_stats: dict, q: float) -> float:
    """Quantile q of the global scores from curriculum.json's table (linear between entries)."""
    table = score_stats.get("quantiles") or {}
    pts = sorted((float(k), float(v)) for k, v in table.items())
    if not pts:
        if q == 0.0 and "min" in score_stats:
            return float(score_stats["min"])
        if q == 1.0 and "max" in score_stats:
            return float(score_stats["max"])
        raise UserError(
            "curriculum.json: score_stats has no 'quantiles'; re-run `kdcl-dist curriculum`"
        )
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    if q < xs[0] - 1e-9 or q > xs[-1] + 1e-9:
        raise UserError(
            f"curriculum.json: score quantile {q} is outside the table [{xs[0]}, {xs[-1]}]"
        )
    return float(np.interp(q, xs, ys))


class Reliance:
    def __init__(
        self,
        spec: RelianceSpec,
        score_stats: dict | None = None,
        first_batch_scores: np.ndarray | None = None,
        n_samples: int | None = None,
    ):
        self.spec = spec
        self.n_samples = n_samples
        if spec.schedule == "sr-rank" and not n_samples:
            raise ValueError("sr-rank needs the curriculum's sample count (n_samples)")
        stats = score_stats or {}
        self.max_confidence = None
        self.shift = None
        self.q_lo = self.q_hi = None
        if spec.schedule == "sr-paper":
            if "min" not in stats:
                raise UserError(
                    "curriculum.json: score_stats.min missing (needed by sr-paper); "
                    "re-run `kdcl-dist curriculum`"
                )
            self.max_confidence = math.exp(-float(stats["min"]))
            if first_batch_scores is not None:
                self.shift = self._raw_paper(np.asarray(first_batch_scores, dtype=np.float64))
        elif spec.schedule in ("sr-minmax", "sr-sample"):
            self.q_lo = quantile_from_stats(stats, spec.q_low)
            self.q_hi = quantile_from_stats(stats, spec.q_high)

    def _raw_paper(self, scores: np.ndarray) -> float:
        c_b = float(np.mean(np.exp(-scores)))
        return (1.0 - c_b) / self.max_confidence

    def _minmax(self, x):
        # a degenerate quantile range (all scores equal) maps everything above it to 1
        denom = self.q_hi - self.q_lo
        if denom <= 0:
            return np.where(np.asarray(x) > self.q_lo, 1.0, 0.0)
        return np.clip((np.asarray(x, dtype=np.float64) - self.q_lo) / denom, 0.0, 1.0)

    def batch_lambda(
        self, scores: np.ndarray, positions: np.ndarray | None = None
    ) -> float | np.ndarray:
        """λ of a global batch from its samples' scores (per-sample array for sr-sample only);
        sr-rank reads the samples' curriculum positions instead."""
        s = np.asarray(scores, dtype=np.float64)
        sch = self.spec.schedule
        if sch == "none":
            return 0.0
        if sch == "constant":
            return float(self.spec.lambda_)
        if s.size == 0:
            raise ValueError("batch_lambda: empty batch")
        if sch == "sr-rank":
            if positions is None:
                raise ValueError("sr-rank needs the batch's curriculum positions")
            rank = np.asarray(positions, dtype=np.float64) / max(1, self.n_samples - 1)
            return float(self.spec.lambda_max * np.clip(rank.mean(), 0.0, 1.0))
        if sch == "sr-paper":
            if self.shift is None:
                raise ValueError(
                    "sr-paper needs the first batch's scores (first_batch_scores) or a loaded state"
                )
            return float(np.clip(self._raw_paper(s) - self.shift, 0.0, 1.0))
        if sch == "sr-minmax":
            return float(self.spec.lambda_max * self._minmax(float(np.mean(s))))
        return self.spec.lambda_max * self._minmax(s)  # sr-sample

    def state_dict(self) -> dict:
        return {
            **dataclasses.asdict(self.spec),
            "max_confidence": self.max_confidence,
            "shift": self.shift,
            "q_low_value": self.q_lo,
            "q_high_value": self.q_hi,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore the derived constants (shift, quantile values) saved with a run."""
        if sd.get("schedule") != self.spec.schedule:
            raise UserError(
                f"checkpoint reliance state: schedule {sd.get('schedule')!r} but this run has "
                f"{self.spec.schedule!r}; pass --reliance {sd.get('schedule')} or start a new --out"
            )
        self.max_confidence = sd.get("max_confidence", self.max_confidence)
        self.shift = sd.get("shift", self.shift)
        self.q_lo = sd.get("q_low_value", self.q_lo)
        self.q_hi = sd.get("q_high_value", self.q_hi)


def lambda_trace(
    spec: RelianceSpec,
    order_scores: np.ndarray,
    score_stats: dict,
    order_spec,
    global_batch: int,
    steps,
) -> np.ndarray:
    """Batch-mean λ of steps 0..steps-1 computed from the manifest alone, before any training.

    The same arithmetic as the training loop (first-batch shift, positions from the order), so
    a run's logged λ equals this trace; used for the curriculum's λ plot and to match the
    constant λ of `kd-cl-matched` to an SR arm's mean λ.
    """
    from kdcl_dist.curriculum.order import global_batch_positions

    scores = np.asarray(order_scores, dtype=np.float64)
    n = len(scores)
    first = scores[global_batch_positions(order_spec, n, global_batch, 0)]
    rel = Reliance(spec, score_stats, first, n_samples=n)
    at = np.arange(int(steps)) if np.ndim(steps) == 0 else np.asarray(steps, dtype=np.int64)
    out = np.empty(len(at))
    for i, t in enumerate(at):  # `steps`: a count (0..steps-1) or the step indices to evaluate
        pos = global_batch_positions(order_spec, n, global_batch, int(t))
        out[i] = float(np.mean(rel.batch_lambda(scores[pos], pos)))
    return out
