"""Deterministic MLM masking (docs/design.md §4.1: masks are pure).

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
            from kdcl_dist.data.tokenizer import check_mlm_tokenizer

            check_mlm_tokenizer(tok, getattr(tok, "name_or_path", "") or "the tokenizer")
        return cls(
            mask_token_id=int(tok.mask_token_id),
            vocab_size=len(tok),
            special_ids=frozenset(int(i) for i in tok.all_special_ids),
            mask_prob=mask_prob,
        )


def mask_rng(sample_id: str, draw: int, purpose: str, seed: int) -> np.random.Generator:
    h = id_hash64(sample_id)
    ss = np.random.SeedSequence(
        [seed & 0xFFFFFFFF, PURPOSES[purpose], draw, h & 0xFFFFFFFF, h >> 32]
    )
    return np.random.Generator(np.random.PCG64(ss))


def mask_sample(
    ids: np.ndarray, sample_id: str, draw: int, purpose: str, seed: int, spec: MaskSpec
) -> tuple[np.ndarray, np.ndarray]:
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


# ---- the same masks for many rows at once (scoring's host side) ------------------------------
#
# `mask_many` returns exactly what `mask_sample` returns for every (sample, draw), row by row
# (tests compare them), at a fraction of the per-row cost: the special-token test is one
# table lookup over the concatenated ids, the RNG seeding is computed for all rows in numpy
# (SeedSequence's hash and PCG64's seeding step, replicated; self-checked against numpy once
# per process, falling back to numpy's own objects should they ever differ), and the 80/10/10
# corruption is applied to all rows in three vector operations. Only the RNG's draws
# (choice, random, integers) stay per row, through numpy's own Generator, so the streams
# are numpy's.

_M32 = 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_PCG_MULT = (2549297995355413924 << 64) | 4865540595714422341
_M128 = (1 << 128) - 1


def _seed_words(entropy: np.ndarray) -> np.ndarray:
    """SeedSequence(entropy row).generate_state(4, uint64) for each row of a [n, w] uint32 array
    (w >= 4 words, each entropy int < 2**32: what `mask_rng` passes), as [n, 4] uint64."""
    n, w = entropy.shape
    c = [_INIT_A]

    def hashmix(v):
        v = v ^ np.uint32(c[0])
        c[0] = (c[0] * _MULT_A) & _M32
        v = v * np.uint32(c[0])
        return v ^ (v >> np.uint32(16))

    def mix(x, y):
        r = np.uint32(_MIX_L) * x - np.uint32(_MIX_R) * y
        return r ^ (r >> np.uint32(16))

    e = entropy.astype(np.uint32)
    pool = [hashmix(e[:, i]) for i in range(4)]
    for s in range(4):
        for d in range(4):
            if s != d:
                pool[d] = mix(pool[d], hashmix(pool[s]))
    for s in range(4, w):
        for d in range(4):
            pool[d] = mix(pool[d], hashmix(e[:, s]))
    out = np.empty((n, 8), dtype=np.uint32)
    h = _INIT_B
    for i in range(8):
        v = pool[i % 4] ^ np.uint32(h)
        h = (h * _MULT_B) & _M32
        v = v * np.uint32(h)
        out[:, i] = v ^ (v >> np.uint32(16))
    return out.astype("<u4").view("<u8")


def _pcg64_state(words) -> dict:
    """PCG64's state after seeding with generate_state(4, uint64) = words (pcg64_set_seed)."""
    seed = (int(words[0]) << 64) | int(words[1])
    inc = ((((int(words[2]) << 64) | int(words[3])) << 1) | 1) & _M128
    s = inc  # state 0, one step
    s = (s + seed) & _M128
    s = (s * _PCG_MULT + inc) & _M128
    return {
        "bit_generator": "PCG64",
        "state": {"state": s, "inc": inc},
        "has_uint32": 0,
        "uinteger": 0,
    }


def _entropy(hashes: np.ndarray, draws: np.ndarray, purpose: str, seed: int) -> np.ndarray:
    """The SeedSequence entropy words `mask_rng` uses, one row per (hash, draw)."""
    n = len(hashes)
    e = np.empty((n, 5), dtype=np.uint32)
    e[:, 0] = seed & _M32
    e[:, 1] = PURPOSES[purpose]
    e[:, 2] = draws
    e[:, 3] = hashes & np.uint64(_M32)
    e[:, 4] = hashes >> np.uint64(32)
    return e


_FAST_SEEDING: bool | None = None


def _fast_seeding_ok() -> bool:
    """Whether the replicated seeding equals numpy's (checked once per process)."""
    global _FAST_SEEDING
    if _FAST_SEEDING is None:
        try:
            ids = [f"check-{i}" for i in range(6)] + ["", "x" * 300]
            hashes = np.array([id_hash64(s) for s in ids], dtype=np.uint64)
            draws = np.arange(len(ids), dtype=np.int64) % 3
            for seed in (0, 1234, 2**32 + 5):
                words = _seed_words(_entropy(hashes, draws, "score", seed))
                bg = np.random.PCG64()
                for j, s in enumerate(ids):
                    bg.state = _pcg64_state(words[j])
                    want = mask_rng(s, int(draws[j]), "score", seed)
                    if (
                        bg.state != want.bit_generator.state
                        or bg.random_raw(3).tolist() != want.bit_generator.random_raw(3).tolist()
                    ):
                        raise ValueError("seeding differs")
            _FAST_SEEDING = True
        except (
            Exception
        ):  # a numpy whose internals differ: use its own objects (slower, same masks)
            _FAST_SEEDING = False
    return _FAST_SEEDING


