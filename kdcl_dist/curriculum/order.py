"""The global training order: a pure function of (n samples, mode, parameters, seed, step).

Positions index the curriculum ShardSet, which is already sorted easy -> hard, so position 0
is the easiest sample. Nothing here reads files or depends on rank, world size or workers
(DESIGN §4.3): every rank computes the same global batch t, and resume only needs the step.

Modes
-----
- ``sequential``: epoch e repeats the curriculum order; global batch t of an epoch is
  positions ``[t·B, (t+1)·B)`` (easy -> hard, the paper).
- ``reverse``: the same with the order reversed (hard -> easy; anti-curriculum sanity check).
- ``random``: a seeded permutation per epoch, seeded by (seed, epoch): KD without curriculum.
- ``pacing-linear`` / ``pacing-root`` / ``pacing-exp`` (Hacohen & Weinshall 2019): at step t the
  pool is the easiest ``ceil(f(t)·n)`` samples, and batch t is B positions drawn uniformly
  without replacement from the pool with an RNG seeded by (seed, step). With T = pacing_steps:

      linear  f(t) = f0 + (1 − f0)·t/T
      root    f(t) = f0 + (1 − f0)·sqrt(t/T)
      exp     f(t) = f0·(1/f0)^(t/T)

  each capped at 1. The pool never holds fewer than B samples.

An epoch has ``n // B`` steps (the last partial batch is dropped, so every rank has the same
number of steps and no rank waits at an epoch end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from kdcl_dist.errors import UserError

ORDERS = ("sequential", "reverse", "random", "pacing-linear", "pacing-root", "pacing-exp")
PACING = {"pacing-linear", "pacing-root", "pacing-exp"}

# domain tags keep the RNG streams of `random` and `pacing-*` apart for one seed
_TAG_RANDOM = 0x52414E44
_TAG_PACING = 0x50414345


@dataclass
class OrderSpec:
    mode: str
    seed: int = 0
    pacing_f0: float = 0.1
    pacing_steps: int | None = None  # steps until the pool is all data; None: one epoch's steps

    def __post_init__(self):
        if self.mode not in ORDERS:
            raise UserError(f"train.order: unknown order '{self.mode}'; allowed: {', '.join(ORDERS)}")
        if self.mode in PACING:
            if not 0.0 <= float(self.pacing_f0) <= 1.0 or (self.mode == "pacing-exp" and self.pacing_f0 <= 0):
                raise UserError(f"train.pacing_f0: {self.pacing_f0} is out of range; use a fraction in "
                                f"{'(0' if self.mode == 'pacing-exp' else '[0'}, 1]")
            if self.pacing_steps is not None and int(self.pacing_steps) < 1:
                raise UserError(f"train.pacing_steps: {self.pacing_steps} must be >= 1 (or unset for one epoch)")

    @property
    def is_pacing(self) -> bool:
        return self.mode in PACING


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    if global_batch < 1:
        raise UserError(f"train.global_batch: {global_batch} must be >= 1")
    spe = int(n_samples) // int(global_batch)
    if spe < 1:
        raise UserError(f"train.global_batch: {global_batch} exceeds the {n_samples} samples of the "
                        "curriculum; use a smaller global batch or a larger curriculum")
    return spe


def epoch_of(spec: OrderSpec, n_samples: int, global_batch: int, step: int) -> int:
    return int(step) // steps_per_epoch(n_samples, global_batch)


def pool_fraction(spec: OrderSpec, step: int, default_steps: int | None = None) -> float:
    """Fraction of the (easiest-first) data available at `step`; 1.0 for non-pacing orders."""
    if not spec.is_pacing:
        return 1.0
    T = spec.pacing_steps if spec.pacing_steps is not None else default_steps
    if T is None:
        raise ValueError("pool_fraction: pacing_steps is unset; pass default_steps (steps per epoch)")
    x = min(1.0, max(0.0, float(step) / float(T)))
    f0 = float(spec.pacing_f0)
    if spec.mode == "pacing-linear":
        f = f0 + (1.0 - f0) * x
    elif spec.mode == "pacing-root":
        f = f0 + (1.0 - f0) * math.sqrt(x)
    else:  # pacing-exp
        f = f0 * (1.0 / f0) ** x
    return min(1.0, f)


def pool_size(spec: OrderSpec, n_samples: int, global_batch: int, step: int) -> int:
    """Number of easiest samples in the pool at `step` (>= global batch, <= n)."""
    f = pool_fraction(spec, step, steps_per_epoch(n_samples, global_batch))
    return int(min(n_samples, max(global_batch, math.ceil(f * n_samples - 1e-9))))


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, _TAG_RANDOM, epoch])))
    p = rng.permutation(n).astype(np.int64)
    p.setflags(write=False)
    return p


def epoch_order(spec: OrderSpec, n_samples: int, epoch: int) -> np.ndarray:
    """The full order of one epoch for sequential/reverse/random (read-only int64 array)."""
    if spec.mode == "sequential":
        return np.arange(n_samples, dtype=np.int64)
    if spec.mode == "reverse":
        return np.arange(n_samples - 1, -1, -1, dtype=np.int64)
    if spec.mode == "random":
        return _permutation(int(n_samples), int(spec.seed), int(epoch))
    raise ValueError(f"epoch_order: pacing order '{spec.mode}' has no fixed epoch order")


def global_batch_positions(spec: OrderSpec, n_samples: int, global_batch: int, step: int) -> np.ndarray:
    """Curriculum positions of global batch `step` (int64, length global_batch)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    spe = steps_per_epoch(n_samples, global_batch)
    B = int(global_batch)
    if spec.is_pacing:
        k = pool_size(spec, n_samples, B, step)
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([int(spec.seed) & 0xFFFFFFFF, _TAG_PACING, int(step)])))
        return rng.choice(k, size=B, replace=False).astype(np.int64)
    epoch, t = divmod(int(step), spe)
    return np.array(epoch_order(spec, n_samples, epoch)[t * B:(t + 1) * B], dtype=np.int64)
