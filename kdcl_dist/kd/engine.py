"""The KD engine: a DeepSpeed ZeRO student beside a frozen teacher, one `step()` per global batch.

Student: `deepspeed.initialize` with a config from `kdcl_dist/ds_configs/` (by name) or a file (ZeRO 0-3; fp32 on CPU with
DeepSpeed's CPU accelerator and gloo; bf16/fp16 on GPU), AdamW in two parameter groups (no
weight decay on biases and normalisation weights: `weight_decay_groups`), a warm-up/decay
schedule, gradient clipping, gradient accumulation through DeepSpeed (`engine.backward` /
`engine.step` once per micro-batch; DeepSpeed applies the update at the boundary).

Teacher hosting:
- `replicated`: every rank holds the whole frozen teacher (requires_grad False, `.eval()`,
  bf16/fp16 on GPU, fp32 on CPU) and runs it under `torch.inference_mode()`.
- `zero3`: the teacher goes through its own `deepspeed.initialize` with a ZeRO-3 config and no
  optimizer, so its parameters are partitioned across ranks and gathered module by module for
  the forward pass (`torch.no_grad()`: ZeRO-3's gather hooks write into parameter storage,
  which inference-mode tensors forbid). The engine is put back in eval mode after initialize
  (DeepSpeed leaves modules in train mode, which would keep dropout on).
The teacher is never given to an optimizer and never saved: checkpoints hold the student only.

Losses only at masked positions: the encoders of both models run on the whole micro-batch,
the hidden states at the masked positions are gathered, and each LM head runs on those rows
only (an [M, V] logits matrix instead of [B, T, V]). With `kd_positions="all"` the KL term
uses every non-padding position (HF DistilBERT distiller style); MLM CE stays on masked ones.

Loss scaling (why the gradient equals the gradient of the global-batch loss):
let the global batch hold N masked tokens over W data-parallel ranks and G micro-batches per
rank, and let S_{r,g} = sum over the masked tokens of micro-batch (r, g) of the per-token loss
l_i. The global-batch loss is L = (1/N) * sum_{r,g} S_{r,g}. DeepSpeed's `backward` divides
each micro-batch loss by G and its gradient all-reduce averages over W, so the applied
gradient is (1/(W*G)) * sum_{r,g} grad(loss_{r,g}). Choosing
    loss_{r,g} = (W * G / N) * S_{r,g}
gives (1/(W*G)) * sum (W*G/N) grad S_{r,g} = (1/N) * sum grad S_{r,g} = grad L. N is the
*global* count, obtained with one all-reduce before the first micro-batch (labels are known
before any forward). `losses.masked_kd_losses` already divides by N, so the engine multiplies
its result by W*G. The same holds for the KD term under `kd_positions="all"` with N replaced
by the global count of non-padding tokens.

Non-finite steps: every rank flags which value of its micro-batches was inf/NaN (teacher logits,
mlm / kd / cosine loss, the total, ZeRO-0's gradient norm); one all-reduce before the optimizer
step makes every rank skip the same steps (`_boundary_step`). A skipped step leaves weights and
optimizer state untouched; the global step, the lr schedule and the data move on. Counting,
the warning and the abort after N in a row are `kd/nonfinite.py` + `train.py`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdcl_dist.errors import UserError

log = logging.getLogger("kdcl_dist.engine")

HOSTINGS = ("replicated", "zero3")
KD_POSITIONS = ("masked", "all")
LR_SCHEDULES = ("linear", "cosine", "constant")
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
TEACHER_DTYPES = ("auto", "fp32", "bf16", "fp16")
# finiteness flags of one step, in the order of the all-reduced vector (see KDEngine.step)
NONFINITE_TERMS = ("teacher logits", "mlm loss", "kd loss", "cosine loss", "loss", "gradients")


# --------------------------------------------------------------------------------------
# DeepSpeed configs
# --------------------------------------------------------------------------------------


def load_ds_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    from kdcl_dist.packaged import find_ds_config

    p = find_ds_config(path_or_dict)  # a file (relative: from the CWD) or a packaged name

    def no_duplicates(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:  # json keeps the last one silently; DeepSpeed's own loader refuses it too
                raise UserError(f"{p}: key '{k}' appears twice in one object; keep one")
            seen.add(k)
        return dict(pairs)

    try:
        cfg = json.loads(p.read_text(), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e}); fix the DeepSpeed config") from e
    if not isinstance(cfg, dict):
        raise UserError(f"{p}: a DeepSpeed config must be a JSON object")
    return cfg


def _integral(v) -> bool:
    return not isinstance(v, bool) and (
        isinstance(v, int) or (isinstance(v, float) and v.is_integer())
    )


class _ReadKeys(dict):
    """A dict that records the keys DeepSpeed's config parser looks up in it.

    Lookups (`[]`, `get`, `in`, `in d.keys()`) record the key; iterating (`**d`, `items()`,
    `dict(d)`) records every key, since the reader then sees them all; `copy.copy` gives a copy
    that records into the same list. pydantic-core reads a nested dict through the C API without
    any of these: such a section records nothing.
    """

    def __init__(self, data, seen: list):
        super().__init__(data)
        self.seen = seen

    def __getitem__(self, k):
        self.seen.append(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.seen.append(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.seen.append(k)
        return super().__contains__(k)

    def _all(self):
        self.seen.extend(super().keys())

    def keys(self):
        return _ReadKeysView(self)

    def __iter__(self):
        self._all()
        return super().__iter__()

    def items(self):
        self._all()
        return super().items()

    def values(self):
        self._all()
        return super().values()

    def __copy__(self):  # DeepSpeedConfig parses a copy: it records into the same list
        return _ReadKeys(dict.items(self), self.seen)


class _ReadKeysView:
    def __init__(self, d: _ReadKeys):
        self.d = d

    def __contains__(self, k):
        return k in self.d

    def __iter__(self):
        return iter(self.d)

    def __len__(self):
        return len(self.d)


# Keys that deepspeed.initialize reads itself, before DeepSpeedConfig parses the rest.
_READ_BY_INITIALIZE = ("data_parallel_size", "sequence_parallel_size")


def _parse_with_deepspeed(cfg: dict, top: list, nested: dict, record: bool = True) -> None:
    """Parse `cfg` with DeepSpeed's own `DeepSpeedConfig`, recording the top-level keys it reads
    in `top` (in order: the last one names the section being parsed when it raises) and each
    dict-valued section's keys in `nested[section]`.

    The batch sizes are replaced by 1 x 1 (any world size divides them): `fill_batch_sizes`
    checks those. DeepSpeed's log output is muted meanwhile (the real initialize repeats it).
    """
    import logging as _logging

    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {
        k: (_ReadKeys(v, nested.setdefault(k, [])) if isinstance(v, dict) and record else v)
        for k, v in copy.deepcopy(cfg).items()
        if k not in _BATCH_KEYS
    }  # the parser fills in defaults
    probe.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    ds_log = _logging.getLogger("DeepSpeed")
    level = ds_log.level
    ds_log.setLevel(_logging.ERROR)
    try:
        DeepSpeedConfig(_ReadKeys(probe, top) if record else probe)
    finally:
        ds_log.setLevel(level)


def _known_top_level_keys() -> frozenset:
    """Every top-level key DeepSpeed reads: DeepSpeed has no list of them (each section has its own
    getter in deepspeed/runtime/config.py and a key that no getter asks for is silently ignored), so
    the set is recorded from DeepSpeedConfig parsing a minimal config (_ReadKeys), plus the two that
    deepspeed.initialize reads itself; sections enabled by the user's config add theirs in check_ds_config."""
    global _KNOWN_TOP
    if _KNOWN_TOP is None:
        top: list = []
        _parse_with_deepspeed({}, top, {})
        _KNOWN_TOP = frozenset(top) | frozenset(_READ_BY_INITIALIZE)
    return _KNOWN_TOP


