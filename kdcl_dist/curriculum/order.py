"""The global training order: a pure function of (n samples, mode, parameters, seed, step).

Positions index the curriculum ShardSet, which is already sorted easy -> hard, so position 0
is the easiest sample. Nothing here reads files or depends on rank, world size or workers
(docs/design.md §4.3): every rank computes the same global batch t, and resume only needs the step.

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

The sample stream (sequential, reverse, random). The epochs' orders are laid end to end into
one stream, and global batch t is stream items ``[t·B, (t+1)·B)``. An epoch is n stream items,
not a whole number of steps: when B does not divide n, the batch at an epoch's end holds the
last ``n mod B`` samples of epoch e and the first ones of epoch e+1 (for ``sequential``: the
hardest of this pass and the easiest of the next). Every sample is therefore trained exactly
once per epoch, at any world size; nothing is dropped (an earlier version dropped the same
``n mod B`` hardest samples in every epoch). Each item carries its own epoch (its mask draw).

Pacing orders draw each batch from the pool, so an epoch there is only a count (n samples
drawn); which samples are seen, and how often, is up to the draw: the training loop logs the
distinct samples seen (``distinct_samples``) and the report shows them.
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
            raise UserError(
                f"train.order: unknown order '{self.mode}'; allowed: {', '.join(ORDERS)}"
            )
        if self.mode in PACING:
            if not 0.0 <= float(self.pacing_f0) <= 1.0 or (
                self.mode == "pacing-exp" and self.pacing_f0 <= 0
            ):
                raise UserError(
                    f"train.pacing_f0: {self.pacing_f0} is out of range; use a fraction in "
                    f"{'(0' if self.mode == 'pacing-exp' else '[0'}, 1]"
                )
            if self.pacing_steps is not None and int(self.pacing_steps) < 1:
                raise UserError(
                    f"train.pacing_steps: {self.pacing_steps} must be >= 1 (or unset for one epoch)"
                )

    @property
    def is_pacing(self) -> bool:
        return self.mode in PACING


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    """Whole steps in one epoch (``n // B``): the pacing schedule's default length."""
    if global_batch < 1:
        raise UserError(f"train.global_batch: {global_batch} must be >= 1")
    spe = int(n_samples) // int(global_batch)
    if spe < 1:
        raise UserError(
            f"train.global_batch: {global_batch} exceeds the {n_samples} samples of the "
            "curriculum; use a smaller global batch or a larger curriculum"
        )
    return spe


def epoch_of(spec: OrderSpec, n_samples: int, global_batch: int, step: int) -> int:
    """The epoch of the first sample of global batch `step` (an epoch is n samples of the stream)."""
    steps_per_epoch(n_samples, global_batch)  # validates B <= n
    return (int(step) * int(global_batch)) // int(n_samples)


def steps_for_epochs(n_samples: int, global_batch: int, epochs: int) -> int:
    """Steps that train every sample `epochs` times: ceil(epochs·n / B).

    When B does not divide epochs·n, the last batch also holds the first samples of the next
    epoch's order (the stream, module doc).
    """
    steps_per_epoch(n_samples, global_batch)
    return -(-int(epochs) * int(n_samples) // int(global_batch))


def pool_fraction(spec: OrderSpec, step: int, default_steps: int | None = None) -> float:
    """Fraction of the (easiest-first) data available at `step`; 1.0 for non-pacing orders."""
    if not spec.is_pacing:
        return 1.0
    T = spec.pacing_steps if spec.pacing_steps is not None else default_steps
    if T is None:
        raise ValueError(
            "pool_fraction: pacing_steps is unset; pass default_steps (steps per epoch)"
        )
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
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, _TAG_RANDOM, epoch]))
    )
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


def global_batch_items(
    spec: OrderSpec, n_samples: int, global_batch: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, epochs) of global batch `step`: curriculum positions and each item's epoch
    (its mask draw), both int64 of length global_batch."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    steps_per_epoch(n_samples, global_batch)  # validates B <= n
    n, B = int(n_samples), int(global_batch)
    if spec.is_pacing:
        k = pool_size(spec, n, B, step)
        rng = np.random.Generator(
            np.random.PCG64(
                np.random.SeedSequence([int(spec.seed) & 0xFFFFFFFF, _TAG_PACING, int(step)])
            )
        )
        pos = rng.choice(k, size=B, replace=False).astype(np.int64)
        return pos, np.full(B, epoch_of(spec, n, B, step), dtype=np.int64)
    stream = np.arange(int(step) * B, (int(step) + 1) * B, dtype=np.int64)
    epochs, offsets = np.divmod(stream, n)
    pos = np.empty(B, dtype=np.int64)
    for e in np.unique(epochs):  # one epoch, or two at an epoch boundary
        sel = epochs == e
        pos[sel] = epoch_order(spec, n, int(e))[offsets[sel]]
    return pos, epochs


def global_batch_positions(
    spec: OrderSpec, n_samples: int, global_batch: int, step: int
) -> np.ndarray:
    """Curriculum positions of global batch `step` (int64, length global_batch)."""
    return global_batch_items(spec, n_samples, global_batch, step)[0]


def distinct_positions_seen(
    spec: OrderSpec, n_samples: int, global_batch: int, steps: int
) -> np.ndarray:
    """Boolean mask of the positions trained in steps [0, steps) (a pure function, like the order).

    The training loop keeps it up to date step by step and rebuilds it from here on resume.
    """
    n, B = int(n_samples), int(global_batch)
    seen = np.zeros(n, dtype=bool)
    if not spec.is_pacing:  # the stream: its first steps·B items, one epoch at most matters
        k = min(int(steps) * B, n)
        seen[epoch_order(spec, n, 0)[:k]] = True
        return seen
    for t in range(int(steps)):
        seen[global_batch_positions(spec, n, B, t)] = True
    return seen
