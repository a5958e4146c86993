"""Teacher/student models: build the tiny pair, load any HF masked-LM pair, check vocabularies.

The paper pairs BioBERT (BERT-base) with DistilBERT; the tiny preset shrinks both
architectures. Any two HF masked-LM checkpoints (local path or hub name) can be used,
provided they share one vocabulary: that is checked before any work starts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from kdcl_dist.errors import UserError
from kdcl_dist.utils import HF_LOAD_LOCK


def build_config(spec: dict, vocab_size: int, tok, max_positions: int = 512):
    from transformers import BertConfig, DistilBertConfig

    kind = spec.get("type", "bert")
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_layers"],
            num_attention_heads=spec["num_heads"], intermediate_size=spec["intermediate_size"],
            max_position_embeddings=max_positions, pad_token_id=tok.pad_token_id,
        )
    if kind == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab_size, dim=spec["hidden_size"], n_layers=spec["num_layers"],
            n_heads=spec["num_heads"], hidden_dim=spec["intermediate_size"],
            max_position_embeddings=max_positions, pad_token_id=tok.pad_token_id,
        )
    raise UserError(f"models.{kind}: unknown model type; allowed: bert, distilbert")


def init_model_dir(spec: dict, tok, out_dir: str | os.PathLike, seed: int, max_positions: int = 512):
    """Randomly initialise a masked-LM from `spec` and save it (safetensors) with the tokenizer."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    config = build_config(spec, len(tok), tok, max_positions)
    model = AutoModelForMaskedLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    from kdcl_dist.utils import apply_umask_modes

    apply_umask_modes(out)   # safetensors writes its file 0600: the team must be able to read the model
    return model


def check_materialized(model, source: str):
    """Raise a UserError naming the tensors still on the meta device (a load that did not finish)."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise UserError(f"{source}: {len(meta)} tensors were not loaded (still on the meta device: "
                        f"{', '.join(meta[:3])}); the checkpoint is incomplete or was loaded concurrently")
    return model


def load_pretrained(auto_cls, name_or_path, **kwargs):
    """`auto_cls.from_pretrained(name_or_path, **kwargs)` under the process-wide HF load lock
    (`utils.HF_LOAD_LOCK`), refused by name when a tensor was left on the meta device."""
    with HF_LOAD_LOCK:
        model = auto_cls.from_pretrained(name_or_path, **kwargs)
    return check_materialized(model, str(name_or_path))


def load_mlm(name_or_path: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Load an HF masked-LM from a local directory or a hub name (thread-safe)."""
    from transformers import AutoModelForMaskedLM

    p = Path(name_or_path)
    if (p.is_absolute() or name_or_path.startswith(".")) and not p.exists():
        raise UserError(f"{name_or_path}: model path not found; pass a model directory or a hub name")
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return load_pretrained(AutoModelForMaskedLM, name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{name_or_path}: cannot load a masked-LM model ({str(e).splitlines()[0]}); "
            "pass a local HF model directory or a reachable hub name"
        ) from e


def model_fingerprint(model) -> str:
    """Hash of config + a sample of parameter bytes: changes when the weights change."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().flatten()
        h.update(name.encode())
        h.update(t[: 4096].float().cpu().numpy().tobytes())
        h.update(t.float().sum().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_vocabulary(teacher_tok, student_tok, teacher_name: str, student_name: str) -> None:
    """Refuse a teacher/student pair whose vocabularies differ (KD compares token distributions)."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = len(set(tv) - set(sv))
        only_s = len(set(sv) - set(tv))
        raise UserError(
            f"teacher {teacher_name} and student {student_name} have different vocabularies "
            f"({len(tv)} vs {len(sv)} tokens; {only_t} only in the teacher, {only_s} only in the student, "
            "or ids differ); KD needs one shared tokenizer: pick a pair trained with the same vocabulary"
        )


def mlm_parts(model):
    """(encoder returning hidden states, LM head mapping hidden -> vocab logits) for BERT/DistilBERT.

    Splitting the two lets the engine run the LM head on masked positions only.
    """
    base = getattr(model, model.base_model_prefix)
    if hasattr(model, "cls"):  # BertForMaskedLM
        head = model.cls
    elif hasattr(model, "vocab_projector"):  # DistilBertForMaskedLM
        head = _DistilBertHead(model)
    else:
        head = None
    return base, head