_KNOWN_TOP: frozenset | None = None


def _closest(key: str, known) -> str:
    import difflib

    match = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    if match:
        return f"did you mean '{match[0]}'?"
    names = sorted(known)
    return f"known keys: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"


def _pydantic_model(name: str):
    """The DeepSpeed pydantic config class called `name` (a ValidationError's title)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        c = todo.pop()
        if c.__name__ == name:
            return c
        todo += c.__subclasses__()
    return None


def _model_field_names(model, path) -> set[str]:
    """Field names and aliases of the pydantic model reached from `model` along `path` (empty: unknown)."""
    import typing

    from pydantic import BaseModel

    for part in path:
        fields = getattr(model, "model_fields", {})
        f = fields.get(part) or next((x for x in fields.values() if x.alias == part), None)
        if f is None:
            return set()
        todo, model = [f.annotation], None
        while todo:
            a = todo.pop()
            if isinstance(a, type) and issubclass(a, BaseModel):
                model = a
                break
            todo += list(typing.get_args(a))
        if model is None:
            return set()
    fields = getattr(model, "model_fields", {})
    return set(fields) | {f.alias for f in fields.values() if f.alias}


def check_ds_config(cfg: dict, name: str) -> None:
    """Refuse what DeepSpeed would silently ignore or reject later, in one line naming `name`, the key
    and the closest key DeepSpeed knows (before any model is loaded).

    DeepSpeed's own parser is the schema: `DeepSpeedConfig` parses the config (pydantic models such
    as `DeepSpeedZeroConfig` refuse unknown sub-keys: their error is turned into one line), and
    every top-level key, and every key of a section DeepSpeed reads key by key (`optimizer`,
    `checkpoint`, `flops_profiler`, ...), must have been read by it: DeepSpeed ignores the others
    without a word (a misspelled `zero_optimisation` trains at ZeRO-0).
    """
    import pydantic

    try:
        from deepspeed.runtime.config import DeepSpeedConfigError
    except ImportError:  # pragma: no cover - older DeepSpeed
        DeepSpeedConfigError = ValueError
    top: list = []
    nested: dict = {}
    try:
        _parse_with_deepspeed(cfg, top, nested)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = tuple(str(x) for x in err.get("loc", ()))
        read = [k for k in top if k in cfg and isinstance(cfg[k], dict)]
        section = read[-1] if read else None
        path = loc if (loc and loc[0] in cfg) or section is None else (section, *loc)
        key = ".".join(path)
        if err.get("type") == "extra_forbidden":
            model = _pydantic_model(getattr(e, "title", ""))
            known = _model_field_names(model, loc[:-1]) if model is not None else set()
            fix = _closest(loc[-1], known) if known else "remove it"
            raise UserError(
                f"{name}: unknown DeepSpeed config key '{key}'; {fix} (fix or remove the key)"
            ) from None
        raise UserError(
            f"{name}: DeepSpeed config key '{key}': {err.get('msg')} (got {err.get('input')!r:.60}); "
            "fix the DeepSpeed config"
        ) from None
    except (
        DeepSpeedConfigError,
        AssertionError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
    ) as e:
        if not isinstance(e, (DeepSpeedConfigError, AssertionError)):
            try:  # a parser that trips over the recording dict (another DeepSpeed): ask it with a plain one
                _parse_with_deepspeed(cfg, [], {}, record=False)
            except Exception as plain:  # noqa: BLE001 - whatever DeepSpeed raises is its verdict
                e = plain
            else:
                log.warning(
                    "%s: DeepSpeed's parser could not be traced (%s: %s); its keys were not checked",
                    name,
                    type(e).__name__,
                    e,
                )
                return
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"{name}: DeepSpeed refuses this config: {msg}") from None
    from deepspeed.runtime import config as ds_config_module

    removed = set(getattr(ds_config_module, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    known = (_known_top_level_keys() | set(top)) - removed
    for key in cfg:
        if key not in known and key not in removed:
            raise UserError(
                f"{name}: unknown DeepSpeed config key '{key}' (DeepSpeed would ignore it silently); "
                f"{_closest(key, known)} (fix or remove the key)"
            )
    # a section DeepSpeed reads key by key: a key it never asked for is ignored. A section it
    # never looked into by name (handed whole to a pydantic model, which refuses unknown keys
    # itself) is left alone; keys it asks for only to refuse them (removed features) do not count.
    refused = set(getattr(ds_config_module, "_REMOVED_ZERO_CONFIG_KEYS", {}))
    for section, reads in nested.items():
        if not set(reads) - refused:
            continue
        for key in cfg[section]:
            if key not in reads:
                raise UserError(
                    f"{name}: unknown DeepSpeed config key '{section}.{key}' (DeepSpeed would ignore it "
                    f"silently); {_closest(key, set(reads) - {key})} (fix or remove the key)"
                )


def zero_stage(cfg: dict) -> int | None:
    """The ZeRO stage of a checked DeepSpeed config (None: not given as a plain section)."""
    z = cfg.get("zero_optimization", {})
    if isinstance(z, dict):
        st = z.get("stage", 0)
        return int(st) if _integral(st) else None
    return None


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    if micro_batch * world_size > global_batch:
        raise UserError(
            f"train.micro_batch: micro_batch x world_size = {micro_batch} x {world_size} exceeds train.global_batch "
            f"{global_batch}; lower --micro-batch to at most {max(1, global_batch // world_size)} or raise --global-batch"
        )
    if global_batch % (micro_batch * world_size) != 0:
        raise UserError(
            f"train.global_batch: {global_batch} is not divisible by micro_batch x world_size = "
            f"{micro_batch} x {world_size}; pick a global batch that is a multiple of {micro_batch * world_size}"
        )
    return global_batch // (micro_batch * world_size)


def fill_batch_sizes(
    cfg: dict, global_batch: int, micro_batch: int, world_size: int, name: str = "ds_config"
) -> dict:
    """Write the three batch sizes; refuse explicit values that contradict the run."""
    ga = grad_accum_steps(global_batch, micro_batch, world_size)
    want = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ga,
    }
    for k in _BATCH_KEYS:
        if k in cfg and cfg[k] not in (None, "auto") and not _integral(cfg[k]):
            raise UserError(
                f"{name}: {k}={cfg[k]!r} is not an integer; remove the batch sizes from the DeepSpeed config "
                "(kdcl-dist fills them)"
            )
        if k in cfg and cfg[k] not in (None, "auto") and int(cfg[k]) != want[k]:
            raise UserError(
                f"{name}: {k}={cfg[k]} contradicts this run (global batch {global_batch}, micro batch "
                f"{micro_batch}, world size {world_size} -> {k}={want[k]}); remove the batch sizes from the "
                "DeepSpeed config (kdcl-dist fills them) or change --global-batch/--micro-batch"
            )
    cfg.update(want)
    return cfg


def precision(cfg: dict) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def prepare_student_config(
    path_or_dict,
    *,
    global_batch: int,
    micro_batch: int,
    world_size: int,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    lr_schedule: str = "linear",
    min_lr_ratio: float = 0.0,
    weight_decay: float | None = None,
    grad_clip: float | None = None,
    on_gpu: bool | None = None,
    load_universal: bool = False,
) -> dict:
    """The student's DeepSpeed config for this run: the file's values plus what the run decides.

    Filled by the code (documented in docs/training.md): batch sizes, optimizer lr, the
    scheduler's warm-up/total steps and peak lr, and `checkpoint.load_universal` when resuming
    at another world size. Everything else (ZeRO stage, buckets, offload, precision,
    optimizer betas) comes from the file.
    """
    name = str(path_or_dict) if not isinstance(path_or_dict, dict) else "ds_config"
    cfg = load_ds_config(path_or_dict)
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    fill_batch_sizes(cfg, global_batch, micro_batch, world_size, name)
    check_ds_config(cfg, name)
    if not on_gpu and precision(cfg) != "fp32":
        raise UserError(
            f"{name}: {precision(cfg)} needs a GPU; on CPU use ds_configs/cpu_fp32.json or zero1/2/3.json (fp32)"
        )
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    params["lr"] = lr
    if weight_decay is not None:
        params["weight_decay"] = weight_decay
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in (
        "cpu",
        "nvme",
    )
    if not on_gpu and not offload:
        # FusedAdam is a CUDA kernel; torch's AdamW is DeepSpeed's documented CPU fallback.
        params["torch_adam"] = True
    if not on_gpu:
        # the GPU configs ask for torch's fused (one CUDA kernel) AdamW: `torch_adam` + `fused`,
        # which needs no JIT build, unlike DeepSpeed's FusedAdam; CPU runs keep foreach AdamW
        params.pop("fused", None)
    if grad_clip is not None:
        cfg["gradient_clipping"] = grad_clip
    if lr_schedule not in LR_SCHEDULES:
        raise UserError(
            f"train.lr_schedule: {lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}"
        )
    # The schedule is a torch LambdaLR built by `make_lr_scheduler` (DeepSpeed saves and restores
    # it with the checkpoint). DeepSpeed's own WarmupLR family gives lr 0 to the first two
    # optimizer steps; a file's "scheduler" section is therefore replaced, not merged.
    if "scheduler" in cfg:
        log.info("%s: 'scheduler' section replaced by train.lr_schedule=%s", name, lr_schedule)
        cfg.pop("scheduler")
    if load_universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def _decay(step: int, start: int, value: float, end: int, schedule: str, min_ratio: float) -> float:
    """Decay from `value` at step `start` to `min_ratio` at step `end` (linear or cosine)."""
    if step <= start:
        return value  # exactly: the lr of the step where a segment begins never changes
    x = min(1.0, (step - start) / max(1, end - start))
    if schedule == "cosine":
        return min_ratio + (value - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * x))
    return value + (min_ratio - value) * x


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_ratio: float,
    extensions=(),
) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    warm-up: (step+1)/W for step < W; then linear: 1 -> min_ratio at total_steps, cosine:
    min_ratio + (1-min_ratio)(1+cos(pi x))/2, constant: 1.

    `extensions`: [(s_1, T_1), (s_2, T_2), ...], the steps s_i at which a resumed run changed its
    total to T_i (`--extend-steps`), in the order they were made. Extension i keeps the curve
    before it up to its pivot p_i = max(s_i, W) (the warm-up is never repeated) and from there
    decays, linear or cosine as configured, from the factor the curve had at p_i to min_ratio at
    T_i. The factor is continuous, equal to the old curve's at the resume step, and a pure
    function of the arguments, so every later resume reproduces it.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    # segments (pivot, factor at the pivot, end): the base curve, then one per extension
    segments = [(warmup_steps, 1.0, total_steps)]
    for s, end in extensions:
        pivot = max(int(s), warmup_steps)
        p0, v0, e0 = next(seg for seg in reversed(segments) if seg[0] <= pivot)
        segments.append((pivot, _decay(pivot, p0, v0, e0, schedule, min_ratio), int(end)))
    pivot, value, end = next(seg for seg in reversed(segments) if seg[0] <= step)
    return _decay(step, pivot, value, end, schedule, min_ratio)


def make_lr_scheduler(
    *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float, extensions=()
):
    """A callable(optimizer) -> LambdaLR, the form deepspeed.initialize accepts.

    `extensions`: see `lr_factor` (the run's `--extend-steps` points, from its run settings).
    """
    import functools

    fn = functools.partial(
        lr_factor,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        schedule=schedule,
        min_ratio=min_ratio,
        extensions=tuple((int(s), int(t)) for s, t in extensions),
    )
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def prepare_teacher_config(
    path_or_dict, *, micro_batch: int, world_size: int, on_gpu: bool | None = None
) -> dict:
    """ZeRO-3 inference config for the teacher (no optimizer, no scheduler)."""
    name = str(path_or_dict) if not isinstance(path_or_dict, dict) else "teacher_ds_config"
    cfg = load_ds_config(path_or_dict)
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    # DeepSpeed requires batch sizes even without an optimizer; the teacher sees micro-batches.
    for k in _BATCH_KEYS:
        cfg.pop(k, None)
    cfg.update(
        {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world_size,
        }
    )
    check_ds_config(cfg, name)
    if zero_stage(cfg) != 3:
        raise UserError(f"{name}: teacher hosting zero3 needs zero_optimization.stage 3")
    for k in ("optimizer", "scheduler"):
        if k in cfg:
            raise UserError(f"{name}: the teacher is frozen; remove the '{k}' section")
    if not on_gpu and precision(cfg) != "fp32":
        raise UserError(
            f"{name}: {precision(cfg)} needs a GPU; on CPU use ds_configs/teacher_zero3.json"
        )
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


# --------------------------------------------------------------------------------------
# forward at selected positions only
# --------------------------------------------------------------------------------------


def fp32_head_copy(model) -> torch.nn.Module:
    """A standalone fp32 copy of a BERT/DistilBERT MLM head (its tied decoder weight copied), for
    a teacher whose encoder runs in bf16/fp16 while its logits are computed in fp32."""
    if hasattr(model, "cls"):  # BertForMaskedLM
        head = copy.deepcopy(model.cls)
    elif hasattr(model, "vocab_projector"):  # DistilBertForMaskedLM
        head = torch.nn.Sequential(
            *(
                copy.deepcopy(m)
                for m in (
                    model.vocab_transform,
                    model.activation,
                    model.vocab_layer_norm,
                    model.vocab_projector,
                )
            )
        )
    else:
        raise UserError(
            f"{type(model).__name__}: unsupported masked-LM architecture (need BERT or DistilBERT style MLM head)"
        )
    return head.float().requires_grad_(False).eval()


def bind_selected_forward(model, fp32_head: torch.nn.Module | None = None) -> None:
    """Make `model(input_ids, attention_mask, flat_index)` return (hidden[M,H], logits[M,V]).

    `fp32_head`: run this head (an `fp32_head_copy`) on the fp32-cast hidden rows instead of the
    model's own head (the teacher's `--teacher-head-fp32`).

    The forward is replaced on the *instance* (not wrapped in a new module) so that the
    DeepSpeed engine still calls it through its own forward (ZeRO-3 hooks, backward hooks)
    and the checkpoint's parameter names stay the HF names that export and zero_to_fp32 use.
    The encoder/head pair is kept in a closure, not as a module attribute, so it does not
    enter `state_dict` or form a module cycle.
    """
    from kdcl_dist.kd.models import mlm_parts

    encoder, head = mlm_parts(model)
    if head is None:
        raise UserError(
            f"{type(model).__name__}: unsupported masked-LM architecture (need BERT or DistilBERT style MLM head)"
        )

    def forward(input_ids, attention_mask, flat_index):
        out = encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index)
        if fp32_head is not None:
            return selected, fp32_head(selected.float())
        return selected, head(selected)

    model.forward = forward


def hidden_size(model) -> int:
    c = model.config
    return int(getattr(c, "hidden_size", None) or c.dim)


# --------------------------------------------------------------------------------------
# optimizer parameter groups
# --------------------------------------------------------------------------------------

# parameter-name pieces of normalisation layers (BERT: LayerNorm.weight; DistilBERT:
# sa_layer_norm, output_layer_norm, vocab_layer_norm; other models: *norm.weight)
NO_DECAY_NAME_PARTS = ("LayerNorm.", "layer_norm", "norm.")
PARAM_GROUP_LAYOUTS = ("split", "single")


def no_weight_decay(name: str, norm_param: bool = False) -> bool:
    """HF's rule: biases and normalisation-layer weights are not decayed."""
    return norm_param or name.endswith("bias") or any(part in name for part in NO_DECAY_NAME_PARTS)