@dataclass
class MaskedRows:
    """Rows r = i*K + k (sample i, draw k) of `mask_many`, in flat (CSR) form.

    inputs:  [K, T] masked input ids of draw k over the concatenation of all samples' ids;
    start:   [n+1] offset of sample i in the concatenation (row r spans start[i]..start[i+1]);
    pos/pos_start: masked positions of row r, sorted, as positions *within the sample*, in
             pos[pos_start[r]:pos_start[r+1]];
    flat:    [T] the original ids (int64), concatenated."""

    inputs: np.ndarray
    start: np.ndarray
    pos: np.ndarray
    pos_start: np.ndarray
    flat: np.ndarray
    draws: int

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of row r, as `mask_sample` returns them."""
        i, k = divmod(r, self.draws)
        a, b = int(self.start[i]), int(self.start[i + 1])
        labels = np.full(b - a, IGNORE_INDEX, dtype=np.int64)
        p = self.pos[self.pos_start[r] : self.pos_start[r + 1]]
        labels[p] = self.flat[a + p]
        return self.inputs[k, a:b].copy(), labels


def _special_flags(flat: np.ndarray, spec: MaskSpec) -> np.ndarray:
    if not spec.special_ids:
        return np.zeros(len(flat), dtype=bool)
    sp = np.fromiter(spec.special_ids, dtype=np.int64)
    if len(flat) == 0 or flat.min() < 0 or sp.min() < 0:
        return np.isin(flat, sp)
    lut = np.zeros(max(int(flat.max()), int(sp.max())) + 1, dtype=bool)
    lut[sp] = True
    return lut[flat]


def mask_many(
    toks: list[np.ndarray],
    sample_ids: list[str],
    draws: int,
    purpose: str,
    seed: int,
    spec: MaskSpec,
) -> MaskedRows:
    """`mask_sample(toks[i], sample_ids[i], k, purpose, seed, spec)` for all i and k < draws (same output)."""
    n = len(toks)
    lens = np.fromiter((len(t) for t in toks), dtype=np.int64, count=n)
    start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=start[1:])
    flat = (
        np.concatenate([np.asarray(t, dtype=np.int64) for t in toks])
        if n
        else np.zeros(0, np.int64)
    )
    cand_flag = ~_special_flags(flat, spec)
    cand = np.flatnonzero(cand_flag)  # global positions of candidates
    cstart = np.concatenate([[0], np.cumsum(cand_flag, dtype=np.int64)])[
        start
    ]  # candidates before sample i
    ncand = np.diff(cstart)
    nmask = np.where(
        ncand > 0, np.maximum(1, np.rint(spec.mask_prob * ncand.astype(np.float64))), 0
    ).astype(np.int64)

    K = int(draws)
    rows = n * K
    hashes = np.fromiter((id_hash64(s) for s in sample_ids), dtype=np.uint64, count=n)
    fast = _fast_seeding_ok()
    words = (
        _seed_words(
            _entropy(np.repeat(hashes, K), np.tile(np.arange(K, dtype=np.int64), n), purpose, seed)
        )
        if fast and rows
        else None
    )
    bg = np.random.PCG64()
    gen = np.random.Generator(bg)
    chosen_l, u_l, rnd_l = [], [], []
    r = 0
    for i in range(n):
        m = int(nmask[i])
        c = cand[cstart[i] : cstart[i + 1]]
        for k in range(K):
            if m:
                if fast:
                    bg.state = _pcg64_state(words[r])
                    g = gen
                else:
                    g = mask_rng(sample_ids[i], k, purpose, seed)
                chosen_l.append(np.sort(g.choice(c, size=m, replace=False)))
                u_l.append(g.random(m))
                rnd_l.append(g.integers(0, spec.vocab_size, size=m))
            r += 1
    inputs = np.broadcast_to(flat, (K, len(flat))).copy()
    per_row = np.repeat(nmask, K)  # masked count of row r
    pos_start = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(per_row, out=pos_start[1:])
    if chosen_l:
        chosen = np.concatenate(chosen_l)  # global positions, row-major
        u = np.concatenate(u_l)
        rnd = np.concatenate(rnd_l)
        draw_of = np.repeat(np.tile(np.arange(K), n), per_row)
        to_mask = u < spec.replace_mask
        to_random = (u >= spec.replace_mask) & (u < spec.replace_mask + spec.replace_random)
        inputs[draw_of[to_mask], chosen[to_mask]] = spec.mask_token_id
        inputs[draw_of[to_random], chosen[to_random]] = rnd[to_random]
        pos = chosen - np.repeat(np.repeat(start[:-1], K), per_row)
    else:
        pos = np.zeros(0, dtype=np.int64)
    return MaskedRows(inputs, start, pos, pos_start, flat, K)