class _DistilBertHead(torch.nn.Module):
    """DistilBERT's MLM head as one callable: transform -> act -> layer norm -> projector."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, h):
        m = self.m
        x = m.vocab_transform(h)
        x = m.activation(x)
        x = m.vocab_layer_norm(x)
        return m.vocab_projector(x)


# ---- last encoder layer on masked positions only (exact) ---------------------------------------
#
# A masked-LM loss needs the final hidden states at the masked positions only. Every layer
# but the last must run everywhere (the last layer's keys and values read all positions),
# but in the last layer the query projection, attention output, output projection, FFN and
# layer norms act position-wise: they can run on the ~15% masked positions alone. Together
# with the LM head on masked positions only this is the same computation as the full
# forward, up to float round-off (tests/test_scoring.py compares it with HF's forward).

def _stack(model):
    """(embed(ids) -> hidden, layers, last-layer function) for BERT / DistilBERT, else None."""
    base = getattr(model, model.base_model_prefix, None)
    cfg = model.config
    if base is None or getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return None
    # structural checks, so that a look-alike architecture (other residual/norm order,
    # relative positions) falls back to the full forward instead of being re-expressed wrongly
    enc = getattr(getattr(base, "encoder", None), "layer", None)
    if enc is not None and type(enc[-1]).__name__ == "BertLayer":
        return (lambda ids: base.embeddings(input_ids=ids)), enc, _bert_last_masked
    tr = getattr(getattr(base, "transformer", None), "layer", None)
    if tr is not None and type(tr[-1]).__name__ == "TransformerBlock" and hasattr(tr[-1], "sa_layer_norm"):
        return (lambda ids: base.embeddings(ids)), tr, _distilbert_last_masked
    return None


def supports_encode_masked(model) -> bool:
    return _stack(model) is not None and mlm_parts(model)[1] is not None


def row_counts(rows: torch.Tensor, B: int) -> torch.Tensor:
    """Masked positions per row. (torch.bincount on CUDA reads its max back to the host: a
    sync per batch; index_add_ does not.)"""
    return torch.zeros(B, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))


def _query_slots(rows: torch.Tensor, B: int, q_max: int | None = None) -> tuple[torch.Tensor, int]:
    """Slot of each masked position among its row's masked positions, and the max count per row.

    Pass q_max when the caller knows it (the scoring pass computes it on the host): reading it
    from the device would wait for the GPU at every batch."""
    M = rows.numel()
    counts = row_counts(rows, B)
    if q_max is None:
        q_max = int(counts.max()) if M else 0
    order = torch.argsort(rows, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot_sorted = torch.arange(M, device=rows.device) - starts[rows[order]]
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    return slot, q_max


def _mha_masked(xm, h, attention_mask, rows, slot, q_max, n_heads, q_lin, k_lin, v_lin):
    B, L, H = h.shape
    d = H // n_heads
    k = k_lin(h).view(B, L, n_heads, d).transpose(1, 2)
    v = v_lin(h).view(B, L, n_heads, d).transpose(1, 2)
    q = q_lin(xm)
    grid = q.new_zeros(B, q_max, H)
    grid[rows, slot] = q
    grid = grid.view(B, q_max, n_heads, d).transpose(1, 2)
    keep = attention_mask.to(torch.bool)[:, None, None, :] if attention_mask is not None else None
    o = torch.nn.functional.scaled_dot_product_attention(grid, k, v, attn_mask=keep, scale=d ** -0.5)
    return o.transpose(1, 2).reshape(B, q_max, H)[rows, slot]


def _bert_last_masked(layer, h, attention_mask, rows, cols, q_max=None):
    slot, q_max = _query_slots(rows, h.shape[0], q_max)
    xm = h[rows, cols]
    sa = layer.attention.self
    a = _mha_masked(xm, h, attention_mask, rows, slot, q_max, sa.num_attention_heads, sa.query, sa.key, sa.value)
    a = layer.attention.output(a, xm)            # dense -> dropout -> LayerNorm(. + residual)
    return layer.output(layer.intermediate(a), a)  # dense -> act, dense -> dropout -> LayerNorm


def _distilbert_last_masked(layer, h, attention_mask, rows, cols, q_max=None):
    slot, q_max = _query_slots(rows, h.shape[0], q_max)
    xm = h[rows, cols]
    at = layer.attention
    a = _mha_masked(xm, h, attention_mask, rows, slot, q_max, at.n_heads, at.q_lin, at.k_lin, at.v_lin)
    a = layer.sa_layer_norm(at.out_lin(a) + xm)
    return layer.output_layer_norm(layer.ffn.ff_chunk(a) + a)


def _layer_mask(model, h: torch.Tensor, attention_mask: torch.Tensor | None, padded: bool | None):
    """The attention mask the HF layers take, built without a device-to-host sync when the
    caller knows whether the batch has padding (HF's builder asks the GPU `mask.all()`)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if attention_mask is None or (padded is False and impl in ("sdpa", "eager")):
        return None   # nothing to hide: HF gives None here too
    if padded and impl == "sdpa":   # boolean, True = attend; broadcast over heads and queries
        return attention_mask.to(torch.bool)[:, None, None, :]
    if padded and impl == "eager":  # additive, as HF builds it
        return (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.config, inputs_embeds=h, attention_mask=attention_mask)


def encode_masked(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  rows: torch.Tensor, cols: torch.Tensor, q_max: int | None = None,
                  padded: bool | None = None) -> torch.Tensor:
    """Final hidden states [M, H] at positions (rows[m], cols[m]) only; equal to
    `encoder(input_ids, attention_mask).last_hidden_state[rows, cols]` to float round-off.

    Embeddings and all layers but the last run through the HF modules on every position;
    the last layer is re-expressed with that layer's own weight modules so that everything
    after its key/value projections runs on the requested positions only. BERT and
    DistilBERT (encoder-only); `supports_encode_masked(model)` says whether it applies.
    q_max (most masked positions in one row) and padded (whether any row is shorter than the
    batch) are optional; when the caller knows them, nothing waits for the GPU.
    """

    parts = _stack(model)
    if parts is None:
        raise UserError(f"{type(model).__name__}: encode_masked supports BERT and DistilBERT encoders only")
    embed, layers, last = parts
    if rows.numel() == 0:   # nothing masked in this batch (e.g. samples without maskable tokens)
        return torch.zeros(0, model.config.hidden_size, dtype=next(model.parameters()).dtype, device=input_ids.device)
    h = embed(input_ids)
    if len(layers) > 1:
        mask = _layer_mask(model, h, attention_mask, padded)
        for layer in layers[:-1]:
            h = layer(h, mask)
    return last(layers[-1], h, attention_mask, rows, cols, q_max)

