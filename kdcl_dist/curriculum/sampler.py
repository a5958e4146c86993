"""Rank-aware curriculum sampler and the map-style dataset that DataLoader workers read.

Layout of one optimizer step (docs/design.md §4.3). Global batch t has B positions (order.py). It is
cut into W contiguous rank blocks of B/W positions; rank r's block is cut into `grad_accum`
contiguous micro-batches of `micro_batch` positions:

    global batch t = [ rank 0: mb0 mb1 .. | rank 1: mb0 mb1 .. | ... | rank W-1: ... ]

so for `sequential` every rank trains on the same difficulty band at the same step, and each
global batch is one contiguous range of the order. grad_accum = B / (micro_batch · W).

The data state is one integer, `consumed_samples` (step = consumed_samples // B): resuming at
any world size continues with exactly the next global batch of the order.

Item keys. A sample's MLM mask depends on the epoch (a fresh mask draw each pass, docs/design.md
§4.1), which the position alone does not tell. `rank_micro_batch_keys(step)` therefore yields
integer keys ``epoch · n_samples + position`` (plain ints, so any batch_sampler can carry them)
and `CurriculumDataset` decodes them; a key < n_samples is epoch 0. `rank_micro_batches(step)`
yields the bare positions. The collated batch always carries the bare positions.

Batching (`batching`, docs/training.md "Unpadded batches"). `padded` is the layout above.
`length-grouped` keeps exactly the same global batch t (docs/design.md §4.3: only how batch t is
split into micro-batches and ranks changes) but sorts its B items by (token length, index in the
batch) and cuts the sorted list into the W·G micro-batches of `micro_batch` items each; sorted
micro-batch j goes to rank j mod W as its micro-batch j div W, so at every micro-step all ranks
hold micro-batches of about the same length (ranks wait on each other at every gradient
reduction). Samples of similar length share a micro-batch, so padding to the longest costs
little (real ÷ computed tokens ≈ 0.97 at B = 256, micro-batch 8, max length 512 on the real
abstracts: docs/benchmarks.md). The split is a pure function of (batch t, lengths, W), so a
resume replays it exactly; the loss is normalised by the global masked-token count, so the
gradient is the same sum whatever the split (kd/engine.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kdcl_dist.curriculum.order import (
    OrderSpec,
    epoch_of,
    global_batch_items,
    global_batch_positions,
    steps_per_epoch,
)
from kdcl_dist.errors import UserError

IGNORE_INDEX = -100
BATCHINGS = ("padded", "length-grouped")


class CurriculumSampler:
    def __init__(
        self,
        n_samples: int,
        global_batch: int,
        micro_batch: int,
        world_size: int,
        rank: int,
        spec: OrderSpec,
        batching: str = "padded",
        lengths=None,
    ):
        if batching not in BATCHINGS:
            raise UserError(f"train.batching: {batching!r} is not one of {', '.join(BATCHINGS)}")
        if batching == "length-grouped":
            if lengths is None or len(lengths) != n_samples:
                raise ValueError("length-grouped batching needs the token length of every sample")
        if micro_batch < 1 or world_size < 1:
            raise UserError(
                f"train.micro_batch: micro batch {micro_batch} and world size {world_size} must be >= 1"
            )
        per_step = micro_batch * world_size
        if global_batch % per_step != 0:
            raise UserError(
                f"train.global_batch: {global_batch} is not divisible by micro_batch {micro_batch} x world size "
                f"{world_size} = {per_step}; choose a global batch that is a multiple of {per_step}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n_samples = int(n_samples)
        self.global_batch = int(global_batch)
        self.micro_batch = int(micro_batch)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.spec = spec
        self.grad_accum = global_batch // per_step
        self.steps_per_epoch = steps_per_epoch(self.n_samples, self.global_batch)
        self.consumed_samples = 0
        self.batching = batching
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)

    # -- the order ----------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.consumed_samples // self.global_batch

    def epoch(self, step: int) -> int:
        return epoch_of(self.spec, self.n_samples, self.global_batch, step)

    def global_positions(self, step: int) -> np.ndarray:
        return global_batch_positions(self.spec, self.n_samples, self.global_batch, step)

    def _rank_slice(self, rank: int | None) -> slice:
        r = self.rank if rank is None else int(rank)
        per_rank = self.global_batch // self.world_size
        return slice(r * per_rank, (r + 1) * per_rank)

    def _rank_index(self, positions: np.ndarray, rank: int | None) -> list[np.ndarray]:
        """Indices into global batch t (length B) of this rank's micro-batches, in order."""
        m, G, W = self.micro_batch, self.grad_accum, self.world_size
        r = self.rank if rank is None else int(rank)
        if self.batching == "padded":
            sl = self._rank_slice(r)
            block = np.arange(sl.start, sl.stop)
            return [block[i * m : (i + 1) * m] for i in range(G)]
        # length-grouped: stable sort by (length, index in the batch); sorted micro-batch
        # j = g·W + r is rank r's g-th (module doc)
        order = np.lexsort((np.arange(len(positions)), self.lengths[positions]))
        return [order[(g * W + r) * m : (g * W + r + 1) * m] for g in range(G)]

    def rank_block(self, step: int, rank: int | None = None) -> np.ndarray:
        """This rank's positions of global batch `step` (its micro-batches laid end to end)."""
        return np.concatenate(self.rank_micro_batches(step, rank))

    def rank_micro_batches(self, step: int, rank: int | None = None) -> list[np.ndarray]:
        """This rank's `grad_accum` micro-batches (positions) of global batch `step`."""
        pos = self.global_positions(step)
        return [pos[i] for i in self._rank_index(pos, rank)]

    def rank_micro_batch_keys(self, step: int, rank: int | None = None) -> list[np.ndarray]:
        """Like rank_micro_batches but as dataset keys epoch·n + position (see module doc);
        at an epoch boundary one batch holds items of two epochs."""
        pos, epochs = global_batch_items(self.spec, self.n_samples, self.global_batch, step)
        keys = epochs * np.int64(self.n_samples) + pos
        return [keys[i] for i in self._rank_index(pos, rank)]

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "consumed_samples": int(self.consumed_samples),
            "n_samples": self.n_samples,
            "global_batch": self.global_batch,
            "mode": self.spec.mode,
            "seed": int(self.spec.seed),
            "pacing_f0": float(self.spec.pacing_f0),
            "pacing_steps": None if self.spec.pacing_steps is None else int(self.spec.pacing_steps),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore consumed_samples; refuse a state saved for another order (it would replay other data)."""
        mine = self.state_dict()
        keys = ["n_samples", "global_batch", "mode", "seed"]
        if self.spec.is_pacing:  # the pool schedule is part of a pacing order
            keys += ["pacing_f0", "pacing_steps"]
        for k in keys:
            if k not in sd:
                raise UserError(
                    f"checkpoint sampler state: key '{k}' missing; the checkpoint is from an "
                    "incompatible version, start a new run"
                )
            if sd[k] != mine[k]:
                raise UserError(
                    f"checkpoint sampler state: {k} = {sd[k]!r} but this run has {mine[k]!r}; resuming would "
                    f"not continue the same order; rerun with train.{_flag(k)} = {sd[k]!r} or start a new --out"
                )
        consumed = int(sd["consumed_samples"])
        if consumed % self.global_batch:
            raise UserError(
                f"checkpoint sampler state: consumed_samples {consumed} is not a multiple of the "
                f"global batch {self.global_batch}; the checkpoint is inconsistent"
            )
        self.consumed_samples = consumed


def _flag(key: str) -> str:
    return {"n_samples": "curriculum (same manifest)", "mode": "order"}.get(key, key)


class CurriculumDataset(torch.utils.data.Dataset):
    """Masked training samples by key (position or epoch·n + position, see the module doc).

    `masker`: a tokenizer (its MaskSpec is derived) or a `MaskSpec`. The mask is drawn with
    `mask_sample(ids, meta['id'], draw=epoch, purpose='train', seed)`: a pure function of the
    sample and epoch, so any worker, rank or resume produces the same tensors.
    """

    def __init__(
        self,
        shards,
        masker,
        seed: int = 0,
        spec: OrderSpec | None = None,
        purpose: str = "train",
        mask_prob: float = 0.15,
    ):
        from kdcl_dist.data.masking import MaskSpec

        self.shards = shards
        self.mask_spec = (
            masker if isinstance(masker, MaskSpec) else MaskSpec.from_tokenizer(masker, mask_prob)
        )
        self.seed = int(seed)
        self.spec = spec
        self.purpose = purpose
        self.n = len(shards)

    def __len__(self) -> int:
        return self.n

    def decode_key(self, key) -> tuple[int, int]:
        if isinstance(key, (tuple, list)):
            position, epoch = int(key[0]), int(key[1])
        else:
            epoch, position = divmod(int(key), self.n)
        return position, epoch

    def __getitem__(self, key) -> dict:
        from kdcl_dist.data.masking import mask_sample

        position, epoch = self.decode_key(key)
        s = self.shards.get(position)
        sid = s.meta.get("id", s.key)
        input_ids, labels = mask_sample(
            s.ids, sid, draw=epoch, purpose=self.purpose, seed=self.seed, spec=self.mask_spec
        )
        return {
            "position": position,
            "epoch": epoch,
            "id": sid,
            "input_ids": input_ids,
            "labels": labels,
            "score": float(s.meta.get("score", float("nan"))),
        }


def collate(batch: list[dict], pad_id: int) -> dict:
    """Pad a list of dataset items to the longest: input_ids/attention_mask/labels (-100 pad),
    positions, epochs (int64) and scores (float64) as tensors."""
    L = max(len(b["input_ids"]) for b in batch)
    n = len(batch)
    input_ids = torch.full((n, L), int(pad_id), dtype=torch.long)
    attn = torch.zeros((n, L), dtype=torch.long)
    labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        input_ids[i, :k] = torch.as_tensor(b["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.as_tensor(b["labels"], dtype=torch.long)
        attn[i, :k] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attn,
        "labels": labels,
        "positions": torch.tensor([b["position"] for b in batch], dtype=torch.long),
        "epochs": torch.tensor([b.get("epoch", 0) for b in batch], dtype=torch.long),
        "scores": torch.tensor([b["score"] for b in batch], dtype=torch.float64),
    }


def spec_from_state(sd: dict) -> OrderSpec:
    """The OrderSpec a sampler state_dict was saved with (for tools that inspect checkpoints)."""
    fields = {f.name for f in dataclasses.fields(OrderSpec)}
    return OrderSpec(**{k: sd[k] for k in fields if k in sd})
