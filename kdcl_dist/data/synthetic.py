"""A small synthetic biomedical-style corpus: the demo's fallback when no corpus is given.

It is labelled synthetic everywhere it is used. Documents vary in length and in
vocabulary rarity so that a curriculum (easy -> hard) has something to sort.
"""

from __future__ import annotations

import random

_COMMON = (
    "the patients were treated with and the results of study showed that in a significant "
    "increase decrease was observed among group compared to control after weeks of therapy "
    "clinical trial response rate disease cells protein expression levels"
).split()
_RARE = (
    "cyclooxygenase thrombocytopenia angiotensin glomerulonephritis immunohistochemistry "
    "pharmacokinetics metalloproteinase hepatocellular cardiomyopathy leukocytosis "
    "phosphorylation transcriptional mitochondrial apoptosis endothelial cytokine "
    "interleukin lymphocyte carcinoma neuropathy"
).split()


def synthetic_documents(n: int = 2000, seed: int = 0):
    """Yield (id, text) pairs; about half the documents use rare terms (the 'hard' ones)."""
    rng = random.Random(seed)
    for i in range(n):
        rare_share = rng.random() * 0.6
        sentences = []
        for _ in range(rng.randint(2, 8)):
            words = [
                rng.choice(_RARE) if rng.random() < rare_share else rng.choice(_COMMON)
                for _ in range(rng.randint(6, 18))
            ]
            sentences.append(" ".join(words).capitalize() + ".")
        yield f"synthetic-{i:07d}", " ".join(sentences)


# Words per abstract of the real PubMed sample ($KDCL_DATA_DIR/pubmed/abstracts.jsonl, 12,073
# abstracts): log-normal, mean of log 5.10, sd 0.47 (median 179 words; 1%/99%: 41/371).
_LOG_WORDS = (5.10, 0.47)


def abstract_corpus(n: int, seed: int = 0, batch: int = 10000):
    """Yield n (id, text) synthetic abstracts with the real corpus's length distribution.

    numpy draws the lengths and words in batches (millions of documents in minutes); the
    vocabulary is the demo's plus numbered terms, so that tokenization does real work.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = _COMMON + _RARE + [f"{w[:5]}{k}" for w in _RARE for k in range(40)]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.2  # Zipf-like word frequencies
    p /= p.sum()
    done = 0
    while done < n:
        m = min(batch, n - done)
        lens = np.clip(rng.lognormal(*_LOG_WORDS, size=m).astype(int), 20, 1500)
        words = [vocab[i] for i in rng.choice(len(vocab), size=int(lens.sum()), p=p).tolist()]
        at = 0
        for k, ln in enumerate(lens.tolist()):
            w = words[at : at + ln]
            at += ln
            # sentences of about 20 words
            text = ". ".join(" ".join(w[i : i + 20]) for i in range(0, ln, 20)) + "."
            yield f"synthetic-{done + k:08d}", text.capitalize()
        done += m
