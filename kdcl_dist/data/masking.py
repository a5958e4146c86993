"""Deterministic MLM masking (DESIGN §4.1: masks are pure).

The mask of a sample for draw k is a function of (sample id, k, purpose, seed) only,
never of rank, world size, batch composition or DataLoader worker. That is what makes
scores independent of the cluster and resume replay exact.

Rule (BERT): choose `round(mask_prob · n_candidates)` positions (at least one) among the
non-special tokens; of those, 80% become [MASK], 10% a random token, 10% stay unchanged.
A fixed count rather than Bernoulli draws keeps the number of scored tokens per sample
stable, which lowers the variance of curriculum scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kdcl_dist.utils import id_hash64

IGNORE_INDEX = -100
PURPOSES = {"score": 1, "train": 2, "eval": 3}


@dataclass(frozen=True)
class MaskSpec:
    mask_token_id: int
    vocab_size: int
    special_ids: frozenset = field(default_factory=frozenset)
    mask_prob: float = 0.15
    replace_mask: float = 0.8
    replace_random: float = 0.1

    @classmethod
    def from_tokenizer(cls, tok, mask_prob: float = 0.15) -> MaskSpec:
        if tok.mask_token_id is None:
            raise ValueError("tokenizer has no [MASK] token; a masked-LM tokenizer is required")
        return cls(
            mask_token_id=int(tok.mask_token_id),
            vocab_size=len(tok),
            special_ids=frozenset(int(i) for i in tok.all_special_ids),
            mask_prob=mask_prob,
        )


def mask_rng(sample_id: str, draw: int, purpose: str, seed: int) -> np.random.Generator:
    h = id_hash64(sample_id)
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, PURPOSES[purpose], draw, h & 0xFFFFFFFF, h >> 32])
    return np.random.Generator(np.random.PCG64(ss))


def mask_sample(ids: np.ndarray, sample_id: str, draw: int, purpose: str, seed: int,
                spec: MaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """Return (input_ids, labels) as int64; labels are IGNORE_INDEX except at masked positions."""
    ids = np.asarray(ids, dtype=np.int64)
    rng = mask_rng(sample_id, draw, purpose, seed)
    if spec.special_ids:
        candidates = np.flatnonzero(~np.isin(ids, np.fromiter(spec.special_ids, dtype=np.int64)))
    else:
        candidates = np.arange(len(ids))
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    inputs = ids.copy()
    if len(candidates) == 0:
        return inputs, labels
    n_mask = max(1, int(round(spec.mask_prob * len(candidates))))
    chosen = np.sort(rng.choice(candidates, size=n_mask, replace=False))
    labels[chosen] = ids[chosen]
    u = rng.random(n_mask)
    random_tokens = rng.integers(0, spec.vocab_size, size=n_mask)
    to_mask = u < spec.replace_mask
    to_random = (u >= spec.replace_mask) & (u < spec.replace_mask + spec.replace_random)
    inputs[chosen[to_mask]] = spec.mask_token_id
    inputs[chosen[to_random]] = random_tokens[to_random]
    return inputs, labels
