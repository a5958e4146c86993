"""KD losses on masked positions (pure torch; computed in fp32 whatever the model dtype).

Notation: M rows (one per masked token of this rank's micro-batch; the LM head ran only on
those hidden states), V vocabulary, τ temperature, N = the masked-token count of the whole
global batch (all ranks, all micro-batches), λ_i the reliance of row i's sample.

    ce_i  = −log softmax(s_i)[y_i]                                   (MLM cross-entropy)
    kl_i  = Σ_v softmax(t_i/τ)_v · (log softmax(t_i/τ)_v − log softmax(s_i/τ)_v)
    mlm   = Σ_i ce_i / N
    kd    = τ² · Σ_i kl_i / N
    loss  = Σ_i ((1 − λ_i)·ce_i + λ_i·τ²·kl_i) / N

Dividing by the *global* N (not the local row count) makes the sum of every rank's loss over
every micro-batch equal the loss of the whole global batch, however the masked tokens are
spread over ranks. DeepSpeed/DDP *average* gradients over ranks and divide by the gradient
accumulation steps, so the engine multiplies this loss by world_size · grad_accum before
backward to get exactly the gradient of the global-batch loss. τ² keeps the KD gradient's
scale independent of τ (Hinton et al. 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _per_row_terms(student_logits, teacher_logits, labels, temperature):
    s = student_logits.float()
    t = teacher_logits.detach().float()
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(s, labels.clamp_min(0), reduction="none") * valid
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    return ce, kl, valid


def _lam(lam, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(lam, dtype=torch.float32, device=like.device).expand_as(like)


def masked_kd_losses(
    student_logits, teacher_logits, labels, lam, temperature: float, n_masked_global: float
) -> dict:
    """Loss of this rank's masked rows; rows with label −100 (if any) count in neither term.

    `lam`: a float or a [M] tensor (per-token λ, i.e. each row gets its sample's λ).
    Returns {'loss', 'mlm', 'kd'} as 0-dim fp32 tensors (only 'loss' needs the graph).
    """
    ce, kl, valid = _per_row_terms(student_logits, teacher_logits, labels, temperature)
    n = float(max(n_masked_global, 1.0))
    tau2 = float(temperature) ** 2
    kl_t = tau2 * kl * valid
    lam_t = _lam(lam, ce)
    loss = ((1.0 - lam_t) * ce + lam_t * kl_t).sum() / n
    return {"loss": loss, "mlm": ce.sum().detach() / n, "kd": kl_t.sum().detach() / n}


def kd_all_positions(
    student_logits,
    teacher_logits,
    labels,
    lam,
    temperature: float,
    n_masked_global: float,
    n_tokens_global: float,
) -> dict:
    """`--kd-positions all`: rows are every non-padding token; labels are −100 except at masked ones.

    mlm  = Σ_{i masked} ce_i / N_masked
    kd   = τ² · Σ_{j all} kl_j / N_tokens
    loss = Σ_{i masked} (1 − λ_i)·ce_i / N_masked + Σ_j λ_j·τ²·kl_j / N_tokens
    """
    ce, kl, _ = _per_row_terms(student_logits, teacher_logits, labels, temperature)
    nm = float(max(n_masked_global, 1.0))
    nt = float(max(n_tokens_global, 1.0))
    kl_t = float(temperature) ** 2 * kl
    lam_t = _lam(lam, ce)
    loss = ((1.0 - lam_t) * ce).sum() / nm + (lam_t * kl_t).sum() / nt
    return {"loss": loss, "mlm": ce.sum().detach() / nm, "kd": kl_t.sum().detach() / nt}


def hidden_cosine_loss(
    s_hidden, t_hidden, mask=None, n_global: float | None = None
) -> torch.Tensor:
    """Σ_i (1 − cos(h^s_i, h^t_i)) / n over the selected rows (hidden sizes must match).

    `mask`: a bool [rows] tensor selecting rows, or None for all rows. A number passed as the
    third argument is taken as `n_global` (the global row count to normalise by); without it
    the local row count is used.
    """
    if mask is not None and not torch.is_tensor(mask):
        mask, n_global = None, float(mask)
    s = s_hidden.float()
    t = t_hidden.detach().float()
    if mask is not None:
        s, t = s[mask], t[mask]
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"hidden_cosine_loss: hidden sizes differ ({s.shape[-1]} vs {t.shape[-1]})"
        )
    n = float(n_global) if n_global is not None else float(max(s.shape[0], 1))
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).sum() / max(n, 1.0)


def top1_agreement(student_logits, teacher_logits) -> float:
    """Fraction of rows where the student's and teacher's argmax tokens agree."""
    if student_logits.shape[0] == 0:
        return float("nan")
    return float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())
