"""Export a trained student from a DeepSpeed checkpoint (any ZeRO stage) to an HF model directory.

    <out>/model.safetensors, config.json      AutoModelForMaskedLM.from_pretrained(<out>) loads it
    <out>/tokenizer.json, tokenizer_config... the student's tokenizer
    <out>/export.json                         provenance: checkpoint, tag, step, zero stage, sha256

Weights: ZeRO-1/2/3 checkpoints are consolidated to fp32 with DeepSpeed's
`zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` (it merges every rank's partition of
the fp32 master weights); a ZeRO-0 checkpoint already holds the whole module in
`mp_rank_00_model_states.pt`. The weights are loaded into a model built from the student's
HF config that training saved in `<train out>/student_config/` (or from `--student`), and
saved with `save_pretrained` (safetensors). The teacher is never in a training checkpoint.

`checkpoint` may be the training output dir, its `checkpoints/` dir, or one `global_stepN` dir.
Without a tag the newest complete checkpoint (with `kdcl_complete.json`) is used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from kdcl_dist.errors import UserError

log = logging.getLogger("kdcl_dist.export")

TAG_RE = re.compile(r"^global_step(\d+)$")
MARKER = "kdcl_complete.json"  # written by kdcl_dist.checkpoint after every rank saved
CONFIG_SUBDIR = "student_config"


def resolve_checkpoint(path, tag: str | None = None) -> tuple[Path, str]:
    """(directory holding the tag dirs, tag) from a training out dir, checkpoints dir or tag dir."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: checkpoint path not found; pass the training --out, its checkpoints/ or a "
                        "global_stepN directory")
    if TAG_RE.match(p.name) and p.is_dir():
        if tag is not None and tag != p.name:
            raise UserError(f"{p}: is checkpoint {p.name} but --tag {tag} was given; pass one of them")
        return p.parent, p.name
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag is not None:
        if not (root / tag).is_dir():
            raise UserError(f"{root / tag}: no checkpoint with tag {tag}; available: {', '.join(_tags(root)) or 'none'}")
        return root, tag
    tags = _tags(root)
    complete = [t for t in tags if (root / t / MARKER).exists()]
    if complete:
        return root, complete[-1]
    if (root / "latest").exists():  # a plain DeepSpeed checkpoint directory (not written by kdcl-dist train)
        t = (root / "latest").read_text().strip()
        if (root / t).is_dir():
            return root, t
    if tags:
        raise UserError(f"{root}: no complete checkpoint (no {MARKER} in {', '.join(tags)}: saves were "
                        "interrupted); pass --tag to export one anyway")
    raise UserError(f"{root}: no global_stepN checkpoint found; pass the training --out or a checkpoint dir")


def _tags(root: Path) -> list[str]:
    found = [(int(m.group(1)), d.name) for d in root.iterdir() if d.is_dir() and (m := TAG_RE.match(d.name))]
    return [name for _, name in sorted(found)]


def find_student_config(root: Path, student: str | None) -> str:
    """The student's HF config + tokenizer: <train out>/student_config, else --student."""
    if student:
        return student
    for cand in (root.parent / CONFIG_SUBDIR, root / CONFIG_SUBDIR):
        if (cand / "config.json").exists():
            return str(cand)
    raise UserError(f"{root.parent / CONFIG_SUBDIR}: student config not found (training saves it there); "
                    "pass --student DIR|NAME with the student's config and tokenizer")


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of the whole student from one checkpoint tag of any ZeRO stage."""
    tag_dir = root / tag
    if any(tag_dir.glob("*optim_states.pt")) or any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise UserError(f"{tag_dir}: cannot consolidate the ZeRO checkpoint ({e}); is every rank's file present?") from e
        return {k: v.float() for k, v in sd.items()}
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise UserError(f"{tag_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt); not a checkpoint")
    blob = torch.load(states[0], map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in blob["module"].items()}


def _tied_targets(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = set(tied.keys()) if isinstance(tied, dict) else set(tied)
    # also any parameter that shares storage with another one (tied embeddings/decoder)
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            names.add(name)
        else:
            seen[id(p)] = name
    return names


def build_student(config_src: str, state_dict: dict, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForMaskedLM

    try:
        config = AutoConfig.from_pretrained(config_src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{config_src}: cannot read the student's HF config ({str(e).splitlines()[0]})") from e
    model = AutoModelForMaskedLM.from_config(config, trust_remote_code=trust_remote_code)
    model = model.float()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = _tied_targets(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(
            f"{config_src}: the checkpoint does not match the student config (missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}); export with the config the student was trained with (--student)"
        )
    model.tie_weights()
    return model.eval()


def export_checkpoint(checkpoint, out, tag: str | None = None, student: str | None = None,
                      force: bool = False) -> Path:
    from kdcl_dist.utils import read_json, sha256_file, write_json_atomic

    root, tag = resolve_checkpoint(checkpoint, tag)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "export.json").exists() and not force:
        raise UserError(f"{out}: directory exists and is not an earlier export; pass an empty or new --out "
                        "(or --force to overwrite)")
    config_src = find_student_config(root, student)
    log.info("consolidating %s/%s", root, tag)
    sd = consolidated_state_dict(root, tag)
    model = build_student(config_src, sd)

    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(config_src)
    except (OSError, ValueError) as e:
        raise UserError(f"{config_src}: no tokenizer beside the student config ({str(e).splitlines()[0]}); "
                        "pass --student with the student's model directory") from e

    # write into a sibling temp dir and swap it in, so a kill never leaves a half export
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    marker = {}
    if (root / tag / MARKER).exists():
        marker = read_json(root / tag / MARKER, "checkpoint marker")
    m = TAG_RE.match(tag)
    weights = tmp / "model.safetensors"
    write_json_atomic(tmp / "export.json", {
        "checkpoint": str((root / tag).resolve()), "tag": tag,
        "step": int(m.group(1)) if m else marker.get("step"),
        "zero_stage": marker.get("zero_stage"), "student_config": str(config_src),
        "dtype": "float32", "model_sha256": sha256_file(weights) if weights.exists() else None,
    })
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def verify_export(out, checkpoint: str | None = None, seq_len: int = 32, tol: float = 1e-5) -> float:
    """Reload `out` with AutoModelForMaskedLM and compare its logits with the checkpoint's weights.

    Rebuilds the model from the checkpoint recorded in export.json (consolidated again), runs
    both on the same random token ids, and raises if the largest difference exceeds `tol`.
    """
    from transformers import AutoModelForMaskedLM

    from kdcl_dist.utils import read_json

    out = Path(out)
    info = read_json(out / "export.json", "export record")
    ckpt = Path(checkpoint or info["checkpoint"])
    sd = consolidated_state_dict(ckpt.parent, ckpt.name)
    ref = build_student(str(out), sd)
    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.config.vocab_size, (2, seq_len), generator=g)
    with torch.no_grad():
        diff = float((loaded(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max())
    if diff > tol:
        raise UserError(f"{out}: exported model's logits differ from the checkpoint's by {diff:.3g} (> {tol}); "
                        "the export is broken, please report it")
    return diff