def weight_decay_groups(model) -> list[dict]:
    """The two AdamW groups HF's Trainer builds: [decayed, {"weight_decay": 0.0}].

    The first group has no "weight_decay" key, so the DeepSpeed config's optimizer value
    (`train.weight_decay`) applies to it; the second overrides it with 0.0 for every bias and
    every weight of a normalisation layer (by module type or by name). Tied weights appear once
    (named_parameters drops duplicates). An empty group is left out.
    """
    norm_ids = set()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith(("LayerNorm", "RMSNorm")):
            norm_ids.update(id(p) for p in m.parameters(recurse=False))
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_weight_decay(name, id(p) in norm_ids) else decay).append(p)
    groups = [{"params": decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------


def teacher_torch_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """The replicated teacher's dtype: `auto` is bf16 on a GPU (fp16 where bf16 is unsupported)
    and fp32 on CPU; the others are taken as given."""
    if name == "auto":
        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class EngineOptions:
    temperature: float = 2.0
    kd_positions: str = "masked"
    cosine_weight: float = 0.0
    teacher_hosting: str = "replicated"
    # replicated teacher's dtype: auto = bf16 (fp16 without bf16 support) on GPU, fp32 on CPU
    teacher_dtype: str = "auto"
    teacher_head_fp32: bool = False  # the teacher's LM head (its logits) in fp32
    gradient_checkpointing: bool = False  # HF activation checkpointing in the student


class KDEngine:
    """Student under DeepSpeed + optional frozen teacher; `step(micro_batches, lam)` per global batch."""

    def __init__(
        self,
        student,
        teacher,
        ds_config: dict,
        *,
        world_size: int,
        options: EngineOptions,
        teacher_ds_config: dict | None = None,
        lr_scheduler=None,
        param_groups: str = "split",
    ):
        """`param_groups`: "split" (no weight decay on biases and norm weights, `weight_decay_groups`)
        or "single" (every parameter decayed: the layout of checkpoints from before the split,
        which a resume must keep for the optimizer state to load)."""
        import deepspeed

        self.opts = options
        self.world_size = world_size
        if options.kd_positions not in KD_POSITIONS:
            raise UserError(
                f"train.kd_positions: {options.kd_positions!r} is not one of {', '.join(KD_POSITIONS)}"
            )
        if options.teacher_hosting not in HOSTINGS:
            raise UserError(
                f"train.teacher_hosting: {options.teacher_hosting!r} is not one of {', '.join(HOSTINGS)}"
            )
        self.grad_accum = int(ds_config["gradient_accumulation_steps"])
        self.precision = precision(ds_config)
        self.on_gpu = torch.cuda.is_available()
        if options.cosine_weight > 0:
            if teacher is None:
                raise UserError("train.cosine_weight: the hidden-state cosine term needs a teacher")
            if hidden_size(teacher) != hidden_size(student):
                raise UserError(
                    f"train.cosine_weight: teacher hidden size {hidden_size(teacher)} != student "
                    f"{hidden_size(student)}; the cosine term needs equal sizes (set cosine_weight=0)"
                )

        if options.teacher_dtype not in TEACHER_DTYPES:
            raise UserError(
                f"train.teacher_dtype: {options.teacher_dtype!r} is not one of {', '.join(TEACHER_DTYPES)}"
            )
        if options.teacher_dtype != "auto" and options.teacher_hosting == "zero3":
            raise UserError(
                f"train.teacher_dtype: {options.teacher_dtype} applies to the replicated teacher; "
                "teacher hosting zero3 runs in its DeepSpeed config's precision (teacher_zero3 fp32, "
                "teacher_zero3_bf16): choose that with --teacher-ds-config and leave teacher_dtype auto"
            )
        student.train()
        if options.gradient_checkpointing:
            # recompute each layer's activations in backward: less memory for a larger micro-batch.
            # Non-reentrant checkpointing works with ZeRO-3's hooks and inputs without grad.
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        bind_selected_forward(student)
        if param_groups not in PARAM_GROUP_LAYOUTS:
            raise ValueError(
                f"param_groups: {param_groups!r} is not one of {', '.join(PARAM_GROUP_LAYOUTS)}"
            )
        self.param_groups_layout = param_groups
        if param_groups == "split":
            params = weight_decay_groups(student)
        else:
            params = [p for p in student.parameters() if p.requires_grad]
        # recorded with every checkpoint by train._save (what shapes the run; train.run_settings)
        self.run_settings: dict | None = None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=student, model_parameters=params, config=ds_config, lr_scheduler=lr_scheduler
        )
        self.device = self.engine.device
        self.zero_stage = int(self.engine.zero_optimization_stage())
        import torch.distributed as tdist

        self.rank = tdist.get_rank() if tdist.is_initialized() else 0
        # ZeRO-0 in fp32 hands us torch's own optimizer: nothing in DeepSpeed checks its gradients
        # for inf/NaN, so a non-finite step has to be kept from it here. Every other optimizer
        # (ZeRO 1-3, DeepSpeed's fp16/bf16 ones) has an overflow check that skips the step.
        self._plain_optimizer = self.zero_stage == 0 and not hasattr(self.optimizer, "overflow")

        self.teacher = None
        self.teacher_engine = None
        if teacher is not None:
            teacher.requires_grad_(False)
            # the fp32 head is copied before the teacher is cast (its weights keep full precision)
            head = fp32_head_copy(teacher).to(self.device) if options.teacher_head_fp32 else None
            bind_selected_forward(teacher, head)
            if options.teacher_hosting == "replicated":
                dtype = teacher_torch_dtype(options.teacher_dtype, self.on_gpu)
                self.teacher = teacher.to(device=self.device, dtype=dtype).eval()
            else:
                if teacher_ds_config is None:
                    raise UserError(
                        "train.teacher_ds_config: teacher hosting zero3 needs a ZeRO-3 config"
                    )
                self.teacher_engine, *_ = deepspeed.initialize(
                    model=teacher, config=teacher_ds_config
                )
                self.teacher_engine.eval()  # initialize leaves train mode on: dropout would be active
                self.teacher = self.teacher_engine

    # ---- teacher forward --------------------------------------------------------------
    def _teacher_forward(self, input_ids, attention_mask, flat_index):
        ctx = torch.inference_mode() if self.teacher_engine is None else torch.no_grad()
        with ctx:
            h, logits = self.teacher(input_ids, attention_mask, flat_index)
        # inference tensors cannot enter autograd graphs; clone() outside inference mode
        return h.float().clone(), logits.float().clone()

    # ---- one global batch -------------------------------------------------------------
    def step(self, micro_batches: list[dict], lam_of_position) -> dict:
        """Forward/backward every micro-batch of this rank, one optimizer step; global scalars.

        `lam_of_position(positions ndarray) -> float | ndarray`: λ of each sample (per-sample
        schedules) or one λ for the batch. Returns scalars that are identical on every rank.
        """
        from kdcl_dist import dist
        from kdcl_dist.kd import losses

        if len(micro_batches) != self.grad_accum:
            raise RuntimeError(
                f"expected {self.grad_accum} micro-batches per rank, got {len(micro_batches)}"
            )
        t0 = time.perf_counter()
        all_mode = self.opts.kd_positions == "all" and self.teacher is not None
        local = torch.zeros(2, dtype=torch.float64)
        for mb in micro_batches:
            local[0] += int((mb["labels"] != -100).sum())
            local[1] += int(mb["attention_mask"].sum())
        # collectives run on the engine's device: NCCL has no CPU tensors
        counts = dist.all_reduce_sum(local.to(self.device)).cpu()
        n_masked, n_tokens = max(1.0, float(counts[0])), max(1.0, float(counts[1]))
        scale = float(self.world_size * self.grad_accum)

        # Local sums over tokens of this rank (summed across ranks after the step for logging)
        # and the non-finite flags stay on the device until the step's one reduction
        # (_boundary_step): no device->host sync per micro-batch. Host-side index arithmetic
        # uses the CPU labels, which the loader delivered.
        dev = self.device
        acc = torch.zeros(5, dtype=torch.float64, device=dev)  # loss, mlm, kd, agreements, cosine
        bad = torch.zeros(len(NONFINITE_TERMS), dtype=torch.float64, device=dev)  # this rank's
        nonfinite = {"skipped": False}
        n_sel_local = 0
        for mb in micro_batches:
            input_ids = mb["input_ids"].to(dev, non_blocking=True)
            attn = mb["attention_mask"].to(dev, non_blocking=True)
            labels_full = mb["labels"].reshape(-1)
            if all_mode:
                flat_index = torch.nonzero(mb["attention_mask"].reshape(-1) > 0).squeeze(1)
            else:
                flat_index = torch.nonzero(labels_full != -100).squeeze(1)
            labels_cpu = labels_full.index_select(0, flat_index)
            sel_cpu = labels_cpu != -100
            n_sel_local += int(sel_cpu.sum())
            labels = labels_cpu.to(dev, non_blocking=True)
            # rows at masked positions: all of them unless kd_positions="all"
            sel = torch.nonzero(sel_cpu).squeeze(1).to(dev, non_blocking=True) if all_mode else None
            seq_len = input_ids.shape[1]
            row = (flat_index // seq_len).numpy()
            positions = np.asarray(mb["positions"])
            lam = lam_of_position(positions)
            lam_tok = (
                torch.as_tensor(np.asarray(lam, dtype=np.float64)[row], dtype=torch.float32).to(
                    dev, non_blocking=True
                )
                if np.ndim(lam)
                else float(lam)
            )
            fi = flat_index.to(dev, non_blocking=True)
            s_h, s_logits = self.engine(input_ids, attn, fi)
            s_logits = s_logits.float()
            one = torch.ones((), dtype=torch.bool, device=dev)
            finite_t = finite_cos = one
            if "kd_w" in mb:  # a cached sparse teacher (kd/teacher_cache.py): no teacher forward
                from kdcl_dist.kd.teacher_cache import cached_step_terms

                res, agree = cached_step_terms(
                    s_logits, mb, labels, lam_tok, self.opts.temperature, n_masked, dev
                )
                loss = res["loss"]
                acc[3] += agree  # a device tensor: no host sync
            elif self.teacher is None:
                mlm = (
                    F.cross_entropy(s_logits, labels, ignore_index=-100, reduction="sum") / n_masked
                )
                loss = mlm
                res = {"loss": loss, "mlm": mlm, "kd": torch.zeros((), device=dev)}
            else:
                t_h, t_logits = self._teacher_forward(input_ids, attn, fi)
                if all_mode:
                    res = losses.kd_all_positions(
                        s_logits,
                        t_logits,
                        labels,
                        lam_tok,
                        self.opts.temperature,
                        n_masked,
                        n_tokens,
                    )
                else:
                    res = losses.masked_kd_losses(
                        s_logits, t_logits, labels, lam_tok, self.opts.temperature, n_masked
                    )
                loss = res["loss"]
                s_sel = s_logits.detach() if sel is None else s_logits.detach().index_select(0, sel)
                t_sel = t_logits if sel is None else t_logits.index_select(0, sel)
                # counted here (not a mean) so that ranks can be summed exactly
                acc[3] += (s_sel.argmax(-1) == t_sel.argmax(-1)).sum()
                finite_t = torch.isfinite(t_logits).all()
                if self.opts.cosine_weight > 0:
                    sh = s_h if sel is None else s_h.index_select(0, sel)
                    th = t_h if sel is None else t_h.index_select(0, sel)
                    cos = losses.hidden_cosine_loss(sh.float(), th, n_masked)
                    loss = loss + self.opts.cosine_weight * cos
                    acc[4] += cos.detach()
                    finite_cos = torch.isfinite(cos.detach())
            # which values are non-finite, in the order of NONFINITE_TERMS[:5] (device tensors)
            finite = torch.stack(
                [
                    finite_t,
                    torch.isfinite(res["mlm"].detach()).to(dev),
                    torch.isfinite(res["kd"].detach()).to(dev),
                    finite_cos,
                    torch.isfinite(loss.detach()),
                ]
            )
            bad[:5] = torch.maximum(bad[:5], (~finite).double())
            # An inf loss can have finite gradients (CE of a -inf log-probability): make them NaN,
            # so that DeepSpeed's overflow check (ZeRO 1-3, fp16/bf16) certainly skips the step
            # that every rank is about to decide to skip. Decided on the device: the term is
            # nan_to_num(Σ s_logits) × (0 if the loss is finite else NaN), so a finite loss adds
            # exact zeros to the gradients. It adds no module to the loss's graph: ZeRO-3 ranks
            # must run the same backward hooks (gathers and reduce-scatters) in the same order.
            poison = torch.where(finite[4], 0.0, float("nan")).to(s_logits.dtype)
            bwd = loss * scale + torch.nan_to_num(s_logits.sum()) * poison
            self.engine.backward(bwd)
            boundary = self.engine.is_gradient_accumulation_boundary()
            if self.zero_stage == 0 and boundary:
                # DeepSpeed reports no norm for plain fp32 (it clips with torch); gradients are
                # already averaged over ranks here, before the optimizer step (one device sum)
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                norm = (
                    torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt()
                    if grads
                    else torch.zeros((), dtype=torch.float64, device=dev)
                )
                self._fp32_norm = norm
                bad[5] = (~torch.isfinite(norm)).double()
            acc[0] += loss.detach().double()
            acc[1] += res["mlm"].detach().double()
            acc[2] += res["kd"].detach().double()
            if boundary:
                nonfinite = self._boundary_step(bad)
            else:
                self.engine.step()
        self.last_step_time = time.perf_counter() - t0
        # acc[0..2,4] are already normalized by the global count: summing over ranks gives the
        # global-batch values; acc[3] / n_masked is the global top-1 agreement. `acc` is a
        # device tensor (the caller reduces it with its own values: train.py).
        return {
            "acc": acc,
            "n_masked": n_masked,
            "n_tokens": n_tokens,
            "n_masked_local": n_sel_local,
            "nonfinite": nonfinite,
        }

    # ---- non-finite steps -------------------------------------------------------------
    def _boundary_step(self, bad: torch.Tensor) -> dict:
        """The optimizer step of a global batch, skipped on every rank if any rank saw inf/NaN.

        One all-reduce of this rank's flags (and a one-hot of the rank) makes the decision
        identical everywhere, which it must be: a rank that stepped while another skipped would
        diverge, and DeepSpeed's collectives would pair up wrongly. A skipped step changes
        neither the weights nor the optimizer state; DeepSpeed's global step and sample counters
        advance (the samples count as consumed), and so does the lr schedule, which is a function
        of the global step whether or not earlier steps were skipped.
        Returns {"skipped", "terms", "ranks"} (+ "loss_scale_overflow" for fp16), equal on all ranks.
        """
        from kdcl_dist import dist

        k, w = len(NONFINITE_TERMS), self.world_size
        # [flags | ranks whose loss side was non-finite | ranks whose gradients were], built on
        # the device: this reduction's result is the step's one device->host sync
        vec = torch.zeros(k + 2 * w, dtype=torch.float64, device=self.device)
        bad = bad.to(self.device)
        vec[:k] = bad
        vec[k + self.rank] = bad[: k - 1].max()
        vec[k + w + self.rank] = bad[k - 1]
        g = dist.all_reduce_sum(vec).cpu()
        seen = [t for t, v in zip(NONFINITE_TERMS, g[:k].tolist()) if v > 0]
        # name the most upstream culprit: the parts of the loss if any, else the total, else grads
        # (a NaN loss on one rank reaches every rank's gradients through the all-reduce)
        parts = [t for t in seen if t not in ("loss", "gradients")]
        terms = parts or [t for t in seen if t == "loss"] or seen
        ranks = [r for r in range(w) if g[k + r] > 0] or [r for r in range(w) if g[k + w + r] > 0]
        info = {"skipped": bool(seen), "terms": terms, "ranks": ranks}

        before = int(self.engine.skipped_steps)
        with warnings.catch_warnings():
            # torch's LambdaLR warns when its first step() is not preceded by an optimizer step
            warnings.filterwarnings("ignore", module=r"torch\.optim\.lr_scheduler")
            if info["skipped"] and self._plain_optimizer:
                with self._no_optimizer_update():
                    self.engine.step()
            else:
                self.engine.step()
            ds_skipped = int(self.engine.skipped_steps) > before
            if ds_skipped and self.engine.lr_scheduler is not None:
                # DeepSpeed's overflow path leaves the scheduler where it was; keep lr = f(global step)
                self.engine.lr_scheduler.step()
        if ds_skipped and not info["skipped"]:
            info["skipped"] = True
            if self.precision == "fp16":
                info["loss_scale_overflow"] = True  # the dynamic loss scaler's normal search
            else:
                info["terms"] = ["gradients"]
        elif info["skipped"] and not ds_skipped and not self._plain_optimizer:
            raise UserError(
                "ds_config: DeepSpeed applied a step whose loss was non-finite (its overflow check is off: "
                "zero_optimization.compute_grad_norm=false or bf16.check_grad_overflow=false); enable it"
            )
        return info

    @contextlib.contextmanager
    def _no_optimizer_update(self):
        """Around one `engine.step()`: DeepSpeed does its bookkeeping (global step and sample
        counters, lr scheduler, zero_grad) but torch's optimizer applies nothing. Its `step`
        is replaced on the instance for that call, and the gradients are zeroed so the
        gradient clipping before it stays finite. (Setting them to None instead would make
        AdamW skip too, but DeepSpeed's fp32 clipping fails on a parameter list without grads.)
        """
        opt = self.engine.optimizer
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        own = vars(opt).get("step")  # torch's LR scheduler wraps step on the instance
        opt.step = lambda *a, **k: None
        try:
            yield
        finally:
            if own is not None:
                opt.step = own
            else:
                del opt.step

    # ---- scalars ----------------------------------------------------------------------
    def lr(self) -> float:
        lrs = self.engine.get_lr()
        return float(lrs[0]) if lrs else float("nan")

    def grad_norm(self) -> float:
        g = self.engine.get_global_grad_norm()
        if g is None:
            g = getattr(self, "_fp32_norm", None)
        if g is None:
            return float("nan")
        g = float(g.item() if torch.is_tensor(g) else g)
        return g if math.isfinite(g) else float("nan")

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    def memory_bytes(self) -> int:
        if self.on_gpu:
            return int(torch.cuda.max_memory_allocated())
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except Exception:  # pragma: no cover - non-POSIX
            return 0

    # ---- checkpoint passthrough -------------------------------------------------------
    def save(self, ckpt_dir, tag: str, client_state: dict) -> None:
        # the teacher is a separate module (or engine) and is never passed here
        self.engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state=client_state, save_latest=True
        )

    def load(self, ckpt_dir, tag: str) -> dict:
        path, client = self.engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise UserError(
                f"{ckpt_dir}/{tag}: DeepSpeed could not load this checkpoint; it is incomplete or corrupt"
            )
        return client or {}

    def student_state_dict(self) -> dict:
        """Full fp32 student weights on every rank (gathers ZeRO-3 partitions)."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(
            params, modifier_rank=None, enabled=self.zero_stage == 3
        ):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
