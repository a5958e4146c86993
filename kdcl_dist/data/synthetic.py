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
