"""Bookkeeping of non-finite (skipped) training steps: count, warn, abort after N in a row.

`KDEngine.step` decides whether a step is skipped (one all-reduced flag, so every rank takes
the same decision) and applies no update for it; this class only keeps the record that the
training loop logs, checkpoints and checks:

- `total`: non-finite steps so far (skipped; their samples count as consumed),
- `in_a_row`: the current run of consecutive non-finite steps (0 after a good step),
- `steps`: the step numbers (1-based, as in metrics.jsonl) that were skipped,
- `loss_scale_overflows`: fp16 steps that DeepSpeed's dynamic loss scaler skipped although the
  loss was finite (the normal loss-scale search; neither counted above nor a reason to abort).

The record travels in the checkpoint's client_state, so a resumed run continues the count.
"""

from __future__ import annotations

import logging

from kdcl_dist.errors import UserError

log = logging.getLogger("kdcl_dist.train")


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int, rank: int = 0):
        self.max_in_a_row = int(max_in_a_row)  # 0: never abort
        self.rank = rank
        self.total = 0
        self.in_a_row = 0
        self.steps: list[int] = []
        self.loss_scale_overflows = 0
        self._last = (0, "")

    def update(self, step: int, info: dict) -> bool:
        """Record step `step` (1-based) from `KDEngine.step(...)["nonfinite"]`; True if it was skipped."""
        if info.get("loss_scale_overflow"):
            # fp16: DeepSpeed halves the loss scale and retries; not a divergence (and not a
            # reason to reset a run of non-finite steps either)
            self.loss_scale_overflows += 1
            return False
        if not info.get("skipped"):
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        self.steps.append(int(step))
        self._last = (int(step), _describe(info))
        limit = (
            f"abort after {self.max_in_a_row} in a row" if self.max_in_a_row else "never aborting"
        )
        if self.rank == 0:
            log.warning(
                "step %d: non-finite %s; step skipped (no weight or optimizer update; its samples count "
                "as consumed); %d in a row, %d in total (%s)",
                step,
                self._last[1],
                self.in_a_row,
                self.total,
                limit,
            )
        return True

    def check(self) -> None:
        """UserError once `max_in_a_row` consecutive steps were non-finite.

        Called on every rank after the step was logged; the record is identical on all ranks
        (the engine all-reduces the decision), so all of them stop at the same step.
        """
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            step, what = self._last
            first = step - self.in_a_row + 1
            raise UserError(
                f"train.max_nonfinite_steps: {self.in_a_row} non-finite steps in a row (steps {first}-{step}; "
                f"last: {what}); they were skipped, so the weights are those after step {first - 1}; lower --lr, "
                "check the data and the teacher, or raise max_nonfinite_steps (0: never abort)"
            )

    def state_dict(self) -> dict:
        return {
            "total": self.total,
            "in_a_row": self.in_a_row,
            "steps": list(self.steps),
            "loss_scale_overflows": self.loss_scale_overflows,
        }

    def load_state_dict(self, state: dict | None) -> None:
        """Continue the record of a checkpoint (checkpoints older than this feature have none)."""
        state = state or {}
        self.total = int(state.get("total", 0))
        self.in_a_row = int(state.get("in_a_row", 0))
        self.steps = [int(s) for s in state.get("steps", [])]
        self.loss_scale_overflows = int(state.get("loss_scale_overflows", 0))

    def summary(self) -> dict:
        return {
            "nonfinite_steps": self.total,
            "skipped_steps": list(self.steps),
            "loss_scale_overflows": self.loss_scale_overflows,
        }


def _describe(info: dict) -> str:
    terms = info.get("terms") or ["loss"]
    ranks = info.get("ranks") or []
    where = f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks else ""
    return f"{' + '.join(terms)}{where}"
