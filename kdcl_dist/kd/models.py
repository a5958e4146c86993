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
    return model


def load_mlm(name_or_path: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Load an HF masked-LM from a local directory or a hub name."""
    from transformers import AutoModelForMaskedLM

    p = Path(name_or_path)
    if (p.is_absolute() or name_or_path.startswith(".")) and not p.exists():
        raise UserError(f"{name_or_path}: model path not found; pass a model directory or a hub name")
    try:
        return AutoModelForMaskedLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        ) if dtype is not None else AutoModelForMaskedLM.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code
        )
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
